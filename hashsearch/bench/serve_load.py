"""`hashsearch bench serve`: concurrent clients against `hashsearch serve` on 127.0.0.1.

The clients mix searches by id with image uploads; with `writes`, a writer
adds and deletes items through the API while they run, and every search
answer is checked against the deletes that had returned before it was sent.
The server runs in its own process (started and stopped here) on a copy of
the collection whose shards are hard links, so the collection itself is
never changed.  Every request loop is bounded in count and in time.
"""
from __future__ import annotations

import asyncio
import io
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..config import ServeBenchConfig
from ..serve.server import ServerProcess
from ..shards import Collection
from .sysinfo import machine_info

# The most requests one run may send, whatever --seconds says.
MAX_REQUESTS = 1_000_000


def _linked_copy(src: Path, dst: Path) -> Path:
    """A copy of the collection sharing its immutable files by hard link; the rest is copied."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link, ignore=shutil.ignore_patterns(".lock"))
    os.unlink(dst / "manifest.json")
    shutil.copy2(src / "manifest.json", dst / "manifest.json")      # rewritten by writers: never shared
    return dst


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _upload_images(coll: Collection, count: int = 16) -> list[bytes]:
    """Images to upload: stored files of the collection where they exist, else generated PNGs."""
    from PIL import Image
    images = []
    for path in coll.paths(np.arange(min(coll.n, 200))):
        if len(images) < count and os.path.isfile(path):
            images.append(Path(path).read_bytes())
    rng = np.random.default_rng(0)
    while len(images) < count:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


async def _load(server: ServerProcess, ids: list[int], images: list[bytes], cfg: ServeBenchConfig, token: str) -> dict:
    import httpx
    latencies = {"id": [], "image": []}
    errors, leaks, rss = [], [], []
    deleted: dict[int, float] = {}          # id -> when its delete returned
    live = list(ids)
    rng = np.random.default_rng(cfg.seed)
    sent = 0
    # Idle connections are dropped before the server's keep-alive (5 s) would close them under a request.
    limits = httpx.Limits(max_connections=cfg.clients + 4, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        rss.append(_rss_mb(server.proc.pid))
        deadline = time.monotonic() + cfg.seconds

        async def one_client(c: int):
            nonlocal sent
            local = np.random.default_rng([cfg.seed, c])
            while time.monotonic() < deadline and sent < MAX_REQUESTS:
                sent += 1
                began = time.monotonic()
                try:
                    r, kind, item = await one_request(local)
                except httpx.TransportError as exc:         # counted, never a crash of the benchmark
                    errors.append(f"connection: {type(exc).__name__} {exc}")
                    continue
                if r.status_code == 404 and kind == "id" and item in deleted:
                    continue        # deleted while this request was on its way: the right answer
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    continue
                latencies[kind].append(time.monotonic() - began)
                gone = {i for i, t in deleted.items() if t < began}
                leaks.extend(h["id"] for h in r.json()["results"] if h["id"] in gone)

        async def one_request(local):
            if local.random() < cfg.upload_share:
                r = await client.post(server.url + "/search", params={"k": 10},
                                      files={"image": ("q.png", images[local.integers(len(images))])})
                return r, "image", None
            item = int(live[local.integers(len(live))])
            return await client.post(server.url + "/search", params={"k": 10}, json={"id": item}), "id", item

        async def writer():
            auth = {"Authorization": f"Bearer {token}"}
            while time.monotonic() < deadline - 2:
                await asyncio.sleep(1.0)
                victim = int(live.pop(int(rng.integers(len(live)))))
                try:
                    r = await client.delete(f"{server.url}/items/{victim}", headers=auth)
                    if r.status_code != 200:
                        errors.append(f"delete {r.status_code} {r.text[:200]}")
                    deleted[victim] = time.monotonic()
                    r = await client.post(server.url + "/items", headers=auth, files=[
                        ("image", (f"w{len(deleted)}.png", images[int(rng.integers(len(images)))]))])
                    if r.status_code != 200:
                        errors.append(f"add {r.status_code} {r.text[:200]}")
                except httpx.TransportError as exc:
                    errors.append(f"writer connection: {type(exc).__name__} {exc}")

        async def sample_rss():
            while time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                rss.append(_rss_mb(server.proc.pid))

        began = time.monotonic()
        tasks = [one_client(c) for c in range(cfg.clients)] + [sample_rss()] + ([writer()] if cfg.writes else [])
        await asyncio.gather(*tasks)
        seconds = time.monotonic() - began
    return {"latencies": latencies, "errors": errors, "leaks": leaks, "rss_mb": rss, "seconds": seconds,
            "deletes": len(deleted)}


def _percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"count": 0}
    ms = np.asarray(seconds) * 1e3
    return {"count": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}


def run_serve_bench(collection, **options) -> dict:
    """Start a server on a linked copy of `collection`, load it as ServeBenchConfig says, stop it; the report."""
    cfg = ServeBenchConfig(**options)
    src = Collection.open(collection)
    images = _upload_images(src)
    ids = src.ids()[src.live_rows()].tolist()
    with tempfile.TemporaryDirectory(prefix="hashsearch-serve-bench-", dir=Path(collection).parent) as tmp:
        root = _linked_copy(Path(collection), Path(tmp) / "coll")
        token = secrets.token_hex(16)
        (Path(tmp) / "token").write_text(token)
        with ServerProcess(root, "--token-file", Path(tmp) / "token") as server:
            raw = asyncio.run(_load(server, ids, images, cfg, token))
    done = sum(len(v) for v in raw["latencies"].values())
    rss = raw["rss_mb"]
    return {"collection": str(collection), "items": len(ids), "clients": cfg.clients, "seconds": raw["seconds"],
            "writes": cfg.writes, "requests": done, "queries_per_second": done / raw["seconds"],
            "search_by_id": _percentiles(raw["latencies"]["id"]),
            "search_by_image": _percentiles(raw["latencies"]["image"]),
            "all": _percentiles(raw["latencies"]["id"] + raw["latencies"]["image"]),
            "errors": len(raw["errors"]), "first_errors": raw["errors"][:5], "deletes": raw["deletes"],
            "deleted_ids_returned": len(raw["leaks"]),
            "server_rss_mb": {"start": rss[0], "end": rss[-1], "max": max(rss), "samples": rss},
            "machine": machine_info()}


def format_serve_report(r: dict) -> str:
    def line(name, p):
        if not p["count"]:
            return f"{name:<16} no requests"
        return (f"{name:<16} {p['count']:>7,} requests  p50 {p['p50_ms']:.1f} ms  p95 {p['p95_ms']:.1f} ms  "
                f"p99 {p['p99_ms']:.1f} ms")
    rss = r["server_rss_mb"]
    return "\n".join([
        f"{r['clients']} clients for {r['seconds']:.1f} s against {r['items']:,} items"
        + (f", with {r['deletes']} deletes and adds while they ran" if r["writes"] else ""),
        f"{r['queries_per_second']:,.0f} queries/s; errors: {r['errors']}; deleted ids returned after their delete: "
        f"{r['deleted_ids_returned']}",
        line("search by id", r["search_by_id"]), line("search by image", r["search_by_image"]),
        line("all", r["all"]),
        f"server RSS: {rss['start']:.0f} MiB at the start, {rss['end']:.0f} MiB at the end, {rss['max']:.0f} MiB "
        f"at most", f"machine: {r['machine']['cpu']}, {r['machine']['cores']} cores"])

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
import tempfile
import time
from pathlib import Path

import numpy as np

from ..config import ServeBenchConfig
from ..serve.server import ServerProcess
from ..shards import Collection, linked_copy
from .sysinfo import machine_info

# The most requests one run may send, whatever --seconds says.
MAX_REQUESTS = 1_000_000


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


class _LoadRun:
    """Clients (and with `writes`, a writer) against the server through one httpx client, until the deadline;
    what they measured."""

    def __init__(self, server: ServerProcess, client, ids: list[int], images: list[bytes], cfg: ServeBenchConfig,
                 token: str):
        self.server, self.client, self.images, self.cfg = server, client, images, cfg
        self.auth = {"Authorization": f"Bearer {token}"}
        self.latencies = {"id": [], "image": []}
        self.errors, self.leaks = [], []
        self.rss = [_rss_mb(server.proc.pid)]
        self.deleted: dict[int, float] = {}          # id -> when its delete returned
        self.live = list(ids)
        self.rng = np.random.default_rng(cfg.seed)
        self.sent = 0
        self.deadline = time.monotonic() + cfg.seconds

    async def run(self) -> dict:
        began = time.monotonic()
        tasks = [self.one_client(c) for c in range(self.cfg.clients)] + [self.sample_rss()]
        await asyncio.gather(*tasks, *([self.writer()] if self.cfg.writes else []))
        return {"latencies": self.latencies, "errors": self.errors, "leaks": self.leaks, "rss_mb": self.rss,
                "seconds": time.monotonic() - began, "deletes": len(self.deleted)}

    async def one_client(self, c: int):
        import httpx
        local = np.random.default_rng([self.cfg.seed, c])
        while time.monotonic() < self.deadline and self.sent < MAX_REQUESTS:
            self.sent += 1
            began = time.monotonic()
            try:
                r, kind, item = await self.one_request(local)
            except httpx.TransportError as exc:         # counted, never a crash of the benchmark
                self.errors.append(f"connection: {type(exc).__name__} {exc}")
                continue
            if r.status_code == 404 and kind == "id" and item in self.deleted:
                continue        # deleted while this request was on its way: the right answer
            if r.status_code != 200:
                self.errors.append(f"{r.status_code} {r.text[:200]}")
                continue
            self.latencies[kind].append(time.monotonic() - began)
            gone = {i for i, t in self.deleted.items() if t < began}
            self.leaks.extend(h["id"] for h in r.json()["results"] if h["id"] in gone)

    async def one_request(self, local):
        """A search by image (an upload_share of them) or by a live id: (response, kind, the id or None)."""
        url = self.server.url + "/search"
        if local.random() < self.cfg.upload_share:
            image = self.images[local.integers(len(self.images))]
            return await self.client.post(url, params={"k": 10}, files={"image": ("q.png", image)}), "image", None
        item = int(self.live[local.integers(len(self.live))])
        return await self.client.post(url, params={"k": 10}, json={"id": item}), "id", item

    async def writer(self):
        """Each second, delete a live item and add an image, until 2 s before the deadline."""
        import httpx
        while time.monotonic() < self.deadline - 2:
            await asyncio.sleep(1.0)
            victim = int(self.live.pop(int(self.rng.integers(len(self.live)))))
            try:
                r = await self.client.delete(f"{self.server.url}/items/{victim}", headers=self.auth)
                if r.status_code != 200:
                    self.errors.append(f"delete {r.status_code} {r.text[:200]}")
                self.deleted[victim] = time.monotonic()
                image = self.images[int(self.rng.integers(len(self.images)))]
                r = await self.client.post(self.server.url + "/items", headers=self.auth,
                                           files=[("image", (f"w{len(self.deleted)}.png", image))])
                if r.status_code != 200:
                    self.errors.append(f"add {r.status_code} {r.text[:200]}")
            except httpx.TransportError as exc:
                self.errors.append(f"writer connection: {type(exc).__name__} {exc}")

    async def sample_rss(self):
        while time.monotonic() < self.deadline:
            await asyncio.sleep(1.0)
            self.rss.append(_rss_mb(self.server.proc.pid))


async def _load(server: ServerProcess, ids: list[int], images: list[bytes], cfg: ServeBenchConfig, token: str) -> dict:
    import httpx
    # Idle connections are dropped before the server's keep-alive (5 s) would close them under a request.
    limits = httpx.Limits(max_connections=cfg.clients + 4, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await _LoadRun(server, client, ids, images, cfg, token).run()


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
        root = linked_copy(Path(collection), Path(tmp) / "coll")
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

"""`hashsearch bench serve`: concurrent clients against `hashsearch serve` on 127.0.0.1.

The clients search by id for `seconds`, then by uploading an image for as
long, each kind timed on its own; with `writes`, a writer adds and deletes
items through the API all the while, and every search answer is checked
against the deletes that had returned before it was sent.  The clients run
on bench.http_load's lean client, so that on the server's own cores they
take as little of its CPU as they can.
The server runs in its own process (started and stopped here) on a copy of
the collection whose shards are hard links, so the collection itself is
never changed.  Every request loop is bounded in count and in time.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import tempfile
import time
from pathlib import Path

import numpy as np

from ..config import ServeBenchConfig
from ..serve.server import ServerProcess
from ..shards import Collection, linked_copy
from .http_load import Connection, HttpError, multipart, request_bytes
from .sysinfo import descendant_pids, machine_info

# The most requests one run may send, whatever --seconds says.
MAX_REQUESTS = 1_000_000


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:         # gone meanwhile
        return 0.0
    return float("nan")


def _server_rss_mb(server: ServerProcess) -> float:
    """The server's resident memory: its process and its workers'."""
    return sum(_rss_mb(pid) for pid in {server.proc.pid} | descendant_pids(server.proc.pid))


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
    """Clients against the server, one kind of search at a time (by id, then by upload), with a writer
    (with `writes`) across both; what they measured."""

    def __init__(self, server: ServerProcess, ids: list[int], images: list[bytes], cfg: ServeBenchConfig,
                 token: str):
        self.server, self.images, self.cfg = server, images, cfg
        self.host = f"127.0.0.1:{server.port}"
        self.auth = {"Authorization": f"Bearer {token}"}
        self.latencies = {"id": [], "image": []}
        self.elapsed = {"id": 0.0, "image": 0.0}
        self.errors, self.leaks = [], []
        self.rss = [_server_rss_mb(server)]
        self.deleted: dict[int, float] = {}          # id -> when its delete returned
        self.live = list(ids)
        self.rng = np.random.default_rng(cfg.seed)
        self.sent = 0
        self.running = False
        self.uploads = [multipart("image", "q.png", image) for image in images]

    async def run(self) -> dict:
        began = time.monotonic()
        self.running = True
        background = [asyncio.ensure_future(self.sample_rss())]
        if self.cfg.writes:
            background.append(asyncio.ensure_future(self.writer()))
        for kind in ("id", "image"):
            start = time.monotonic()
            deadline = start + self.cfg.seconds
            await asyncio.gather(*[self.one_client(c, kind, deadline) for c in range(self.cfg.clients)])
            self.elapsed[kind] = time.monotonic() - start
        self.running = False
        await asyncio.gather(*background)
        return {"latencies": self.latencies, "elapsed": self.elapsed, "errors": self.errors, "leaks": self.leaks,
                "rss_mb": self.rss, "seconds": time.monotonic() - began, "deletes": len(self.deleted)}

    def prepared(self, kind: str, local) -> tuple[bytes, int | None]:
        """One search request's bytes, and the id it searches by (None for an upload)."""
        if kind == "id":
            item = int(self.live[local.integers(len(self.live))])
            return request_bytes("POST", "/search?k=10", self.host, b'{"id": %d}' % item, "application/json"), item
        body, content_type = self.uploads[local.integers(len(self.uploads))]
        return request_bytes("POST", "/search?k=10", self.host, body, content_type), None

    async def one_client(self, c: int, kind: str, deadline: float):
        local = np.random.default_rng([self.cfg.seed, c, kind == "image"])
        connection = Connection("127.0.0.1", self.server.port)
        try:
            while time.monotonic() < deadline and self.sent < MAX_REQUESTS:
                self.sent += 1
                raw, item = self.prepared(kind, local)
                began = time.monotonic()
                try:
                    status, answer = await connection.request(raw)
                except HttpError as exc:            # counted, never a crash of the benchmark
                    self.errors.append(f"connection: {exc}")
                    continue
                if status == 404 and item in self.deleted:
                    continue        # deleted while this request was on its way: the right answer
                if status != 200:
                    self.errors.append(f"{status} {answer[:200]!r}")
                    continue
                self.latencies[kind].append(time.monotonic() - began)
                if self.deleted:
                    gone = {i for i, t in self.deleted.items() if t < began}
                    self.leaks.extend(h["id"] for h in json.loads(answer)["results"] if h["id"] in gone)
        finally:
            connection.close()

    async def writer(self):
        """Each second, delete a live item and add an image, while the clients run."""
        import httpx
        async with httpx.AsyncClient(timeout=60) as client:
            while self.running:
                await asyncio.sleep(1.0)
                if not self.running:
                    break
                victim = int(self.live.pop(int(self.rng.integers(len(self.live)))))
                try:
                    r = await client.delete(f"{self.server.url}/items/{victim}", headers=self.auth)
                    if r.status_code != 200:
                        self.errors.append(f"delete {r.status_code} {r.text[:200]}")
                    self.deleted[victim] = time.monotonic()
                    image = self.images[int(self.rng.integers(len(self.images)))]
                    r = await client.post(self.server.url + "/items", headers=self.auth,
                                          files=[("image", (f"w{len(self.deleted)}.png", image))])
                    if r.status_code != 200:
                        self.errors.append(f"add {r.status_code} {r.text[:200]}")
                except httpx.TransportError as exc:
                    self.errors.append(f"writer connection: {type(exc).__name__} {exc}")

    async def sample_rss(self):
        while self.running:
            await asyncio.sleep(1.0)
            self.rss.append(_server_rss_mb(self.server))


def _percentiles(seconds: list[float], elapsed: float) -> dict:
    if not seconds:
        return {"count": 0, "per_second": 0.0}
    ms = np.asarray(seconds) * 1e3
    return {"count": len(ms), "per_second": len(ms) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99))}


def model_throughput(coll: Collection, images: list[bytes], batch: int = 32, rounds: int = 3) -> float:
    """Images a second the collection's model encodes in batches of `batch`, in this process: what upload
    searches are held to."""
    from ..encoders.images import decode_image
    from ..retrieval import query_encoder
    encoder = query_encoder(coll)
    decoded = [decode_image(images[i % len(images)]) for i in range(batch)]
    encoder.encode(decoded)         # warm-up
    began = time.monotonic()
    for _ in range(rounds):
        encoder.encode(decoded)
    return rounds * batch / (time.monotonic() - began)


def run_serve_bench(collection, **options) -> dict:
    """Start a server on a linked copy of `collection`, load it as ServeBenchConfig says, stop it; the report."""
    cfg = ServeBenchConfig(**options)
    src = Collection.open(collection)
    images = _upload_images(src)
    ids = src.ids()[src.live_rows()].tolist()
    model_rate = model_throughput(src, images)
    with tempfile.TemporaryDirectory(prefix="hashsearch-serve-bench-", dir=Path(collection).parent) as tmp:
        root = linked_copy(Path(collection), Path(tmp) / "coll")
        token = secrets.token_hex(16)
        (Path(tmp) / "token").write_text(token)
        extra = [] if cfg.workers is None else ["--workers", cfg.workers]
        with ServerProcess(root, "--token-file", Path(tmp) / "token", *extra) as server:
            raw = asyncio.run(_LoadRun(server, ids, images, cfg, token).run())
    rss = raw["rss_mb"]
    by_id, by_image = (_percentiles(raw["latencies"][k], raw["elapsed"][k]) for k in ("id", "image"))
    return {"collection": str(collection), "items": len(ids), "clients": cfg.clients, "seconds": raw["seconds"],
            "workers": cfg.workers, "writes": cfg.writes, "search_by_id": by_id, "search_by_image": by_image,
            "model_images_per_second": model_rate, "uploads_vs_model": by_image["per_second"] / model_rate,
            "errors": len(raw["errors"]), "first_errors": raw["errors"][:5], "deletes": raw["deletes"],
            "deleted_ids_returned": len(raw["leaks"]),
            "server_rss_mb": {"start": rss[0], "end": rss[-1], "max": max(rss), "samples": rss},
            "machine": machine_info()}


def format_serve_report(r: dict) -> str:
    def line(name, p):
        if not p["count"]:
            return f"{name:<16} no requests"
        return (f"{name:<16} {p['per_second']:>8,.0f}/s  {p['count']:>8,} requests  p50 {p['p50_ms']:.1f} ms  "
                f"p95 {p['p95_ms']:.1f} ms  p99 {p['p99_ms']:.1f} ms")
    rss = r["server_rss_mb"]
    workers = "serve's default workers" if r["workers"] is None else f"{r['workers']} worker(s)"
    return "\n".join([
        f"{r['clients']} clients, {r['seconds']:.1f} s in all, against {r['items']:,} items, {workers}"
        + (f", with {r['deletes']} deletes and adds while they ran" if r["writes"] else ""),
        line("search by id", r["search_by_id"]), line("search by upload", r["search_by_image"]),
        f"the model alone, batches of 32 in this process: {r['model_images_per_second']:,.0f} images/s "
        f"(uploads reached {r['uploads_vs_model']:.0%} of it)",
        f"errors: {r['errors']}; deleted ids returned after their delete: {r['deleted_ids_returned']}",
        f"server RSS: {rss['start']:.0f} MiB at the start, {rss['end']:.0f} MiB at the end, {rss['max']:.0f} MiB "
        f"at most", f"machine: {r['machine']['cpu']}, {r['machine']['cores']} cores"])

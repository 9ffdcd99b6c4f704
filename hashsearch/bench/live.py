"""What a live collection costs: adding rows to a large collection, and searching with a delta and tombstones.

    hashsearch bench live [--n 1000000] [--add 10000] [--delta 0.1] [--deleted 0.05] [--queries 200]

It works on a copy of the synthetic bench collection (`bench --exhaustive`
makes it) whose shards are hard links: shards never change, so linking them
is safe and costs no space.  It reports:
  add     the time to append `--add` rows to the N-row collection, and to a
          collection of `--add` rows, then Index.refresh() after each;
  search  batch-1 hds latency with a multihash index built before `--delta`
          x N rows were added and `--deleted` x N deleted, against a fresh
          build-index over the same live rows, on the same queries.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..config import LiveBenchConfig
from ..engine import Index
from ..shards import Collection, CollectionWriter, delete_items, linked_copy
from .speed import K, time_calls
from .synthetic import BLOCK_ROWS, SyntheticModel, SyntheticSpec, default_cache_root, generate_collection, make_queries
from .sysinfo import machine_info


def append_synthetic(root: Path, model: SyntheticModel, rows: int, first_block: int) -> float:
    """Append `rows` freshly generated rows; the seconds the storage side took (generation excluded)."""
    blocks = [model.block(b % (model.spec.n // BLOCK_ROWS)) for b in range(first_block, first_block + -(-rows // BLOCK_ROWS))]
    began = time.perf_counter()
    writer = CollectionWriter.append(root)
    next_id, done = writer.manifest.get("next_id", 0), 0
    for x, codes, labels in blocks:
        m = min(len(x), rows - done)
        ids = np.arange(next_id + done, next_id + done + m)
        writer.add(codes[:m], x[:m], ids, labels[:m], [f"added:{i}" for i in ids], source_end=done + m,
                   source_index=np.arange(done, done + m))
        done += m
    writer.finish(done)
    return time.perf_counter() - began


def _time_add(root: Path, model: SyntheticModel, add: int, hash_bits: int) -> tuple[float, float]:
    """Seconds to append `add` rows to the indexed collection at `root`, then to refresh an open index."""
    Index.build(root, "multihash", hash_bits=hash_bits)
    index = Index.open(root)
    seconds = append_synthetic(root, model, add, 0)
    t = time.perf_counter()
    index.refresh()
    refresh = time.perf_counter() - t
    index.close()
    return seconds, refresh


def run_live_bench(n: int = LiveBenchConfig.n, add: int = LiveBenchConfig.add, delta: float = LiveBenchConfig.delta,
                   deleted: float = LiveBenchConfig.deleted, queries: int = LiveBenchConfig.queries,
                   hash_bits: int = LiveBenchConfig.hash_bits, pool: int = LiveBenchConfig.pool,
                   radius: int = LiveBenchConfig.radius) -> dict:
    LiveBenchConfig(n=n, add=add, delta=delta, deleted=deleted, queries=queries, hash_bits=hash_bits, pool=pool,
                    radius=radius)
    spec_root = default_cache_root() / SyntheticSpec(n=n).name
    base = generate_collection(spec_root, n, progress=True).root
    model = SyntheticModel(SyntheticSpec(n=n))
    out: dict = {"n": n, "add": add, "machine": machine_info()}
    with tempfile.TemporaryDirectory(dir=spec_root.parent) as tmp:
        tmp = Path(tmp)
        # -- add: into N rows, and into a collection as small as the addition ----------------------
        small = tmp / "small"
        generate_collection(small, add, progress=False)
        for name, root in (("n", linked_copy(base, tmp / "big")), ("small", small)):
            out[f"add_to_{name}_seconds"], out[f"refresh_after_add_to_{name}_seconds"] = \
                _time_add(root, model, add, hash_bits)
            shutil.rmtree(root)

        # -- search with a delta and tombstones, against a fresh build over the same live rows -------
        live_root = linked_copy(base, tmp / "live")
        Index.build(live_root, "multihash", hash_bits=hash_bits)
        append_synthetic(live_root, model, int(delta * n), 1)
        doomed = np.random.default_rng(0).choice(n, int(deleted * n), replace=False)
        delete_items(live_root, ids=np.sort(doomed))
        codes, feats, _ = make_queries(Collection.open(base), queries, seed=0)
        followed = Index.open(live_root)
        fresh_root = linked_copy(live_root, tmp / "fresh")
        fresh = Index.build(fresh_root, "multihash", hash_bits=hash_bits)
        out["live_items"] = followed.collection.items
        for name, index in (("followed", followed), ("fresh", fresh)):
            def search(a, b, index=index):
                return index.search(codes[a:b], feats[a:b], K, pool=pool, radius=radius).ids
            time_calls(search, queries, 1, max_passes=1)        # warm the page cache
            stats, results = time_calls(search, queries, 1)
            out[f"{name}_batch1"] = stats
            out[f"{name}_ids"] = np.concatenate(results)
        out["same_results"] = bool(np.array_equal(out.pop("followed_ids"), out.pop("fresh_ids")))
    return out


def format_live_report(result: dict) -> str:
    followed, fresh = result["followed_batch1"], result["fresh_batch1"]
    return "\n".join([
        f"append {result['add']:,} rows: {result['add_to_n_seconds']:.2f} s into {result['n']:,} rows, "
        f"{result['add_to_small_seconds']:.2f} s into {result['add']:,}; refresh after: "
        f"{result['refresh_after_add_to_n_seconds'] * 1e3:.1f} ms and "
        f"{result['refresh_after_add_to_small_seconds'] * 1e3:.1f} ms",
        f"batch-1 hds over {result['live_items']:,} live rows: followed index (delta + tombstones) "
        f"{followed['median_ms']:.3f} ms median, {followed['p95_ms']:.3f} ms p95; fresh build-index "
        f"{fresh['median_ms']:.3f} ms, {fresh['p95_ms']:.3f} ms; same results: {result['same_results']}",
        f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores"])

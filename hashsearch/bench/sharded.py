"""What partitioned search on Ray costs, against one process: `hashsearch bench sharded`.

    hashsearch bench sharded [--n 1000000] [--partitions 1,2,4] [--queries 200] [--batch 256]

It works on a copy of the synthetic bench collection (`bench exhaustive`
makes it) whose shards are hard links, with a multihash index at the 1M
headline settings, and times on the same held-out queries:
  single   Index.search in this process;
  P = ...  ShardedIndex over P partitions on a local Ray cluster of this
           machine's cores (distributed.ray_cluster), batch 1 and batched;
  merge    the driver's merge of the partitions' answers alone.
Every P's results are checked against the single index's.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ..config import ShardedBenchConfig
from ..engine import Index
from ..engine.index import search_params
from ..engine.kernels import merge_partitions
from ..errors import HashsearchError
from ..shards import Collection, linked_copy
from .speed import K, time_calls
from .synthetic import SyntheticSpec, default_cache_root, generate_collection, make_queries
from .sysinfo import machine_info, rss_breakdown_mb


def parse_partitions(text: str) -> list[int]:
    try:
        counts = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise HashsearchError(f"--partitions takes comma-separated counts such as 1,2,4, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise HashsearchError(f"--partitions takes positive counts such as 1,2,4, got {text!r}")
    return counts


def run_sharded_bench(**options) -> dict:
    from ..distributed import ShardedIndex, ray_cluster
    cfg = ShardedBenchConfig(**options)
    counts = parse_partitions(cfg.partitions)
    spec_root = default_cache_root() / SyntheticSpec(n=cfg.n).name
    base = generate_collection(spec_root, cfg.n, progress=True).root
    out: dict = {"n": cfg.n, "queries": cfg.queries, "batch": cfg.batch, "pool": cfg.pool, "radius": cfg.radius,
                 "hash_bits": cfg.hash_bits, "machine": machine_info(), "runs": []}
    codes, feats, _ = make_queries(Collection.open(base), cfg.queries, seed=0)
    params = dict(k=K, pool=cfg.pool, radius=cfg.radius)
    with tempfile.TemporaryDirectory(dir=spec_root.parent) as tmp:
        root = linked_copy(base, Path(tmp) / "c")
        with Index.build(root, "multihash", hash_bits=cfg.hash_bits) as single:
            out["single"], expected = _time(lambda a, b: single.search(codes[a:b], feats[a:b], **params), cfg)
        with ray_cluster():
            for p in counts:
                began = time.perf_counter()
                with ShardedIndex(root, p) as sharded:
                    run = {"partitions": p, "load_seconds": round(time.perf_counter() - began, 2)}
                    timed, _ = _time(lambda a, b: sharded.search(codes[a:b], feats[a:b], **params), cfg)
                    run.update(timed)
                    run["merge"] = _merge_cost(sharded, codes, feats, params)
                    run["actor_rss_mb"] = _actor_memory(sharded)
                    run["ray_call_ms"] = _ray_call_floor(sharded)
                    found = [sharded.search(codes[a:a + 1], feats[a:a + 1], **params).ids for a in range(cfg.queries)]
                    run["same_results"] = bool(np.array_equal(np.concatenate(found), expected))
                out["runs"].append(run)
    return out


def _time(search, cfg) -> tuple[dict, np.ndarray]:
    """{"batch1": stats, "batched": stats} per query, and the batch-1 pass's ids."""
    time_calls(search, cfg.queries, 1, max_passes=1)        # warm the page cache
    batch1, results = time_calls(search, cfg.queries, 1)
    batched, _ = time_calls(search, cfg.queries, cfg.batch)
    return {"batch1": batch1, "batched": batched}, np.concatenate([r.ids for r in results])


def _ray_call_floor(sharded) -> float:
    """Median ms of a call that does nothing on every partition's actor at once: Ray's own share."""
    import ray
    times = []
    for _ in range(200):
        t = time.perf_counter()
        ray.get([a.__ray_call__.remote(lambda _: None) for a in sharded.actors])
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def _actor_memory(sharded) -> list[dict]:
    """Each partition actor's resident memory now (anonymous: its codes and index; file: mapped shards)."""
    import ray
    return ray.get([a.__ray_call__.remote(lambda _: rss_breakdown_mb()) for a in sharded.actors])


def _merge_cost(sharded, codes, feats, params) -> dict:
    """Median ms of the driver's merge alone, for one query and for the whole batch of queries."""
    cost = {}
    for name, q in (("batch1_ms", slice(0, 1)), ("batched_ms_per_query", slice(None))):
        answers = sharded.partition_answers(codes[q], feats[q], search_params(**params))
        times = []
        for _ in range(200 if name == "batch1_ms" else 20):
            t = time.perf_counter()
            merge_partitions(answers.parts, answers.params.k, "hds", answers.params.pool)
            times.append(time.perf_counter() - t)
        cost[name] = float(np.median(times)) * 1e3 / len(codes[q])
    return cost


def format_sharded_report(result: dict) -> str:
    single = result["single"]
    lines = [f"{result['n']:,} rows, multihash {result['hash_bits']}-bit slices, pool {result['pool']}, radius "
             f"{result['radius']}, {result['queries']} queries; ms per query, median (p95)",
             f"{'':>14} {'batch 1':>18} {'batch ' + str(result['batch']):>18} {'merge, batch 1':>15} "
             f"{'no-op call':>10} {'load s':>7} {'same':>5}",
             f"{'single Index':>14} {single['batch1']['median_ms']:>8.3f} ({single['batch1']['p95_ms']:>7.3f})"
             f" {single['batched']['median_ms']:>8.3f} ({single['batched']['p95_ms']:>7.3f})"]
    for run in result["runs"]:
        lines.append(f"{'P = ' + str(run['partitions']):>14} {run['batch1']['median_ms']:>8.3f} "
                     f"({run['batch1']['p95_ms']:>7.3f}) {run['batched']['median_ms']:>8.3f} "
                     f"({run['batched']['p95_ms']:>7.3f}) {run['merge']['batch1_ms']:>15.3f} "
                     f"{run['ray_call_ms']:>10.3f} {run['load_seconds']:>7.1f} {str(run['same_results']):>5}")
    for run in result["runs"]:
        rss = ", ".join(f"{m['vmrss']:.0f}" for m in run["actor_rss_mb"])
        lines.append(f"P = {run['partitions']}: partition actors' resident MiB {rss}")
    lines.append(f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores")
    return "\n".join(lines)

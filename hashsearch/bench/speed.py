"""Speed of hierarchical search against the paper's exhaustive baseline.

One run times, on the same queries:
  exhaustive    a float32 faiss IndexFlatL2 over every F7 feature in RAM;
  hierarchical  Index.search mode hds (coarse Hamming pool, then L2 rerank);
  binary        Index.search mode bcs (Hamming ranking only).
Batch 1, one query per call as in the paper, is always timed; a batch
size above 1 adds a batched column.  Hierarchical and binary search first
run the whole query set once untimed, so the feature rows they read are in
the page cache (they are read with pread, never kept mapped, so "warm"
means no disk reads, not free reads); the exhaustive index is in RAM and
gets one untimed query.

The hierarchical and binary timings run in a child process that does
nothing else, so that its peak RSS is the honest memory cost of serving
search; it finishes before this process loads the exhaustive index (16 GB
at 1M x 4096), which would otherwise evict the features from the page cache.
"""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..engine import Index, load_flat_l2
from ..engine.sketch import SHORTLIST_PER_RESULT
from ..engine.threads import MAX_THREADS, faiss_threads
from ..errors import HashsearchError
from ..shards import SHARD_DIR, Collection
from ..shards.manifest import disk_bytes
from ..config import BenchData, ExhaustiveBenchConfig, SearchConfig
from .metrics import recall_at_k
from .synthetic import SyntheticSpec, default_cache_root, generate_collection, make_queries
from .sysinfo import machine_info, peak_rss_mb, rss_breakdown_mb

K = 10
# The searches every run times, in the order they are reported.
TIMED_SEARCHES = ("exhaustive", "hierarchical", "binary")
# Repeat a timed pass until it has run this long (more samples for fast methods) ...
MIN_TIMED_SECONDS = 1.0
# ... and time batch-1 exhaustive search only until this budget is spent (1.5 s a query at 1M).
EXHAUSTIVE_BUDGET_SECONDS = 60.0


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _stats(per_query_seconds: list[float], total_queries: int, total_seconds: float) -> dict:
    ms = np.asarray(per_query_seconds) * 1e3
    return {"median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)),
            "qps": total_queries / total_seconds if total_seconds > 0 else math.inf,
            "queries": total_queries}


def time_calls(search, nq: int, batch: int, *, min_seconds: float = MIN_TIMED_SECONDS, max_passes: int = 5,
               max_queries: int | None = None, max_seconds: float | None = None) -> tuple[dict, list]:
    """Time search(a, b) over the query range in calls of `batch`.

    Passes repeat until `min_seconds` have been timed (at most `max_passes`);
    `max_seconds` instead cuts the first pass short.  Returns (stats of
    per-query times, the first pass's results).  Each call contributes its time
    divided by its size, so batched and batch-1 numbers are both per query.
    """
    per_query, results, done, spent = [], [], 0, 0.0
    stop = nq if max_queries is None else min(nq, max_queries)
    for p in range(max_passes):
        for a in range(0, stop, batch):
            b = min(stop, a + batch)
            t = time.perf_counter()
            out = search(a, b)
            dt = time.perf_counter() - t
            per_query.append(dt / (b - a))
            done, spent = done + b - a, spent + dt
            if p == 0:
                results.append(out)
            if max_seconds is not None and spent >= max_seconds and len(per_query) >= 3:
                return _stats(per_query, done, spent), results
        if spent >= min_seconds:
            break
    return _stats(per_query, done, spent), results


# -- the child process: hierarchical and binary search -----------------------------
def _child(args: dict) -> dict:
    q = np.load(args["queries"])
    codes, feats = q["codes"], q["features"]
    nq, radius = len(codes), args["radius"]
    params = SearchConfig(k=K, pool=args["pool"], nflip=args["nflip"], neighbour_pool=args["neighbour_pool"],
                          neighbour_cells=args["neighbour_cells"])
    t = time.perf_counter()
    index = Index.open(args["collection"], args["index_dir"])
    open_seconds = time.perf_counter() - t

    def search(mode):
        # The radius bounds the rerank pool; binary search stays a plain top-K Hamming ranking.
        settings = dataclasses.replace(params, mode=mode, radius=radius if mode == "hds" else None)
        return lambda a, b: index.search(codes[a:b], feats[a:b], settings).rows

    out = {"open_seconds": open_seconds, "timings": {}, "features_in_ram": index.features_in_ram}
    out["neighbour_pool"], out["neighbour_cells"] = index.neighbour_sources(dataclasses.replace(params, radius=radius))
    for batch in args["batches"]:
        timing = out["timings"][str(batch)] = {}
        for method, mode in (("hierarchical", "hds"), ("binary", "bcs")):
            time_calls(search(mode), nq, batch, max_passes=1)      # warm-up: page cache, faiss, allocator
            timing[method], rows = time_calls(search(mode), nq, batch)
            if batch == 1:
                out[f"{mode}_rows"] = np.concatenate(rows).tolist()
    cand = index.rerank_pool(codes, feats, dataclasses.replace(params, radius=radius))
    out["mean_candidates"] = float((cand >= 0).sum(1).mean())
    sketched = index.shortlists and (out["neighbour_pool"] or out["neighbour_cells"]) and radius is None
    out["mean_f7_rows"] = float(np.minimum((cand >= 0).sum(1), SHORTLIST_PER_RESULT * K).mean()) if sketched \
        else out["mean_candidates"]
    out["rss_mb"] = peak_rss_mb()
    out["rss_end_mb"] = rss_breakdown_mb()
    return out


def _run_child(args: dict, workdir: Path) -> dict:
    spec = workdir / "child.json"
    spec.write_text(json.dumps(args))
    # A fresh interpreter (not fork, not multiprocessing, which re-imports the caller's
    # main module, e.g. the CLI) so its RSS holds only what search needs.
    proc = subprocess.run([sys.executable, "-m", "hashsearch.bench.speed", str(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or [""]
        refused = f"{HashsearchError.__module__}.{HashsearchError.__name__}: "
        if last[0].startswith(refused):        # the search refused its settings: the one line it gave
            raise HashsearchError(last[0][len(refused):])
        raise RuntimeError(f"benchmark child process failed:\n{proc.stderr[-4000:]}")
    return json.loads(Path(args["out"]).read_text())


# -- the whole benchmark ---------------------------------------------------------
def fastest_threads(call, tries: int) -> int:
    """1 or every core, whichever runs call() faster (best of `tries`)."""
    best = {}
    for _ in range(tries):
        for n in sorted({1, MAX_THREADS}):
            with faiss_threads(n):
                t = time.perf_counter()
                call()
                best[n] = min(best.get(n, math.inf), time.perf_counter() - t)
    return min(best, key=best.get)


def bench_data(cfg: BenchData, cache_dir: Path, progress: bool) -> dict:
    """The collection and the queries: held-out synthetic ones, or a seeded sample of a real collection's rows."""
    if cfg.collection is not None:
        coll = Collection.open(cfg.collection)
        if cfg.query_collection is not None:
            return {"coll": coll, **_held_out_queries(coll, cfg)}
        rows = np.sort(np.random.default_rng(cfg.seed).choice(coll.n, min(cfg.queries, coll.n), replace=False))
        return {"coll": coll, "codes": coll.codes()[rows], "features": coll.features(rows), "query_rows": rows,
                "source": "collection rows (each query is also in the database, so it is its own top hit)",
                "generate_seconds": None}
    if cfg.query_collection is not None:
        raise HashsearchError("--query-collection is for --collection runs")
    spec = SyntheticSpec(n=cfg.n, dim=cfg.dim, bits=cfg.bits, seed=cfg.seed, codes=cfg.synthetic_codes)
    t = time.perf_counter()
    coll = generate_collection(cache_dir / spec.name, cfg.n, cfg.dim, cfg.bits, cfg.seed, progress=progress,
                               codes=cfg.synthetic_codes)
    seconds = time.perf_counter() - t
    _log(progress, f"collection {coll.root} ready in {seconds:.1f} s")
    codes, feats, _ = make_queries(coll, cfg.queries, cfg.seed)
    return {"coll": coll, "codes": codes, "features": feats, "query_rows": None, "generate_seconds": seconds,
            "source": f"synthetic ({cfg.synthetic_codes} codes): held-out fresh members of near-duplicate groups"}


def _held_out_queries(coll: Collection, cfg: BenchData) -> dict:
    """A seeded sample of another collection's rows, encoded by the same model, as queries."""
    with Collection.open(cfg.query_collection) as queries:
        if (queries.bits, queries.feature_dim) != (coll.bits, coll.feature_dim) or \
                queries.manifest.get("model_fingerprint") != coll.manifest.get("model_fingerprint"):
            raise HashsearchError(f"{cfg.query_collection} was not encoded by the model of {coll.root}")
        live = queries.live_rows()
        rows = np.sort(np.random.default_rng(cfg.seed).choice(live, min(cfg.queries, len(live)), replace=False))
        return {"codes": queries.codes()[rows], "features": queries.features(rows), "query_rows": None,
                "source": f"held-out rows of {queries.root}", "generate_seconds": None}


def run_exhaustive_bench(*, exhaustive_queries: int | None = None, progress: bool = True, **settings) -> dict:
    """Time exhaustive, hierarchical and binary search; see the module docstring.

    `settings` are ExhaustiveBenchConfig's fields; one given as None takes its default (pool and
    coarse: those recommended for 1M rows; the README's headline also narrows the coarse slices with
    hash_bits=18 and bounds the pool with radius=12).  `radius` drops the pool's candidates beyond that
    Hamming distance, the paper's threshold (Index.search's radius).  `exhaustive_queries` caps the
    batch-1 exhaustive timing (default: as many queries as fit in EXHAUSTIVE_BUDGET_SECONDS, at least 3);
    its top-10 for every query still comes from the batched pass.
    """
    cfg = _settings(**settings)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_root()
    cache_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    setup = bench_data(cfg, cache_dir, progress)
    batches = [1] if cfg.batch == 1 else [1, cfg.batch]
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="bench-run-") as tmp:
        searched = _time_search(setup, cfg, batches, Path(tmp), progress)
    exhaustive = _time_exhaustive(setup["coll"], setup["features"], cfg.batch, exhaustive_queries, progress)
    result = _summary(cfg, setup, searched, exhaustive, batches)
    result["total_seconds"] = time.perf_counter() - start
    result["machine"] = machine_info()
    return result


def _settings(**given) -> ExhaustiveBenchConfig:
    # None is "not given" (the CLI passes None for an option left out): the config's default, checked like the rest.
    return ExhaustiveBenchConfig(**{k: v for k, v in given.items() if v is not None})


# -- stage: hierarchical and binary search, timed in a child process -----------------
def _time_search(setup: dict, cfg: ExhaustiveBenchConfig, batches: list, workdir: Path, progress: bool) -> dict:
    """Build the coarse index in `workdir`, then run _child on it: its output plus the build's costs."""
    coll, nq = setup["coll"], len(setup["codes"])
    params = {k: v for k, v in (("hash_bits", cfg.hash_bits), ("nhash", cfg.nhash), ("nflip", cfg.nflip))
              if v is not None}
    params.update(cfg.build_options())
    _log(progress, f"building {cfg.coarse} index over {coll.n:,} codes")
    t = time.perf_counter()
    index = Index.build(coll, cfg.coarse, out=workdir / "index", **params)
    built = {"build_seconds": time.perf_counter() - t, "coarse": index.meta["coarse"],
             "neighbour_bits": index.meta.get("neighbour_bits", 0), "index_bytes": disk_bytes(workdir / "index")}
    del index
    np.savez(workdir / "queries.npz", codes=setup["codes"], features=setup["features"])
    _log(progress, f"hierarchical and binary search in a child process ({nq} queries, pool {cfg.pool})")
    child = _run_child({"collection": str(coll.root), "index_dir": str(workdir / "index"),
                        "queries": str(workdir / "queries.npz"), "pool": cfg.pool, "radius": cfg.radius,
                        "nflip": cfg.nflip, "neighbour_pool": cfg.neighbour_pool,
                        "neighbour_cells": cfg.neighbour_cells, "batches": batches,
                        "out": str(workdir / "child.out.json")}, workdir)
    return {**built, **child}


# -- stage: the exhaustive baseline, which is also the ground truth --------------------
def _time_exhaustive(coll: Collection, qfeats: np.ndarray, batch: int, exhaustive_queries: int | None,
                     progress: bool) -> dict:
    """Time IndexFlatL2 over every feature in RAM; its top-K of every query is the ground truth."""
    _log(progress, f"loading the exhaustive IndexFlatL2 ({coll.n * coll.feature_dim * 4 / 1e9:.1f} GB float32)")
    t = time.perf_counter()
    flat = load_flat_l2(coll)
    load_seconds = time.perf_counter() - t

    def search(a, b):
        return flat.search(qfeats[a:b], K)[1]

    search(0, 1)
    threads = _exhaustive_threads(search, batch, len(qfeats))
    timings, truth = _ground_truth(search, len(qfeats), batch, threads, progress)
    _log(progress, f"exhaustive search, batch 1, {threads['1']} thread(s)")
    budget = EXHAUSTIVE_BUDGET_SECONDS if exhaustive_queries is None else None
    with faiss_threads(threads["1"]):
        timings["1"], _ = time_calls(search, len(qfeats), 1, max_passes=1, max_queries=exhaustive_queries,
                                     max_seconds=budget)
    return {"timings": timings, "truth": truth, "threads": threads, "load_seconds": load_seconds,
            "bytes": coll.n * coll.feature_dim * 4, "rss_mb": peak_rss_mb()}


def _exhaustive_threads(search, batch: int, nq: int) -> dict:
    # OpenMP stalls when other processes share the cores (see Index._run), so the
    # faiss default of every core can be several times slower than one: give the
    # baseline whichever is faster here and now, and report which.
    threads = {"1": fastest_threads(lambda: search(0, 1), tries=2)}
    if batch > 1:
        threads[str(batch)] = fastest_threads(lambda: search(0, min(nq, batch, 64)), tries=1)
    return threads


def _ground_truth(search, nq: int, batch: int, threads: dict, progress: bool) -> tuple[dict, np.ndarray]:
    """The exhaustive top-K rows [nq, K], and its batched timing {str(batch): stats} when batch > 1."""
    if batch == 1:
        with faiss_threads(MAX_THREADS):
            return {}, np.concatenate([search(a, a + 256) for a in range(0, nq, 256)])
    _log(progress, f"exhaustive search, batched, {threads[str(batch)]} thread(s) (also the ground truth)")
    with faiss_threads(threads[str(batch)]):
        stats, rows = time_calls(search, nq, batch, max_passes=3)
    return {str(batch): stats}, np.concatenate(rows)


# -- stage: the result ------------------------------------------------------------------
def _summary(cfg: ExhaustiveBenchConfig, setup: dict, searched: dict, exhaustive: dict, batches: list) -> dict:
    """The result dict of run_exhaustive_bench: settings, costs, timings per batch, headline numbers, recall."""
    coll = setup["coll"]
    result = {"n": coll.n, "dim": coll.feature_dim, "bits": coll.bits, "k": K, "queries": len(setup["codes"]),
              "batch": cfg.batch, "pool": cfg.pool, "radius": cfg.radius, "source": setup["source"],
              "neighbour_pool": searched["neighbour_pool"], "neighbour_cells": searched["neighbour_cells"],
              "collection": str(coll.root), "seed": cfg.seed, "generate_seconds": setup["generate_seconds"],
              "collection_bytes": disk_bytes(coll.root / SHARD_DIR)}
    if setup["query_rows"] is not None:
        result["query_rows"] = setup["query_rows"].tolist()
    result.update({key: searched[key] for key in ("build_seconds", "coarse", "index_bytes", "neighbour_bits")})
    result.update(exhaustive_load_seconds=exhaustive["load_seconds"], exhaustive_bytes=exhaustive["bytes"],
                  exhaustive_threads=exhaustive["threads"], exhaustive_rss_mb=exhaustive["rss_mb"])
    result["timings"] = _timings(searched["timings"], exhaustive["timings"], batches)
    result.update(_headline(result["timings"], cfg.batch))
    truth, hds, bcs = exhaustive["truth"], searched["hds_rows"], searched["bcs_rows"]
    result.update(recall_at_10=recall_at_k(hds, truth), recall_at_10_binary=recall_at_k(bcs, truth),
                  top10={"exhaustive": truth.tolist(), "hierarchical": hds, "binary": bcs})
    result.update({key: searched[key] for key in ("open_seconds", "rss_mb", "rss_end_mb", "mean_candidates",
                                                  "mean_f7_rows", "features_in_ram")})
    return result


def _timings(searched: dict, exhaustive: dict, batches: list) -> dict:
    """Per batch size: the stats of each timed search, and the speedup of hierarchical over exhaustive."""
    timings = {}
    for b in map(str, batches):
        t = timings[b] = {**searched[b], "exhaustive": exhaustive[b]}
        t["speedup"] = t["exhaustive"]["median_ms"] / t["hierarchical"]["median_ms"]
    return timings


def _headline(timings: dict, batch: int) -> dict:
    """The numbers at the benchmark's own batch size, flat, plus the batch-1 speedup."""
    main = timings[str(batch)]
    out = {}
    for method in TIMED_SEARCHES:
        out.update({f"{method}_ms": main[method]["median_ms"], f"{method}_p95_ms": main[method]["p95_ms"],
                    f"{method}_qps": main[method]["qps"]})
    return {**out, "speedup": main["speedup"], "speedup_batch1": timings["1"]["speedup"]}


# -- reporting --------------------------------------------------------------------
def _coarse_text(c: dict) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in c.items() if k != "kind")
    return f"{c['kind']}({extra})" if extra else c["kind"]


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000


def format_report(result: dict) -> str:
    r = result
    batches = sorted(int(b) for b in r["timings"])
    head = f"{'method':<14}" + "".join(f"{'batch ' + str(b) + ': median ms':>24}{'p95 ms':>10}{'q/s':>10}"
                                       for b in batches)
    lines = [f"n={r['n']:,}  dim={r['dim']}  bits={r['bits']}  queries={r['queries']}  k={r['k']}  "
             f"coarse={_coarse_text(r['coarse'])}  pool={r['pool']}"
             + (f"  radius={r['radius']}" if r.get("radius") is not None else ""),
             f"queries: {r['source']}", "", head, "-" * len(head)]
    for method in TIMED_SEARCHES:
        row = f"{method:<14}"
        for b in batches:
            s = r["timings"][str(b)][method]
            row += f"{s['median_ms']:>24.4g}{s['p95_ms']:>10.4g}{s['qps']:>10,.0f}"
        lines.append(row)
    e1 = r["timings"]["1"]["exhaustive"]["queries"]
    lines += ["", "speedup (exhaustive / hierarchical): "
              + ", ".join(f"{r['timings'][str(b)]['speedup']:,.0f}x at batch {b}" for b in batches),
              f"recall@10 of hierarchical vs exhaustive top-10: {r['recall_at_10']:.3f}"
              f"   (binary only: {r['recall_at_10_binary']:.3f})",
              f"candidates per query: {r['mean_candidates']:.1f} (pool {r['pool']}, neighbour pool "
              f"{r['neighbour_pool']} of {r['neighbour_bits']}-bit neighbour codes, {r['neighbour_cells']} "
              f"sketch cells); by L2 on F7: "
              f"{r['mean_f7_rows']:.1f}" + (" (the sketch's nearest)" if r['mean_f7_rows'] < r['mean_candidates'] else ""),
              f"search process peak RSS: {r['rss_mb']:,.0f} MiB   index open: {r['open_seconds']:.3f} s"
              f"   index build: {r['build_seconds']:.2f} s",
              f"on disk: index {_bytes(r['index_bytes'])}, collection {_bytes(r['collection_bytes'])};"
              f" exhaustive index in RAM {_bytes(r['exhaustive_bytes'])} (loaded in {r['exhaustive_load_seconds']:.1f} s,"
              f" peak RSS {r['exhaustive_rss_mb']:,.0f} MiB)",
              f"batch-1 exhaustive timed on {e1} of {r['queries']} queries; faiss threads for exhaustive "
              f"(faster of 1 and all, per batch size): "
              + ", ".join(f"{n} at batch {b}" for b, n in r["exhaustive_threads"].items()),
              "hierarchical and binary timed after one untimed pass ("
              + ("features held in RAM)" if r.get("features_in_ram") else "features page-cached, read by pread)")]
    m = r["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, faiss {m['faiss']} "
                 f"({m['faiss_options']}), numpy {m['numpy']}; load average {m['load_average'][0]:.2f} at the end"
                 if m.get("load_average") else
                 f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, faiss {m['faiss']}, numpy {m['numpy']}")
    return "\n".join(lines)


# -- scaling ----------------------------------------------------------------------
def run_scaling(ns=(10_000, 100_000, 1_000_000), **kwargs) -> list[dict]:
    """run_exhaustive_bench at each N (synthetic collections only), same other settings."""
    if kwargs.get("collection") is not None:
        raise HashsearchError("--scaling generates its own collections; it cannot use --collection")
    return [run_exhaustive_bench(n=n, **kwargs) for n in ns]


def plot_scaling(results: list[dict], png) -> None:
    from .plots import pyplot, save_png
    plt = pyplot()
    ns = [r["n"] for r in results]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    batches = sorted({int(b) for r in results for b in r["timings"]})
    for method, color in zip(TIMED_SEARCHES, ("tab:red", "tab:blue", "tab:green")):
        for b, style in zip(batches, ("o-", "s--")):
            ys = [r["timings"][str(b)][method]["median_ms"] for r in results]
            ax.plot(ns, ys, style, color=color, label=f"{method}, batch {b}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("collection size N")
    ax.set_ylabel("median ms per query")
    r0 = results[0]
    ax.set_title(f"Search latency vs N ({r0['dim']}-d F7, {r0['bits']}-bit codes, "
                 f"{r0['coarse']['kind']} coarse, pool {r0['pool']})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    save_png(fig, png)
    plt.close(fig)


if __name__ == "__main__":
    # The child process of run_exhaustive_bench: python -m hashsearch.bench.speed SPEC.json
    child_args = json.loads(Path(sys.argv[1]).read_text())
    Path(child_args["out"]).write_text(json.dumps(_child(child_args)))

"""hashsearch against what a user would pick instead: `hashsearch bench peers`.

    hashsearch bench peers [--n 1000000] [--dim 4096] [--bits 128] [--queries 200] [--collection DIR]
                           [--methods all] [--json FILE] [--plot FILE.png]

Every method searches the same collection (the synthetic one of `bench
exhaustive`, or --collection) for the same queries, and is scored against the
same ground truth: the exhaustive top 10 by exact L2 on F7.  Each runs in a
fresh interpreter of its own, so its resident memory is its own.  Each sweeps
its knob from cheap to dear and keeps the fastest setting whose recall@10
reaches RECALL_TARGET; that setting is then timed at batch 1 and batched.

  hashsearch          multihash over the codes, then exact L2 on the pool's F7 rows (Index)
  faiss-binary-hnsw   faiss IndexBinaryHNSW over the codes, the same rerank
  usearch-hamming     usearch HNSW over the codes (Hamming), the same rerank
  milvus-lite         milvus-lite, BIN_FLAT index with HAMMING metric, the same rerank
  faiss-ivf-sqfp16    faiss IVF,SQfp16 over the float features, all in RAM
  faiss-ivf-pq        faiss IVF,PQ over the float features, then exact L2 on the shortlist's F7 rows
  hnswlib             hnswlib HNSW over the float features (all in RAM as float32); past HNSWLIB_MAX_ROWS,
                      only its build is measured, on a sample, and projected to N

The peers are in the `peers` extra (pip install 'hashsearch[peers]'); a method whose package is missing is
reported as skipped.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..config import HeadlineSearch, PeersBenchConfig
from ..engine import Index, scan_knn
from ..engine.generation import feature_reader
from ..engine.rerank import PerThreadRerankers
from ..engine.threads import MAX_THREADS, QuerySplitter, faiss_threads
from ..errors import HashsearchError
from ..shards import SHARD_DIR, Collection, linked_copy
from ..shards.manifest import disk_bytes
from .metrics import recall_at_k
from .speed import K, bench_data, time_calls
from .synthetic import default_cache_root
from .sysinfo import descendant_pids, machine_info, peak_rss_mb

# The bar every method is tuned to: recall@10 against the exhaustive top 10.
RECALL_TARGET = 0.95
# hnswlib keeps float32 vectors and its graph in RAM: 16 GB and more at 1M x 4096-d, past this machine.
HNSWLIB_MAX_ROWS = 200_000
HNSWLIB_SAMPLE_ROWS = 20_000
# IVF: about sqrt(N) lists (1,024 at 1M), trained on 40 rows a list (faiss asks for 39 or more).  4 sqrt(N),
# faiss's usual advice, would take k-means over 164k x 4096-d rows at 1M: most of an hour on 2 cores.
IVF_TRAIN_PER_LIST = 40


def _ivf_lists(n: int) -> int:
    return max(16, min(4096, 2 ** round(math.log2(math.sqrt(n)))))


def _float_blocks(coll: Collection, block_rows: int = 16384):
    for first, block in coll.iter_feature_blocks(block_rows):
        yield first, np.ascontiguousarray(block, np.float32)


def _training_sample(coll: Collection, rows: int, seed: int = 0) -> np.ndarray:
    take = np.sort(np.random.default_rng(seed).choice(coll.n, min(rows, coll.n), replace=False))
    return coll.features(take)


class _Rerank:
    """Exact L2 on F7 over each query's candidate rows, as Index's fine level does; batches over the cores."""

    def __init__(self, coll: Collection):
        self.coll, self.reader, self.ids = coll, feature_reader(coll), coll.ids()
        self.splitter, self.rerankers = QuerySplitter(), PerThreadRerankers()

    def top(self, feats: np.ndarray, candidates: np.ndarray, k: int = K) -> np.ndarray:
        out = np.full((len(feats), k), -1, np.int64)

        def work(a, b):
            rr = self.rerankers.get(self.reader)
            dist, rows = np.empty(k, np.float32), np.empty(k, np.int64)
            for q in range(a, b):
                cand = candidates[q]
                cand = np.sort(cand[cand >= 0])
                dist[:], rows[:] = np.inf, -1
                found = rr.search(feats[q:q + 1], cand, dist, rows)
                out[q, :len(found)] = self.ids[rows[:len(found)]]
        self.splitter.run(work, len(feats))
        return out


# -- the methods ------------------------------------------------------------------------------------
class HashsearchMethod:
    name, params_name = "hashsearch", "pool, radius, neighbour pool, neighbour cells"
    # H's pool alone (the paper's coarse stage), then with the neighbour codes' pool beside it, then with the
    # sketch's cells (engine/cells.py; searched only where F7 is in RAM, so not at 1M x 4096-d).
    knobs = [(8, 12, 0, 0), (16, 12, 0, 0), (32, 12, 0, 0), (32, None, 0, 0), (128, None, 0, 0), (8, None, 16, 0),
             (8, None, 32, 0), (16, None, 64, 0), (32, None, 128, 0), (64, None, 256, 0), (200, None, 500, 0),
             (32, None, 0, 4), (32, None, 0, 8), (32, None, 0, 16), (32, None, 0, 32), (32, None, 250, 8),
             (0, None, 32, 0), (0, None, 64, 0), (0, None, 128, 0)]     # the neighbour codes alone
    index_options: dict = {}        # neighbour_bits and neighbour_coarse, as bench peers was given them

    def build(self, coll: Collection, work: Path) -> int:
        root = linked_copy(coll.root, work / "coll")
        self.index = Index.build(root, "multihash", hash_bits=_multihash_bits(coll), **self.index_options)
        if not self.index.meta.get("neighbour_bits"):       # --neighbour-bits 0: H's pool is all there is
            self.knobs = [knob for knob in self.knobs if knob[0]]
        return disk_bytes(root)

    def search(self, codes, feats, knob):
        pool, radius, neighbour_pool, neighbour_cells = knob
        return self.index.search(codes, feats, K, pool=pool, radius=radius, neighbour_pool=neighbour_pool,
                                 neighbour_cells=neighbour_cells).ids


def _multihash_bits(coll: Collection) -> int:
    # bench exhaustive's 1M setting, scaled down with N as default_hash_bits scales it
    return max(8, min(HeadlineSearch.hash_bits, int(round(math.log2(max(coll.n, 2) / 4)))))


class _BinaryCandidates:
    """A peer's index over the codes gives the pool; the rerank is hashsearch's."""
    pools = (16, 32, 64, 128)

    def build(self, coll: Collection, work: Path) -> int:
        self.rerank = _Rerank(coll)
        started = self._build(coll.codes(), coll.bits, work)
        return started + disk_bytes(coll.root / SHARD_DIR)

    def search(self, codes, feats, knob):
        return self.rerank.top(feats, self._candidates(codes, knob))


class FaissBinaryHNSW(_BinaryCandidates):
    name, params_name = "faiss-binary-hnsw", "efSearch, pool"
    knobs = [(ef, pool) for pool in (32, 64) for ef in (32, 64, 128, 256)]

    def _build(self, codes, bits, work) -> int:
        import faiss
        self.index = faiss.IndexBinaryHNSW(codes.shape[1] * 8, 16)
        with faiss_threads(MAX_THREADS):
            self.index.add(codes)
        path = work / "hnsw.faissindex"
        faiss.write_index_binary(self.index, str(path))
        return path.stat().st_size

    def _candidates(self, codes, knob):
        ef, pool = knob
        self.index.hnsw.efSearch = max(ef, pool)
        with faiss_threads(1 if len(codes) == 1 else MAX_THREADS):
            return self.index.search(codes, pool)[1]


class UsearchHamming(_BinaryCandidates):
    name, params_name = "usearch-hamming", "expansion, pool"
    knobs = [(ef, pool) for pool in (32, 64) for ef in (32, 64, 128, 256)]

    def _build(self, codes, bits, work) -> int:
        from usearch.index import Index as UIndex
        self.index = UIndex(ndim=codes.shape[1] * 8, metric="hamming", dtype="b1", connectivity=16)
        self.index.add(np.arange(len(codes)), codes, threads=MAX_THREADS)
        path = work / "usearch.index"
        self.index.save(str(path))
        return path.stat().st_size

    def _candidates(self, codes, knob):
        ef, pool = knob
        self.index.expansion_search = max(ef, pool)
        found = self.index.search(codes, pool, threads=1 if len(codes) == 1 else MAX_THREADS)
        keys = np.asarray(found.keys, np.int64).reshape(len(codes), -1)
        # one query gives Matches (no counts), a batch BatchMatches
        counts = np.asarray(getattr(found, "counts", [len(found.keys)])).reshape(-1)
        return np.where(np.arange(keys.shape[1])[None] < counts[:, None], keys, -1)


class MilvusLite(_BinaryCandidates):
    name, params_name = "milvus-lite", "pool"
    knobs = [(16,), (32,), (64,), (128,)]

    def _build(self, codes, bits, work) -> int:
        from pymilvus import DataType, MilvusClient
        self.db = work / "milvus.db"
        self.client = MilvusClient(str(self.db))
        schema = self.client.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("code", DataType.BINARY_VECTOR, dim=codes.shape[1] * 8)
        params = self.client.prepare_index_params()
        params.add_index(field_name="code", index_type="BIN_FLAT", metric_type="HAMMING")
        self.client.create_collection("c", schema=schema, index_params=params)
        for a in range(0, len(codes), 10_000):
            self.client.insert("c", [{"id": i, "code": codes[i].tobytes()} for i in range(a, min(len(codes), a + 10_000))])
        self.client.load_collection("c")
        return disk_bytes(work)

    def _candidates(self, codes, knob):
        (pool,) = knob
        hits = self.client.search("c", data=[c.tobytes() for c in codes], limit=pool, anns_field="code",
                                  search_params={"metric_type": "HAMMING"})
        out = np.full((len(codes), pool), -1, np.int64)
        for q, found in enumerate(hits):
            ids = [h["id"] for h in found]
            out[q, :len(ids)] = ids
        return out


class FaissIVFSQ:
    name, params_name = "faiss-ivf-sqfp16", "nprobe"
    knobs = [(1,), (2,), (4,), (8,), (16,), (32,), (64,)]

    def build(self, coll: Collection, work: Path) -> int:
        import faiss
        lists = _ivf_lists(coll.n)
        self.index = faiss.index_factory(coll.feature_dim, f"IVF{lists},SQfp16")
        self._fill(coll, lists)
        self.ids = coll.ids()
        path = work / "ivf.faissindex"
        faiss.write_index(self.index, str(path))
        return path.stat().st_size

    def _fill(self, coll, lists):
        with faiss_threads(MAX_THREADS):
            self.index.train(_training_sample(coll, lists * IVF_TRAIN_PER_LIST))
            for _, block in _float_blocks(coll):
                self.index.add(block)

    def _search(self, feats, nprobe, k):
        self.index.nprobe = nprobe
        with faiss_threads(1 if len(feats) == 1 else MAX_THREADS):
            return self.index.search(np.ascontiguousarray(feats, np.float32), k)[1]

    def search(self, codes, feats, knob):
        found = self._search(feats, knob[0], K)
        return np.where(found >= 0, self.ids[np.maximum(found, 0)], -1)


class FaissIVFPQ(FaissIVFSQ):
    name, params_name = "faiss-ivf-pq", "nprobe, shortlist"
    knobs = [(nprobe, short) for short in (50, 100, 200) for nprobe in (4, 8, 16, 32, 64)]

    def build(self, coll: Collection, work: Path) -> int:
        import faiss
        lists = _ivf_lists(coll.n)
        # 64 sub-quantisers: 64 bytes a vector, 4x a 128-bit code
        self.index = faiss.index_factory(coll.feature_dim, f"IVF{lists},PQ64")
        self._fill(coll, lists)
        self.rerank = _Rerank(coll)
        path = work / "ivfpq.faissindex"
        faiss.write_index(self.index, str(path))
        return path.stat().st_size + disk_bytes(coll.root / SHARD_DIR)

    def search(self, codes, feats, knob):
        nprobe, shortlist = knob
        return self.rerank.top(feats, self._search(feats, nprobe, shortlist))


class Hnswlib:
    name, params_name = "hnswlib", "ef"
    knobs = [(16,), (32,), (64,), (128,), (256,)]

    def build(self, coll: Collection, work: Path) -> int:
        import hnswlib
        rows = coll.n if coll.n <= HNSWLIB_MAX_ROWS else HNSWLIB_SAMPLE_ROWS
        self.index = hnswlib.Index(space="l2", dim=coll.feature_dim)
        self.index.init_index(max_elements=rows, ef_construction=200, M=16)
        self.index.set_num_threads(MAX_THREADS)
        done = 0
        for first, block in _float_blocks(coll):
            take = block[:rows - done]
            self.index.add_items(take, np.arange(first, first + len(take)))
            done += len(take)
            if done >= rows:
                break
        self.ids = coll.ids()
        self.projected = rows < coll.n
        path = work / "hnswlib.bin"
        self.index.save_index(str(path))
        return path.stat().st_size

    def search(self, codes, feats, knob):
        self.index.set_ef(max(knob[0], K))
        self.index.set_num_threads(1 if len(feats) == 1 else MAX_THREADS)
        labels, _ = self.index.knn_query(np.ascontiguousarray(feats, np.float32), K)
        return self.ids[labels.astype(np.int64)]


METHODS = {m.name: m for m in (HashsearchMethod, FaissBinaryHNSW, UsearchHamming, MilvusLite, FaissIVFSQ,
                               FaissIVFPQ, Hnswlib)}
_PACKAGES = {"usearch-hamming": "usearch", "milvus-lite": "pymilvus", "hnswlib": "hnswlib"}


# -- one method, in its own process -------------------------------------------------------------------
def _run_method(spec: dict) -> dict:
    q = np.load(spec["queries"])
    codes, feats, truth = q["codes"], q["features"], q["truth"]
    nq, batch = len(codes), spec["batch"]
    coll = Collection.open(spec["collection"])
    method = METHODS[spec["method"]]()
    if isinstance(method, HashsearchMethod):
        method.index_options = spec["index_options"]
    work = Path(spec["work"])
    t = time.perf_counter()
    disk = method.build(coll, work)
    out = {"method": method.name, "build_s": round(time.perf_counter() - t, 2), "disk_bytes": int(disk),
           "params_name": method.params_name, "sweep": []}
    if getattr(method, "projected", False):
        # Only a sample was built: N log N from its measured rate, and nothing searched.
        rate = out["build_s"] / HNSWLIB_SAMPLE_ROWS
        out.update(projected=True, sample_rows=HNSWLIB_SAMPLE_ROWS, sample_build_s=out["build_s"],
                   build_s=round(rate * coll.n * math.log(coll.n) / math.log(HNSWLIB_SAMPLE_ROWS), 1),
                   disk_bytes=int(disk / HNSWLIB_SAMPLE_ROWS * coll.n), rss_mb=None)
        return out
    chosen = None
    for knob in method.knobs:
        method.search(codes[:1], feats[:1], knob)                       # warm-up
        stats, found = time_calls(lambda a, b: method.search(codes[a:b], feats[a:b], knob), nq, 1, max_passes=1)
        recall = recall_at_k(np.concatenate(found), truth)
        out["sweep"].append({"params": list(knob), "recall_at_10": recall, "batch1_ms": stats["median_ms"]})
        if recall >= RECALL_TARGET and (chosen is None or stats["median_ms"] < chosen[1]):
            chosen = (knob, stats["median_ms"], recall)
    if chosen is None:      # none reached the target: report the best recall it had
        best = max(out["sweep"], key=lambda s: s["recall_at_10"])
        chosen = (tuple(best["params"]), best["batch1_ms"], best["recall_at_10"])
    knob = chosen[0]
    search = lambda a, b: method.search(codes[a:b], feats[a:b], knob)   # noqa: E731
    batch1, _ = time_calls(search, nq, 1)
    batched, _ = time_calls(search, nq, batch)
    out.update(params=list(knob), recall_at_10=chosen[2], reached_target=chosen[2] >= RECALL_TARGET,
               batch1_ms=batch1["median_ms"], batch1_p95_ms=batch1["p95_ms"], batched_qps=batched["qps"],
               rss_mb=peak_rss_mb() + _children_rss_mb())
    return out


def _children_rss_mb() -> float:
    """Resident MiB of this process's descendants now: milvus-lite searches in a server process of its own."""
    pages = 0
    for pid in descendant_pids(os.getpid()):
        try:
            pages += int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[21])
        except (OSError, IndexError, ValueError):
            continue        # gone meanwhile
    return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def _in_child(spec: dict, work: Path) -> dict:
    path = work / "spec.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "hashsearch.bench.peers", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise HashsearchError(f"bench peers: {spec['method']} failed: {last}")
    return json.loads(Path(spec["out"]).read_text())


# -- the whole benchmark --------------------------------------------------------------------------------
def ground_truth(coll: Collection, feats: np.ndarray, k: int = K) -> np.ndarray:
    """The exact top k ids of each query by L2 on F7, streamed over the shards."""
    with faiss_threads(MAX_THREADS):
        _, rows = scan_knn(coll, feats, k)
    return coll.ids()[rows]


def run_peers_bench(progress: bool = True, **options) -> dict:
    cfg = PeersBenchConfig(**options)
    methods = list(METHODS) if cfg.methods == "all" else [m.strip() for m in cfg.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise HashsearchError(f"unknown method {unknown[0] if unknown else cfg.methods!r} in --methods; choose from "
                              f"{', '.join(METHODS)} or all")
    setup = bench_data(cfg, Path(cfg.cache_dir) if cfg.cache_dir else default_cache_root(), progress)
    coll, codes, feats = setup["coll"], setup["codes"], setup["features"]
    t = time.perf_counter()
    truth = ground_truth(coll, feats)
    out = {"n": coll.n, "dim": coll.feature_dim, "bits": coll.bits, "queries": len(codes), "batch": cfg.batch,
           "recall_target": RECALL_TARGET, "source": setup["source"], "collection": str(coll.root),
           "ground_truth_s": round(time.perf_counter() - t, 1), "machine": machine_info(), "methods": []}
    with tempfile.TemporaryDirectory(dir=coll.root.parent) as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "queries.npz", codes=codes, features=feats, truth=truth)
        for name in methods:
            package = _PACKAGES.get(name)
            if package and _missing(package):
                out["methods"].append({"method": name, "skipped": f"{package} is not installed "
                                                                  "(pip install 'hashsearch[peers]')"})
                continue
            if progress:
                print(f"[bench peers] {name} ...", file=sys.stderr, flush=True)
            work = tmp / name
            work.mkdir()
            spec = {"method": name, "collection": str(coll.root), "queries": str(tmp / "queries.npz"),
                    "batch": cfg.batch, "work": str(work), "out": str(tmp / f"{name}.json"),
                    "index_options": cfg.build_options()}
            out["methods"].append(_in_child(spec, work))
    return out


def _missing(package: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(package) is None


def format_peers_report(result: dict) -> str:
    lines = [f"{result['n']:,} x {result['dim']}-d, {result['bits']}-bit codes, {result['queries']} queries; "
             f"each method at its fastest setting with recall@10 >= {result['recall_target']}",
             f"{'method':<19} {'params':<16} {'recall@10':>9} {'batch-1 ms':>10} {'p95':>7} {'batched q/s':>11} "
             f"{'build s':>8} {'RSS MiB':>8} {'disk GB':>8}"]
    for m in result["methods"]:
        if "skipped" in m:
            lines.append(f"{m['method']:<19} skipped: {m['skipped']}")
        elif m.get("projected"):
            lines.append(f"{m['method']:<19} {'(not searched)':<16} {'':>9} {'':>10} {'':>7} {'':>11} "
                         f"{m['build_s']:>8.1f} {'':>8} {m['disk_bytes'] / 1e9:>8.2f}  build and disk projected "
                         f"from {m['sample_rows']:,} rows ({m['sample_build_s']:.1f} s)")
        else:
            params = ", ".join("-" if p is None else str(p) for p in m["params"])
            flag = "" if m["reached_target"] else "  (never reached the target)"
            lines.append(f"{m['method']:<19} {params:<16} {m['recall_at_10']:>9.3f} {m['batch1_ms']:>10.3f} "
                         f"{m['batch1_p95_ms']:>7.3f} {m['batched_qps']:>11,.0f} {m['build_s']:>8.1f} "
                         f"{m['rss_mb']:>8.0f} {m['disk_bytes'] / 1e9:>8.2f}{flag}")
    lines.append(f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores")
    return "\n".join(lines)


def table_rows(result: dict) -> list[dict]:
    """--json's rows: one a method, with the fields the issue names first."""
    rows = []
    for m in result["methods"]:
        row = {"method": m["method"], "params": dict(zip(m.get("params_name", "").split(", "), m.get("params", [])))}
        for key in ("recall_at_10", "batch1_ms", "batch1_p95_ms", "batched_qps", "build_s", "rss_mb", "disk_bytes",
                    "projected", "skipped", "sweep"):
            if key in m:
                row[key] = m[key]
        rows.append(row)
    return rows


def plot_peers(result: dict, path) -> None:
    """Recall@10 against batch-1 latency, one line per method over its sweep."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in result["methods"]:
        if m.get("sweep"):
            pts = sorted((s["batch1_ms"], s["recall_at_10"]) for s in m["sweep"])
            # every setting as a dot; the line joins those that no faster setting beats on recall
            front = [p for i, p in enumerate(pts) if all(p[1] > q[1] for q in pts[:i])]
            line, = ax.plot(*zip(*front), marker="o", label=m["method"])
            ax.plot(*zip(*pts), marker="o", linestyle="none", alpha=0.35, color=line.get_color())
    ax.axhline(result["recall_target"], color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("batch-1 latency, median ms (log)")
    ax.set_ylabel("recall@10")
    ax.set_title(f"{result['n']:,} x {result['dim']}-d: recall against latency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(spec["out"]).write_text(json.dumps(_run_method(spec)))

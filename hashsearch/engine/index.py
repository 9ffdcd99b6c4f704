"""Hierarchical search over a collection (the paper's Section 3.3).

  hds  coarse Hamming search for a candidate pool, then exact L2 on F7
       ranks the pool: the paper's method.
  bcs  Hamming ranking of the codes alone.
  es   exhaustive L2 over all F7 features: the paper's baseline.

The index directory holds the coarse faiss binary index and index.json,
which ties it to the exact shards it was built from.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from ..codes import code_bytes
from ..errors import HashsearchError
from ..shards import Collection
from ..shards.manifest import atomic_write_bytes
from . import coarse as coarse_mod
from .exhaustive import scan_knn
from .rerank import FeatureReader, Reranker
from .threads import MAX_THREADS, faiss_threads, threads_for_batch

MODES = ("hds", "bcs", "es")
INDEX_DIR = "index"
COARSE_FILE = "coarse.faissindex"
META_FILE = "index.json"
DEFAULT_POOL = 200


@dataclass
class SearchResult:
    """Per query, k results padded with -1 (rows, ids) and inf (distances)."""
    rows: np.ndarray        # int64 [nq, k], collection rows
    ids: np.ndarray         # int64 [nq, k]
    hamming: np.ndarray     # int32 [nq, k], Hamming distance of each result's code to the query's
    distances: np.ndarray   # float32 [nq, k], squared L2 on F7; nan in bcs mode


def collection_fingerprint(coll: Collection) -> str:
    digest = hashlib.sha256()
    for entry in coll.manifest["shards"]:
        digest.update(entry["sha256"].encode())
    return digest.hexdigest()


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.int32)


def popcount_distances(query_codes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Hamming distance of each row of `codes` [nq, k, B] to its query [nq, B]."""
    return _POPCOUNT[np.bitwise_xor(codes, query_codes[:, None, :])].sum(-1, dtype=np.int32)


def nearest_of_ranges(lims: np.ndarray, dist: np.ndarray, labels: np.ndarray, pool: int):
    """The `pool` nearest of each query's range-search results: (hamming, rows) [nq, m],
    sorted by distance then row, padded with -1.  One sort for the whole batch."""
    # One query, the latency-bound case: ~2 us here against ~11 us through the batch bookkeeping.
    if len(lims) == 2 and lims[1] > 0:
        order = np.lexsort((labels, dist))[:pool]
        return dist[order][None].astype(np.int32), labels[order][None]
    lims = lims.astype(np.int64)        # faiss gives size_t
    nq = len(lims) - 1
    width = np.diff(lims)
    m = max(1, min(pool, int(width.max(initial=0))))
    query = np.repeat(np.arange(nq), width)
    order = np.lexsort((labels, dist, query))       # query-major, so query[order] == query
    rank = np.arange(len(order)) - lims[query]
    keep = rank < m
    out_d = np.full((nq, m), -1, np.int32)
    out_i = np.full((nq, m), -1, np.int64)
    out_d[query[keep], rank[keep]] = dist[order[keep]]
    out_i[query[keep], rank[keep]] = labels[order[keep]]
    return out_d, out_i


def read_index_meta(index_dir) -> dict | None:
    """index.json of an index directory, or None where there is none."""
    path = Path(index_dir) / META_FILE
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
        meta["coarse"]["kind"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HashsearchError(f"unreadable index metadata {path} ({exc}); rebuild it with `hashsearch build-index`") from None
    return meta


class Index:
    """Coarse-to-fine search over one collection.

    >>> index = Index.build(Collection.open("coll"), kind="flat")    # once
    >>> index = Index.open("coll")                                    # later
    >>> res = index.search(query_codes, query_features, k=10, pool=200)
    >>> res.ids[0], res.distances[0]
    """

    def __init__(self, collection: Collection, coarse: faiss.IndexBinary, meta: dict):
        self.collection = collection
        self.coarse = coarse
        self.meta = meta
        self.codes = collection.codes()
        self.ids = collection.ids()
        self.features = FeatureReader(collection)
        self._local = threading.local()
        # Threads start on first use, so an Index that only serves batch-1 queries has none.
        self._pool = ThreadPoolExecutor(MAX_THREADS, initializer=faiss.omp_set_num_threads, initargs=(1,))

    def _reranker(self) -> Reranker:
        # Each thread gathers into its own faiss buffer.
        rr = getattr(self._local, "reranker", None)
        if rr is None:
            rr = self._local.reranker = Reranker(self.features)
        return rr

    @property
    def kind(self) -> str:
        return self.meta["coarse"]["kind"]

    # -- building and opening ------------------------------------------------------
    @classmethod
    def build(cls, collection: Collection, kind: str = "flat", out=None, **params) -> "Index":
        if collection.n == 0:
            raise HashsearchError(f"collection {collection.root} is empty")
        start = time.perf_counter()
        coarse = coarse_mod.build_coarse(collection.codes(), collection.bits, kind, **params)
        meta = {
            "coarse": coarse_mod.describe(coarse), "n": collection.n, "bits": collection.bits,
            "collection_fingerprint": collection_fingerprint(collection),
            "build_seconds": round(time.perf_counter() - start, 3),
        }
        out = Path(out) if out else collection.root / INDEX_DIR
        try:
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / f".{COARSE_FILE}.tmp"
            faiss.write_index_binary(coarse, str(tmp))
            os.replace(tmp, out / COARSE_FILE)
            atomic_write_bytes(out / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
        except (OSError, RuntimeError) as exc:
            raise HashsearchError(f"cannot write index to {out}: {exc}") from None
        return cls(collection, coarse, meta)

    @classmethod
    def open(cls, collection, index_dir=None) -> "Index":
        if not isinstance(collection, Collection):
            collection = Collection.open(collection)
        index_dir = Path(index_dir) if index_dir else collection.root / INDEX_DIR
        meta = read_index_meta(index_dir)
        if meta is None:
            raise HashsearchError(f"no index in {index_dir}; run `hashsearch build-index {collection.root}` first")
        if meta.get("collection_fingerprint") != collection_fingerprint(collection):
            raise HashsearchError(f"index {index_dir} was built for other shards; rebuild it with `hashsearch build-index`")
        try:
            coarse = faiss.read_index_binary(str(index_dir / COARSE_FILE))
        except RuntimeError as exc:
            raise HashsearchError(f"cannot read coarse index {index_dir / COARSE_FILE}: {exc}") from None
        return cls(collection, coarse, meta)

    # -- searching --------------------------------------------------------------------
    def search(self, query_codes: np.ndarray, query_features: np.ndarray | None = None, k: int = 10, *,
               mode: str = "hds", pool: int = DEFAULT_POOL, radius: int | None = None,
               nflip: int | None = None) -> SearchResult:
        if k <= 0:
            raise HashsearchError(f"k must be positive, got {k}")
        if mode not in MODES:
            raise HashsearchError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if pool <= 0:
            raise HashsearchError(f"pool must be positive, got {pool}")
        query_codes = np.ascontiguousarray(np.atleast_2d(query_codes), dtype=np.uint8)
        if query_codes.shape[1] != code_bytes(self.collection.bits):
            raise HashsearchError(f"query codes have {query_codes.shape[1]} bytes; this collection's codes have "
                                  f"{self.collection.bits} bits in {code_bytes(self.collection.bits)} bytes")
        if mode != "bcs":
            if query_features is None:
                raise HashsearchError(f"mode {mode} needs query features")
            query_features = np.ascontiguousarray(np.atleast_2d(query_features), dtype=np.float32)
            if query_features.shape != (len(query_codes), self.collection.feature_dim):
                raise HashsearchError(f"query features have shape {query_features.shape}; expected "
                                      f"({len(query_codes)}, {self.collection.feature_dim})")
        nq = len(query_codes)
        if mode == "es":
            with faiss_threads(MAX_THREADS):
                dist, rows = scan_knn(self.collection, query_features, k)
            found = rows >= 0
            ham = popcount_distances(query_codes, self.codes[np.where(found, rows, 0)])
            return self._result(rows, dist, np.where(found, ham, -1))
        rows = np.full((nq, k), -1, np.int64)
        ham = np.full((nq, k), -1, np.int32)
        dist = np.full((nq, k), np.nan if mode == "bcs" else np.inf, np.float32)

        def work(a, b):
            if mode == "bcs":
                found_ham, found = self._candidates(query_codes[a:b], k, radius)
                rows[a:b, :found.shape[1]] = found[:, :k]
                ham[a:b, :found.shape[1]] = np.where(found[:, :k] >= 0, found_ham[:, :k], -1)
                return
            cand_ham, cand = self._candidates(query_codes[a:b], max(pool, k), radius)
            rr = self._reranker()
            for q in range(a, b):
                order = rr.search(query_features[q:q + 1], cand[q - a], dist[q], rows[q])
                ham[q, :len(order)] = cand_ham[q - a, order]

        with coarse_mod.probing(self.coarse, nflip):
            self._run(work, nq)
        return self._result(rows, dist, ham)

    def candidates(self, query_codes: np.ndarray, pool: int, *, radius: int | None = None,
                   nflip: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Coarse level: (hamming [nq, m], rows [nq, m]) sorted by Hamming, padded with -1.

        With `radius`, every code within that Hamming distance (at most `pool`).
        """
        if pool <= 0:
            raise HashsearchError(f"pool must be positive, got {pool}")
        with coarse_mod.probing(self.coarse, nflip):
            return self._candidates(query_codes, pool, radius)

    def _candidates(self, query_codes, pool, radius):
        if radius is None:
            return self.coarse.search(query_codes, min(pool, self.collection.n))
        lims, dist, labels = self.coarse.range_search(query_codes, int(radius) + 1)
        return nearest_of_ranges(lims, dist, labels, pool)

    def _run(self, work, nq: int) -> None:
        """work(a, b) over the query range: here for a few queries, else split across threads.

        faiss runs on one thread either way.  Its OpenMP would parallelise each call
        over queries, but one query's work is too small for that, and when other
        processes share the cores, OpenMP's spin-then-sleep barrier costs ~20 ms a
        call (measured on 2 cores) where Python threads, which block instead, cost
        microseconds.  faiss and pread release the GIL.
        """
        workers = min(threads_for_batch(nq), nq)
        if workers <= 1:
            with faiss_threads(1):
                work(0, nq)
            return
        cuts = np.linspace(0, nq, workers + 1).astype(int).tolist()
        for f in [self._pool.submit(work, a, b) for a, b in zip(cuts[:-1], cuts[1:])]:
            f.result()

    def close(self) -> None:
        """Release the shard file handles and search threads."""
        self._pool.shutdown(wait=True)
        self.features.close()
        self.collection.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _result(self, rows, dist, hamming) -> SearchResult:
        ids = np.where(rows >= 0, self.ids[rows], -1)     # row -1 reads the last id, then masked
        return SearchResult(rows=rows, ids=ids, hamming=hamming.astype(np.int32, copy=False), distances=dist)

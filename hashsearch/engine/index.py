"""Hierarchical search over a collection (the paper's Section 3.3).

  hds  coarse Hamming search for a candidate pool, then exact L2 on F7
       ranks the pool: the paper's method.
  bcs  Hamming ranking of the codes alone.
  es   exhaustive L2 over all F7 features: the paper's baseline.

The index follows a changing collection without a rebuild.  faiss's binary
Hash and MultiHash indexes support neither remove_ids nor an IDSelector,
and MultiHash has no add_with_ids, so the coarse level is three parts:
  base        the faiss index `build-index` wrote, immutable, over the live
              rows of the shards it was built on (which stay a prefix of
              the collection's shards until compaction, which rebuilds it);
  delta       an index of the same kind and parameters over the rows added
              since, built in memory when a generation is opened: cheap,
              since the delta is small, and searched exactly as the base is;
  tombstones  rows deleted since, skipped.  The base search over-fetches to
              make up for them and fetches more while a query comes up
              short, so the pool is always the nearest live rows.
Candidates from both parts merge by (Hamming, row), the order faiss's flat
index itself uses, so after any adds and deletes a flat index answers
exactly as a fresh build-index over the same live rows would; hash kinds
find the same candidates (the same buckets are probed in both parts).
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

from ..codes import code_bytes, hamming_distances
from ..errors import HashsearchError
from ..fileio import atomic_write_bytes, open_regular
from ..config import MODES, IndexConfig, SearchConfig
from ..shards import Collection, RowReader, editing, publish, read_manifest
from ..shards.manifest import check_file_entry, inside
from . import coarse as coarse_mod
from .exhaustive import scan_knn
from .rerank import Reranker
from .threads import MAX_THREADS, faiss_threads, threads_for_batch

INDEX_DIR = "index"
META_FILE = "index.json"
_NO_ROW = np.iinfo(np.int64).max


@dataclass
class SearchResult:
    """Per query, up to k results padded with -1 (rows, ids) and inf (distances); k is capped at the live items."""
    rows: np.ndarray        # int64 [nq, k], collection rows
    ids: np.ndarray         # int64 [nq, k]
    hamming: np.ndarray     # int32 [nq, k], Hamming distance of each result's code to the query's
    distances: np.ndarray   # float32 [nq, k], squared L2 on F7; nan in bcs mode


def popcount_distances(query_codes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Hamming distance of each row of `codes` [nq, k, B] to its query [nq, B], int32 like SearchResult.hamming."""
    return hamming_distances(query_codes[:, None, :], codes).astype(np.int32)


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


def merge_candidates(parts: list[tuple[np.ndarray, np.ndarray]], pool: int):
    """The `pool` nearest of several (hamming, rows) candidate lists [nq, m_i], by (Hamming, row), padded with -1."""
    ham = np.concatenate([h for h, _ in parts], axis=1).astype(np.int64)
    rows = np.concatenate([r for _, r in parts], axis=1)
    key = np.where(rows >= 0, (ham << 40) | rows, _NO_ROW)        # rows < 2**40, Hamming < 2**23
    order = np.argsort(key, axis=1, kind="stable")[:, :pool]
    rows, ham = np.take_along_axis(rows, order, 1), np.take_along_axis(ham, order, 1)
    return np.where(rows >= 0, ham, -1).astype(np.int32), rows


def merge_partitions(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int, mode: str, pool: int):
    """One search's answer from its partitions' answers (Index.search_pool), each (hamming, rows, distances)
    [nq, m_i] with rows numbered in the whole collection: (rows, hamming, distances) [nq, k].

    k and pool must be capped as Index.search caps them.  hds cuts the merged pool at the pool's
    size by (Hamming, row), exactly where one index over every row cuts it, then ranks it by L2; bcs
    keeps the k first by (Hamming, row); es the k nearest.  Equal L2 distances, which only duplicate
    features give, come in partition order.
    """
    ham = np.concatenate([h for h, _, _ in parts], axis=1).astype(np.int64)
    rows = np.concatenate([r for _, r, _ in parts], axis=1)
    dist = np.concatenate([d for _, _, d in parts], axis=1)
    if mode == "es":
        order = np.argsort(np.where(rows >= 0, dist, np.inf), axis=1, kind="stable")[:, :k]
    else:
        key = np.where(rows >= 0, (ham << 40) | rows, _NO_ROW)
        order = np.argsort(key, axis=1, kind="stable")[:, :max(pool, k) if mode == "hds" else k]
        if mode == "hds":
            pooled = np.where(np.take_along_axis(rows, order, 1) >= 0, np.take_along_axis(dist, order, 1), np.inf)
            order = np.take_along_axis(order, np.argsort(pooled, axis=1, kind="stable")[:, :k], 1)
    rows, ham, dist = (np.take_along_axis(a, order, 1) for a in (rows, ham, dist))
    pad = k - rows.shape[1]
    if pad > 0:
        rows, ham = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1), np.pad(ham, ((0, 0), (0, pad)), constant_values=-1)
        dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=np.nan if mode == "bcs" else np.inf)
    found = rows >= 0
    return rows, np.where(found, ham, -1).astype(np.int32), dist.astype(np.float32, copy=False)


def _live_first(ham: np.ndarray, rows: np.ndarray, alive: np.ndarray, pool: int):
    """Each query's live candidates, in their order, first `pool` of them; the rest -1."""
    order = np.argsort(~alive, axis=1, kind="stable")[:, :pool]
    keep = np.take_along_axis(alive, order, 1)
    return (np.where(keep, np.take_along_axis(ham, order, 1), -1),
            np.where(keep, np.take_along_axis(rows, order, 1), -1))


# -- the index's files ----------------------------------------------------------------
def _read_checked(base: Path, entry: dict, what: str) -> bytes:
    path = inside(base, entry["file"], what)
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            data = f.read()
    except OSError as exc:
        raise HashsearchError(f"cannot read {what} {path}: {exc.strerror or exc}; rebuild it with "
                              "`hashsearch build-index`") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise HashsearchError(f"{what} {path} does not match its checksum (altered or from elsewhere); "
                              "rebuild it with `hashsearch build-index`")
    return data


def check_index_meta(meta, where, shards: int | None = None) -> dict:
    """An index's metadata, every field checked before use; `shards`: how many the collection has."""
    try:
        check_file_entry(meta, "the coarse index")
        assert isinstance(meta["coarse"], dict) and meta["coarse"].get("kind") in coarse_mod.KINDS, "coarse kind"
        assert isinstance(meta["ntotal"], int) and meta["ntotal"] >= 0, "ntotal"
        assert isinstance(meta["bits"], int) and not isinstance(meta["bits"], bool), "bits"
        assert isinstance(meta["base_shards"], list) and all(isinstance(s, str) for s in meta["base_shards"]), \
            "base_shards"
        assert shards is None or len(meta["base_shards"]) <= shards, "more base shards than the collection has"
        if meta.get("rows_file") is not None:
            check_file_entry({"file": meta["rows_file"], "sha256": meta.get("rows_sha256")}, "the index rows")
    except Exception as exc:  # noqa: BLE001 - any malformed field means the same thing
        raise HashsearchError(f"unreadable index metadata in {where} ({str(exc) or type(exc).__name__}); "
                              "rebuild it with `hashsearch build-index`") from None
    return meta


def read_index_meta(index_dir) -> dict | None:
    """index.json of an index directory outside a collection, or None where there is none."""
    path = Path(index_dir) / META_FILE
    if not path.exists():
        return None
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            meta = json.loads(f.read(1 << 26))
    except (OSError, ValueError) as exc:
        raise HashsearchError(f"unreadable index metadata {path} ({exc}); rebuild it with `hashsearch build-index`") from None
    return check_index_meta(meta, path)


def write_index_files(coll: Collection, kind: str, out: Path, prefix: str, tag: str, **params) -> dict:
    """Build the coarse index over `coll`'s live rows and write its files; its metadata."""
    start = time.perf_counter()
    live = coll.live_rows()
    coarse = coarse_mod.build_coarse(coll.codes()[live], coll.bits, kind, **params)
    meta = {"coarse": coarse_mod.describe(coarse), "ntotal": int(coarse.ntotal), "bits": coll.bits,
            "base_shards": [s.sha256 for s in coll.shards], "generation": coll.generation}
    try:
        out.mkdir(parents=True, exist_ok=True)
        data = faiss.serialize_index_binary(coarse).tobytes()
        meta["file"], meta["sha256"] = f"{prefix}coarse-{tag}.faissindex", hashlib.sha256(data).hexdigest()
        atomic_write_bytes(out / f"coarse-{tag}.faissindex", data)
        meta["rows_file"] = None
        if len(coll.deleted_rows):      # positions of the index are not rows: record which rows they are
            rows = live.astype(np.int64).tobytes()
            meta["rows_file"], meta["rows_sha256"] = f"{prefix}rows-{tag}.bin", hashlib.sha256(rows).hexdigest()
            atomic_write_bytes(out / f"rows-{tag}.bin", rows)
    except (OSError, RuntimeError) as exc:
        raise HashsearchError(f"cannot write index to {out}: {exc}") from None
    meta["build_seconds"] = round(time.perf_counter() - start, 3)
    return meta


@dataclass
class _Generation:
    """Everything one search reads, for one generation: searches in flight keep theirs across a refresh."""
    collection: Collection
    meta: dict
    base: coarse_mod.Coarse
    base_rows: np.ndarray | None    # index position -> row; None: position == row
    base_end: int                   # rows of the shards the base was built on
    delta: coarse_mod.Coarse | None
    deleted: np.ndarray | None      # bool [n], rows deleted and not yet compacted
    base_has_deleted: bool
    delta_deleted: int              # deleted rows among the delta's: its searches fetch that many more
    reader: RowReader
    codes: np.ndarray
    ids: np.ndarray

    @property
    def exact_base(self) -> bool:
        """The base alone answers: positions are rows, nothing deleted in it, nothing added."""
        return self.base_rows is None and self.delta is None and not self.base_has_deleted


def _load_generation(coll: Collection, index_dir: Path | None, previous: _Generation | None) -> _Generation:
    if index_dir is None:
        meta, base_dir = coll.manifest.get("index"), coll.root
        if meta is None:
            raise HashsearchError(f"no index in {coll.root}; run `hashsearch build-index {coll.root}` first")
        meta = check_index_meta(meta, coll.root / "manifest.json", len(coll.shards))
    else:
        meta, base_dir = read_index_meta(index_dir), Path(index_dir)
        if meta is None:
            raise HashsearchError(f"no index in {index_dir}; run `hashsearch build-index {coll.root}` first")
    shas = [s.sha256 for s in coll.shards]
    n_base = len(meta["base_shards"])
    if meta["bits"] != coll.bits or shas[:n_base] != meta["base_shards"]:
        raise HashsearchError(f"the index of {coll.root} was built for other shards; rebuild it with "
                              "`hashsearch build-index`")
    base_end = int(coll.offsets[n_base])
    if previous is not None and previous.meta == meta:
        base, base_rows = previous.base, previous.base_rows
    else:
        base, base_rows = _read_base(meta, base_dir, base_end, coll)
    delta = None
    codes = coll.codes()
    if base_end < coll.n:
        delta = base.like(codes[base_end:], coll.bits)
    deleted = coll.deleted_mask() if len(coll.deleted_rows) else None
    if deleted is None:
        base_has_deleted = False
    elif base_rows is None:
        base_has_deleted = bool(deleted[:base_end].any())
    else:
        base_has_deleted = bool(deleted[base_rows].any())
    delta_deleted = 0 if deleted is None else int(np.count_nonzero(deleted[base_end:]))
    return _Generation(coll, meta, base, base_rows, base_end, delta, deleted, base_has_deleted, delta_deleted,
                       RowReader(coll), codes, coll.ids())


def _partition_generation(part: Collection, meta: dict) -> _Generation:
    """A partition's generation: an index of the kind and settings `meta` records, built in memory over
    the part's live rows (Collection.part), so it has neither delta nor tombstones to skip."""
    settings = {k: v for k, v in meta["coarse"].items() if k != "kind"}
    live = part.live_rows()
    codes = part.codes()
    base = coarse_mod.Coarse(coarse_mod.build_coarse(codes[live], part.bits, meta["coarse"]["kind"], **settings))
    deleted = part.deleted_mask() if len(part.deleted_rows) else None
    return _Generation(part, meta, base, None if deleted is None else live, part.n, None, deleted, False, 0,
                       RowReader(part), codes, part.ids())


def _read_base(meta: dict, base_dir: Path, base_end: int, coll: Collection):
    data = _read_checked(base_dir, meta, "coarse index")
    try:
        index = faiss.deserialize_index_binary(np.frombuffer(data, np.uint8))
    except RuntimeError as exc:
        raise HashsearchError(f"cannot read coarse index in {base_dir}: {str(exc).splitlines()[0]}") from None
    if index.ntotal != meta["ntotal"] or index.code_size != code_bytes(coll.bits):
        raise HashsearchError(f"the coarse index of {coll.root} does not hold the {meta['ntotal']} codes it records; "
                              "rebuild it with `hashsearch build-index`")
    base_rows = None
    if meta.get("rows_file"):
        raw = _read_checked(base_dir, {"file": meta["rows_file"], "sha256": meta["rows_sha256"]}, "index rows")
        base_rows = np.frombuffer(raw, np.int64) if len(raw) % 8 == 0 else None
        if base_rows is None or len(base_rows) != index.ntotal or (len(base_rows) and (
                base_rows[0] < 0 or base_rows[-1] >= base_end or np.any(np.diff(base_rows) <= 0))):
            raise HashsearchError(f"the index rows of {coll.root} are damaged; rebuild it with `hashsearch build-index`")
    elif index.ntotal != base_end:
        raise HashsearchError(f"the coarse index of {coll.root} holds {index.ntotal} codes for {base_end} rows; "
                              "rebuild it with `hashsearch build-index`")
    return coarse_mod.Coarse(index), base_rows


class Index:
    """Coarse-to-fine search over one collection, following it as it changes.

    >>> index = Index.build(Collection.open("coll"), kind="flat")    # once
    >>> index = Index.open("coll")                                    # later
    >>> res = index.search(query_codes, query_features, k=10, pool=200)
    >>> res.ids[0], res.distances[0]
    >>> index.refresh()       # after add / delete / compact in any process

    An Index pins the generation it opened; refresh() moves it to the newest
    one, reusing the coarse index, shard handles and anything else unchanged.
    Searches in flight finish on the generation they started on.
    """

    def __init__(self, collection: Collection, index_dir=None, *, partition_of: dict | None = None):
        self._index_dir = None if index_dir is None else Path(index_dir)
        self._partition = partition_of is not None
        self._gen = (_partition_generation(collection, partition_of) if self._partition
                     else _load_generation(collection, self._index_dir, None))
        self._refresh_lock = threading.Lock()
        self._local = threading.local()
        self._closed = False
        # Threads start on first use, so an Index that only serves batch-1 queries has none.
        self._pool = ThreadPoolExecutor(MAX_THREADS, initializer=faiss.omp_set_num_threads, initargs=(1,))

    def _current(self) -> _Generation:
        if self._closed:
            raise HashsearchError("this index is closed")
        return self._gen

    @property
    def collection(self) -> Collection:
        return self._current().collection

    @property
    def codes(self) -> np.ndarray:
        return self._current().codes

    @property
    def ids(self) -> np.ndarray:
        return self._current().ids

    @property
    def meta(self) -> dict:
        return self._current().meta

    @property
    def kind(self) -> str:
        return self.meta["coarse"]["kind"]

    @property
    def generation(self) -> int:
        return self._current().collection.generation

    def _reranker(self, reader: RowReader) -> Reranker:
        # Each thread gathers into its own faiss buffer.
        rr = getattr(self._local, "reranker", None)
        if rr is None:
            rr = self._local.reranker = Reranker(reader)
        rr.features = reader
        return rr

    # -- building and opening ------------------------------------------------------
    @classmethod
    def build(cls, collection, kind: str = "flat", out=None, *, wait: bool = False, **params) -> "Index":
        """Build the coarse index over the collection's live rows.

        Without `out`, it becomes part of the collection: a new generation names
        it, under the collection's write lock.  With `out`, it is written to that
        directory and the collection is not touched.
        """
        IndexConfig(coarse=kind, **params)      # the same checks as `build-index`'s options
        root = collection.root if isinstance(collection, Collection) else Path(collection)
        if out is not None:
            coll = collection if isinstance(collection, Collection) else Collection.open(root)
            if coll.items == 0:
                raise HashsearchError(f"collection {root} is empty")
            out = Path(out)
            meta = write_index_files(coll, kind, out, "", f"{coll.generation:06d}", **params)
            atomic_write_bytes(out / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
            for old in [*out.glob("coarse-*.faissindex"), *out.glob("rows-*.bin")]:
                if old.name not in (meta["file"], meta["rows_file"]):
                    old.unlink()
            return cls(coll, out)
        with editing(root, wait=wait) as manifest:
            coll = Collection.open(root, allow_empty=True)
            if coll.items == 0:
                raise HashsearchError(f"collection {root} is empty")
            tag = f"{coll.generation + 1:06d}"
            manifest["index"] = write_index_files(coll, kind, root / INDEX_DIR, f"{INDEX_DIR}/", tag, **params)
            publish(root, manifest)
        return cls(Collection.open(root, previous=coll))

    @classmethod
    def open(cls, collection, index_dir=None) -> "Index":
        if not isinstance(collection, Collection):
            collection = Collection.open(collection)
        return cls(collection, index_dir)

    @classmethod
    def partition(cls, part: Collection, meta: dict) -> "Index":
        """The index of one partition of a distributed search (hashsearch.distributed): `part` from
        Collection.part, `meta` the collection's index metadata.  It is pinned to its generation."""
        return cls(part, partition_of=check_index_meta(meta, part.root))

    def refresh(self) -> bool:
        """Move to the collection's newest generation; False if there is none newer."""
        if self._partition:
            raise HashsearchError("a partition is pinned to its generation; its ShardedIndex refreshes")
        with self._refresh_lock:
            gen = self._current()
            root = gen.collection.root
            if read_manifest(root).get("generation", 0) == gen.collection.generation:
                return False
            coll = Collection.open(root, previous=gen.collection)
            self._gen = _load_generation(coll, self._index_dir, gen)
            return True

    # -- searching --------------------------------------------------------------------
    def search(self, query_codes: np.ndarray, query_features: np.ndarray | None = None, k: int = SearchConfig.k, *,
               mode: str = SearchConfig.mode, pool: int = SearchConfig.pool, radius: int | None = SearchConfig.radius,
               nflip: int | None = SearchConfig.nflip) -> SearchResult:
        return self._search(query_codes, query_features, k, mode, pool, radius, nflip, whole_pool=False)

    def search_pool(self, query_codes: np.ndarray, query_features: np.ndarray | None = None, k: int = SearchConfig.k,
                    *, mode: str = SearchConfig.mode, pool: int = SearchConfig.pool,
                    radius: int | None = SearchConfig.radius, nflip: int | None = SearchConfig.nflip) -> SearchResult:
        """What a partition of a distributed search answers: as search(), except that in hds mode every
        candidate of the pool comes back, in pool order (Hamming, row), with its L2 distance.  The driver
        can then cut the merged pool exactly where one index over all rows would (merge_partitions)."""
        return self._search(query_codes, query_features, k, mode, pool, radius, nflip, whole_pool=True)

    def _search(self, query_codes, query_features, k, mode, pool, radius, nflip, *, whole_pool: bool) -> SearchResult:
        gen = self._current()
        k, pool, query_codes, query_features = check_query(gen.collection, gen.meta["coarse"], query_codes,
                                                           query_features, k, mode, pool, radius, nflip)
        nq = len(query_codes)
        if mode == "es":
            return self._exhaustive(gen, query_codes, query_features, k)
        width = max(pool, k) if whole_pool and mode == "hds" else k
        rows = np.full((nq, width), -1, np.int64)
        ham = np.full((nq, width), -1, np.int32)
        dist = np.full((nq, width), np.nan if mode == "bcs" else np.inf, np.float32)

        def work(a, b):
            if mode == "bcs":
                found_ham, found = self._candidates(gen, query_codes[a:b], k, radius, nflip)
                rows[a:b, :found.shape[1]] = found[:, :k]
                ham[a:b, :found.shape[1]] = np.where(found[:, :k] >= 0, found_ham[:, :k], -1)
                return
            cand_ham, cand = self._candidates(gen, query_codes[a:b], max(pool, k), radius, nflip)
            rr = self._reranker(gen.reader)
            for q in range(a, b):
                order = rr.search(query_features[q:q + 1], cand[q - a], dist[q], rows[q])
                if whole_pool:      # back to pool order, each candidate with its distance
                    found = np.count_nonzero(cand[q - a] >= 0)
                    dist[q, order] = dist[q, :len(order)].copy()
                    rows[q, :found], ham[q, :found] = cand[q - a, :found], cand_ham[q - a, :found]
                else:
                    ham[q, :len(order)] = cand_ham[q - a, order]

        self._run(work, nq)
        return self._result(gen, rows, dist, ham)

    def candidates(self, query_codes: np.ndarray, pool: int, *, radius: int | None = None,
                   nflip: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Coarse level: (hamming [nq, m], rows [nq, m]) sorted by Hamming, padded with -1.

        With `radius`, every code within that Hamming distance (at most `pool`).
        """
        gen = self._current()
        pool = search_count("pool", pool, gen.collection.items)
        self._check_probe(gen, radius, nflip)
        return self._candidates(gen, self._check_codes(gen, query_codes), pool, radius, nflip)

    @staticmethod
    def _check_codes(gen: _Generation, query_codes) -> np.ndarray:
        return check_query_codes(query_codes, gen.collection.bits)

    @staticmethod
    def _check_probe(gen: _Generation, radius, nflip) -> None:
        check_probe(radius, nflip, gen.collection.bits, gen.meta["coarse"])

    def _candidates(self, gen: _Generation, query_codes, pool: int, radius: int | None, nflip: int | None):
        if gen.exact_base:
            if radius is None:
                return gen.base.search(query_codes, min(pool, gen.base.ntotal), nflip)
            lims, dist, labels = gen.base.range_search(query_codes, int(radius) + 1, nflip)
            return nearest_of_ranges(lims, dist, labels, pool)
        if len(query_codes) == 1:
            return self._one_query_candidates(gen, query_codes, pool, radius, nflip)
        parts = []
        if gen.base.ntotal:
            parts.append(self._base_candidates(gen, query_codes, pool, radius, nflip))
        if gen.delta is not None:
            ham, found = self._part_candidates(gen.delta, query_codes, pool + gen.delta_deleted, radius, nflip)
            rows = np.where(found >= 0, found + gen.base_end, -1)
            if gen.deleted is not None:
                alive = (rows >= 0) & ~gen.deleted[np.maximum(rows, 0)]
                ham, rows = _live_first(ham, rows, alive, pool)
            parts.append((ham, rows))
        return merge_candidates(parts, pool)

    def _one_query_candidates(self, gen: _Generation, query_code, pool: int, radius, nflip):
        """The same answer as the batch path for one query, in a few flat array operations.

        Batch 1 is the latency-bound case (~0.1 ms in all), where the batch path's
        per-part padding and sorting would add tens of microseconds.
        """
        want = pool
        while True:         # the base, fetching more while deleted rows leave it short
            dist, rows, short = self._one_part(gen.base, query_code, want, radius, nflip)
            if gen.base_rows is not None:
                rows = gen.base_rows[rows]
            if gen.base_has_deleted:
                alive = ~gen.deleted[rows]
                dist, rows = dist[alive], rows[alive]
            # Enough live base candidates, or the base has no more to give: its part of the pool is exact.
            if len(rows) >= pool or not short or want >= gen.base.ntotal or radius is not None:
                break
            want = min(gen.base.ntotal, 2 * want + 8)
        if gen.delta is not None:
            d, r, _ = self._one_part(gen.delta, query_code, pool + gen.delta_deleted, radius, nflip)
            r = r + gen.base_end
            if gen.delta_deleted:
                alive = ~gen.deleted[r]
                d, r = d[alive], r[alive]
            dist, rows = np.concatenate([dist, d]), np.concatenate([rows, r])
        order = np.lexsort((rows, dist))[:pool]
        return dist[order][None].astype(np.int32), rows[order][None]

    @staticmethod
    def _one_part(coarse, query_code, want: int, radius, nflip):
        """(Hamming, positions, whether more may exist) of one query's candidates in one part, unpadded."""
        if not coarse.ntotal:
            return np.zeros(0, np.int32), np.zeros(0, np.int64), False
        if radius is not None:
            _, dist, labels = coarse.range_search(query_code, int(radius) + 1, nflip)
            return dist, labels.astype(np.int64, copy=False), False
        dist, labels = coarse.search(query_code, min(want, coarse.ntotal), nflip)
        found = labels[0] >= 0
        return dist[0][found], labels[0][found], bool(found.all())

    @staticmethod
    def _part_candidates(coarse, query_codes, want: int, radius, nflip):
        if radius is None:
            return coarse.search(query_codes, min(want, coarse.ntotal), nflip)
        lims, dist, labels = coarse.range_search(query_codes, int(radius) + 1, nflip)
        return nearest_of_ranges(lims, dist, labels.astype(np.int64), want)

    def _base_candidates(self, gen: _Generation, query_codes, pool: int, radius, nflip):
        """The base's `pool` nearest live candidates, mapped to rows."""
        want = pool
        if gen.base_has_deleted and radius is None:
            # Fetch for the expected share of deleted rows, then more while a query is short.
            share = float(np.count_nonzero(gen.deleted)) / max(gen.collection.n, 1)
            want = min(gen.base.ntotal, int(pool / max(1 - share, 0.05)) + 8)
        while True:
            ham, found = self._part_candidates(gen.base, query_codes, want if radius is None else gen.base.ntotal,
                                               radius, nflip)
            rows = found if gen.base_rows is None else np.where(found >= 0, gen.base_rows[np.maximum(found, 0)], -1)
            if not gen.base_has_deleted:
                return ham, rows
            alive = (rows >= 0) & ~gen.deleted[np.maximum(rows, 0)]
            exhausted = (found[:, -1] < 0) | (want >= gen.base.ntotal) | (radius is not None)
            if np.all((alive.sum(1) >= pool) | exhausted):
                return _live_first(ham, rows, alive, pool)
            want = min(gen.base.ntotal, 2 * want)

    def _exhaustive(self, gen: _Generation, query_codes, query_features, k: int) -> SearchResult:
        if not np.isfinite(query_features).all():
            raise HashsearchError("query features must be finite")
        dead = 0 if gen.deleted is None else int(np.count_nonzero(gen.deleted))
        with faiss_threads(MAX_THREADS):
            dist, rows = scan_knn(gen.collection, query_features, min(k + dead, gen.collection.n))
        if dead:
            alive = (rows >= 0) & ~gen.deleted[np.maximum(rows, 0)]
            order = np.argsort(~alive, axis=1, kind="stable")[:, :k]
            keep = np.take_along_axis(alive, order, 1)
            dist = np.where(keep, np.take_along_axis(dist, order, 1), np.inf).astype(np.float32)
            rows = np.where(keep, np.take_along_axis(rows, order, 1), -1)
        found = rows >= 0
        ham = popcount_distances(query_codes, gen.codes[np.where(found, rows, 0)])
        return self._result(gen, rows, dist, np.where(found, ham, -1))

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
        """Release the shard file handles and search threads; any later call raises."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        self._gen.collection.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def _result(gen: _Generation, rows, dist, hamming) -> SearchResult:
        ids = np.where(rows >= 0, gen.ids[rows], -1)     # row -1 reads the last id, then masked
        return SearchResult(rows=rows, ids=ids, hamming=hamming.astype(np.int32, copy=False), distances=dist)


def check_query(coll: Collection, coarse: dict, query_codes, query_features, k, mode, pool, radius, nflip):
    """A search's arguments checked against `coll` and its coarse index: (k, pool, codes, features), k and
    pool capped at the live items, features float32 (None in bcs mode, which needs none)."""
    if mode not in MODES:
        raise HashsearchError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    k, pool = search_count("k", k, coll.items), search_count("pool", pool, coll.items)
    check_probe(radius, nflip, coll.bits, coarse)
    query_codes = check_query_codes(query_codes, coll.bits)
    if mode == "bcs":
        return k, pool, query_codes, None
    if query_features is None:
        raise HashsearchError(f"mode {mode} needs query features")
    query_features = np.ascontiguousarray(np.atleast_2d(query_features), dtype=np.float32)
    if query_features.shape != (len(query_codes), coll.feature_dim):
        raise HashsearchError(f"query features have shape {query_features.shape}; expected "
                              f"({len(query_codes)}, {coll.feature_dim})")
    return k, pool, query_codes, query_features


def check_query_codes(query_codes, bits: int) -> np.ndarray:
    """Query codes as a contiguous uint8 [nq, ceil(bits/8)] array, or the error saying what they are."""
    query_codes = np.ascontiguousarray(np.atleast_2d(query_codes), dtype=np.uint8)
    width = code_bytes(bits)
    if query_codes.ndim != 2 or query_codes.shape[1] != width:
        raise HashsearchError(f"query codes have shape {query_codes.shape}; this collection's codes have "
                              f"{bits} bits in {width} bytes")
    return query_codes


def check_probe(radius, nflip, bits: int, coarse: dict) -> None:
    """A search's radius and nflip against the code length and the coarse index described by `coarse`."""
    if radius is not None and (isinstance(radius, bool) or not isinstance(radius, (int, np.integer))
                               or not 0 <= radius <= bits):
        raise HashsearchError(f"radius must be an integer from 0 to the code length ({bits}), got {radius!r}")
    coarse_mod.check_nflip(nflip, coarse.get("hash_bits"))


def search_count(name: str, value, items: int) -> int:
    """k or pool, checked, and capped at the live items before anything of that size is allocated."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise HashsearchError(f"{name} must be an integer, got {value!r}")
    if value <= 0:
        raise HashsearchError(f"{name} must be positive, got {value}")
    return int(min(value, max(items, 1)))

"""Hierarchical search over a collection (the paper's Section 3.3).

  hds  coarse Hamming search for a candidate pool, then exact L2 on F7
       ranks the pool: the paper's method.  The pool is H's nearest codes
       and, where the index has them, the nearest neighbour codes
       (engine/neighbours.py) and the sketch cells' nearest rows
       (engine/cells.py), whose rows alone may take the first
       neighbour_places places (every place where pool 0 leaves H's
       codes out).
  bcs  Hamming ranking of the codes alone.
  es   exhaustive L2 over all F7 features: the paper's baseline.

The index follows a changing collection without a rebuild.  faiss's binary
Hash and MultiHash indexes support neither remove_ids nor an IDSelector,
and MultiHash has no add_with_ids, so each of the coarse level's indexes (H's
codes, and the neighbour codes: generation.Level) is three parts:
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

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..codes import code_bytes
from ..config import FEATURES_IN_RAM_MB, MODES, NEIGHBOUR_POOL, IndexConfig, SearchConfig
from ..errors import HashsearchError
from ..shards import Collection, read_manifest
from ..shards.layout import INDEX_DIR
from ..shards.transaction import OutsideDirectory, transaction
from . import coarse as coarse_mod
from .exhaustive import scan_knn
from .generation import (Generation, Level, check_index_meta, collection_cells, collection_projection,
                         load_generation, partition_generation, read_index_meta, write_index_files)
from .kernels import admitted, live_first, merge_candidates, merge_partitions, nearest_of_ranges, popcount_distances
from .neighbours import codes_of_projection
from .rerank import PerThreadRerankers
from .sketch import SHORTLIST_PER_RESULT
from .threads import MAX_THREADS, QuerySplitter, faiss_threads
from .tuning import tune_sources

__all__ = ["Index", "SearchResult", "SearchTarget", "search_params", "check_query", "check_index_meta",
           "read_index_meta", "write_index_files", "merge_partitions", "nearest_of_ranges", "INDEX_DIR"]


@dataclass
class SearchResult:
    """Per query, up to k results padded with -1 (rows, ids) and inf (distances); k is capped at the live items."""
    rows: np.ndarray        # int64 [nq, k], collection rows
    ids: np.ndarray         # int64 [nq, k]
    hamming: np.ndarray     # int32 [nq, k], Hamming distance of each result's code to the query's
    distances: np.ndarray   # float32 [nq, k], squared L2 on F7; nan in bcs mode

    @classmethod
    def empty(cls, nq: int, k: int, no_distance: float) -> "SearchResult":
        return cls(rows=np.full((nq, k), -1, np.int64), ids=np.full((nq, k), -1, np.int64),
                   hamming=np.full((nq, k), -1, np.int32), distances=np.full((nq, k), no_distance, np.float32))



class SearchTarget:
    """What the query command, the service and the benches search: an Index, or a ShardedIndex whose
    partitions are Index.partition()s on Ray actors (hashsearch.distributed)."""

    @property
    def collection(self) -> Collection:     # the generation searches run on now
        raise NotImplementedError

    @property
    def codes(self) -> np.ndarray:
        return self.collection.codes()

    @property
    def ids(self) -> np.ndarray:
        return self.collection.ids()

    @property
    def meta(self) -> dict:
        return self.collection.manifest["index"]

    @property
    def kind(self) -> str:
        return self.meta["coarse"]["kind"]

    @property
    def generation(self) -> int:
        return self.collection.generation

    def search(self, query_codes: np.ndarray, query_features: np.ndarray | None = None,
               params: SearchConfig | int | None = None, **options) -> "SearchResult":
        raise NotImplementedError

    def refresh(self) -> bool:
        """Move to the collection's newest generation; False if there is none newer."""
        raise NotImplementedError

    def warm(self) -> None:
        """Make now what the first search would make on its way, so that a service's first request does
        not pay for it."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Index(SearchTarget):
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

    def __init__(self, collection: Collection, index_dir=None, *, partition_of: dict | None = None,
                 features_in_ram_mb: float = FEATURES_IN_RAM_MB, unpublished: dict | None = None):
        self._index_dir = None if index_dir is None else Path(index_dir)
        self._partition = partition_of is not None or unpublished is not None     # both pinned
        self._in_ram_mb = features_in_ram_mb
        self._gen = (partition_generation(collection, partition_of, features_in_ram_mb) if partition_of is not None
                     else load_generation(collection, self._index_dir, None, features_in_ram_mb, unpublished))
        self._refresh_lock = threading.Lock()
        self._rerankers = PerThreadRerankers()
        self._closed = False
        self._splitter = QuerySplitter()

    def _current(self) -> Generation:
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
    def features_in_ram(self) -> bool:
        """Whether the rerank reads F7 from RAM (it fits the budget Index.open was given) or from the shards."""
        return self._current().reader.in_ram is not None

    @property
    def shortlists(self) -> bool:
        """Whether hds ranks its pool by the sketch first and reranks only SHORTLIST_PER_RESULT rows per result
        by L2 on F7 (engine/sketch.py): the index has neighbour codes and F7 is in RAM."""
        sketch = self._current().sketch
        return sketch is not None and sketch.usable()

    def neighbour_sources(self, params: SearchConfig | int | None = None, **options) -> tuple[int, int]:
        """(neighbour pool, cells probed) that an hds search with these parameters uses (SearchConfig's
        neighbour_pool and neighbour_cells, resolved: engine/tuning.py)."""
        params = search_params(params, **options)
        return _sources(self._current(), params, params.k, False)[:2]

    def warm(self) -> None:
        """Project the sketch and fill its cells (with 256 cells: 0.8-1.0 s at 50,000 × 1,280-d, 0.3-0.5 s at
        50,000 and 60,000 × 512-d, 2 Xeon cores), which the first search that shortlists would otherwise make."""
        sketch = self._current().sketch
        if sketch is not None:
            sketch.usable()

    @classmethod
    def build(cls, collection, kind: str = "flat", out=None, *, wait: bool = False, **params) -> "Index":
        """Build the coarse index over the collection's live rows.

        Without `out`, it becomes part of the collection: a new generation names
        it, under the collection's write lock.  With `out`, it is written to that
        directory and the collection is not touched.
        """
        settings = IndexConfig(coarse=kind, **params)      # the same checks as `build-index`'s options
        params = {k: v for k, v in params.items() if k not in ("neighbour_bits", "refit", "retune", "neighbour_coarse")}
        root = collection.root if isinstance(collection, Collection) else Path(collection)
        if out is not None:
            coll = collection if isinstance(collection, Collection) else Collection.open(root)
            if coll.items == 0:
                raise HashsearchError(f"collection {root} is empty")
            folder = OutsideDirectory(out, coll.generation)
            neighbours = _neighbour_settings(coll, settings)
            meta = write_index_files(coll, kind, folder, **neighbours, **params)
            folder.publish(cls._tuned(coll, out, meta, None if settings.retune else neighbours["kept_cells"]))
            return cls(coll, out)
        with transaction(root, wait=wait) as txn:
            coll = Collection.from_manifest(root, txn.manifest)
            if coll.items == 0:
                raise HashsearchError(f"collection {root} is empty")
            neighbours = _neighbour_settings(coll, settings)
            meta = write_index_files(coll, kind, txn, **neighbours, **params)
            kept = None if settings.retune else neighbours["kept_cells"]
            txn.publish({**txn.manifest, "index": cls._tuned(coll, None, meta, kept)})
        return cls(Collection.open(root, previous=coll))

    @classmethod
    def _tuned(cls, coll: Collection, index_dir, meta: dict, kept) -> dict:
        """`meta` with hds's default neighbour sources measured on the index it describes (engine/tuning.py),
        where its cells are new: cells it kept (`kept`, generation.KeptCells; None with --retune) keep their
        sources, so that an index that followed adds and deletes answers as a later build does."""
        if not meta.get("cells") or (kept is not None and kept.sha256 == meta["cells_sha256"]):
            return meta
        # its own handles: closing the index closes them, and `coll` stays open
        own = Collection.from_manifest(coll.root, coll.manifest)
        try:
            index = cls(own, index_dir, unpublished=meta)
        except BaseException:
            own.close()
            raise
        with index:
            tuned = tune_sources(index)
        # None (too few rows, F7 not in RAM): an earlier measurement that --retune asked to replace goes too
        return {key: value for key, value in meta.items() if key != "tuned"} if tuned is None else \
            {**meta, "tuned": tuned}

    @classmethod
    def open(cls, collection, index_dir=None, *, features_in_ram_mb: float = FEATURES_IN_RAM_MB) -> "Index":
        """The index of `collection` (or of `index_dir`, from `build-index --out`).  The rerank reads F7 from
        RAM where all of it fits in `features_in_ram_mb` (config.FEATURES_IN_RAM_MB), else from the shards."""
        if not isinstance(collection, Collection):
            collection = Collection.open(collection)
        return cls(collection, index_dir, features_in_ram_mb=features_in_ram_mb)

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
            # Every item deleted is a state a followed collection passes through, not an error: searches
            # of it find nothing until items are added.
            coll = Collection.open(root, previous=gen.collection, allow_empty=True)
            self._gen = load_generation(coll, self._index_dir, gen, self._in_ram_mb)
            return True

    # -- searching --------------------------------------------------------------------
    def search(self, query_codes: np.ndarray, query_features: np.ndarray | None = None,
               params: SearchConfig | int | None = None, **options) -> SearchResult:
        """The nearest items of each query: `params` (a SearchConfig, or k) with `options` (k, mode, pool,
        radius, nflip) replacing its fields; their defaults and meaning are SearchConfig's."""
        return self._search(query_codes, query_features, search_params(params, **options), whole_pool=False)

    def search_pool(self, query_codes: np.ndarray, query_features: np.ndarray | None = None,
                    params: SearchConfig | int | None = None, **options) -> SearchResult:
        """What a partition of a distributed search answers: as search(), except that in hds mode every
        candidate of the pool comes back, in pool order (Hamming, row), with its L2 distance.  The driver
        can then cut the merged pool exactly where one index over all rows would (merge_partitions)."""
        return self._search(query_codes, query_features, search_params(params, **options), whole_pool=True)

    def _search(self, query_codes, query_features, params: SearchConfig, *, whole_pool: bool) -> SearchResult:
        gen = self._current()
        k, pool, query_codes, query_features = check_query(gen.collection, gen.meta["coarse"], query_codes,
                                                           query_features, params)
        if gen.collection.items == 0:
            return SearchResult.empty(len(query_codes), k, np.nan if params.mode == "bcs" else np.inf)
        if params.mode == "es":
            return self._exhaustive(gen, query_codes, query_features, k)
        if params.mode == "bcs":
            return self._binary(gen, query_codes, k, params)
        nq, width = len(query_codes), h_pool_width(pool, k)
        # A partition pads its neighbour pool to the width the driver asked for: the driver splits on it.
        npool, probe, shortlist = _sources(gen, params, k, whole_pool)
        check_h_pool(pool, npool or probe, whole_pool)
        # Without H's pool, the neighbour sources' rows may take every place.
        places = params.neighbour_places if pool else k
        out = SearchResult.empty(nq, width + npool if whole_pool else k, np.inf)

        def work(a, b):
            projected = gen.neighbours.projection.project(query_features[a:b]) if npool or probe else None
            (cand_ham, cand), (n_ham, n_cand) = self._pools(gen, query_codes[a:b], projected, width, npool, params)
            if probe:
                n_cand = self._cell_rows(gen, projected, k, probe, n_cand)
            rr = self._rerankers.get(gen.reader)
            for q in range(a, b):
                if whole_pool:      # each pool in its own order, each candidate with its distance
                    _pool_order(rr, query_features[q:q + 1], cand[q - a], cand_ham[q - a], out, q, 0)
                    if npool:
                        _pool_order(rr, query_features[q:q + 1], n_cand[q - a], n_ham[q - a], out, q, width)
                elif npool or probe:
                    _rank_union(rr, query_features[q:q + 1], cand[q - a], n_cand[q - a], out, q, places,
                                (gen.sketch, projected[q - a]) if shortlist else None)
                else:
                    order = rr.search(query_features[q:q + 1], cand[q - a], out.distances[q], out.rows[q])
                    out.hamming[q, :len(order)] = cand_ham[q - a, order]

        self._splitter.run(work, nq)
        if (npool or probe) and not whole_pool:
            out.hamming[:] = hamming_of_results(query_codes, gen.codes, out.rows)
        return self._result(gen, out.rows, out.distances, out.hamming)

    @staticmethod
    def _cell_rows(gen: Generation, projected: np.ndarray, k: int, probe: int, pool_rows: np.ndarray | None):
        """The rows the cells add to the neighbour pool [nq, m]: each query's SHORTLIST_PER_RESULT * k
        nearest in the sketch among its `probe` nearest cells (engine/cells.py), after `pool_rows` (the
        neighbour codes' pool, or None)."""
        found = gen.sketch.cells.search(projected, SHORTLIST_PER_RESULT * k, probe)
        return found if pool_rows is None else np.hstack([pool_rows, found])

    def _binary(self, gen: Generation, query_codes, k: int, params: SearchConfig) -> SearchResult:
        """bcs: the k nearest of H's codes by Hamming distance, ties by row."""
        out = SearchResult.empty(len(query_codes), k, np.nan)

        def work(a, b):
            found_ham, found = self._candidates(gen, gen.hamming, query_codes[a:b], k, params.radius, params.nflip)
            out.rows[a:b, :found.shape[1]] = found[:, :k]
            out.hamming[a:b, :found.shape[1]] = np.where(found[:, :k] >= 0, found_ham[:, :k], -1)

        self._splitter.run(work, len(query_codes))
        return self._result(gen, out.rows, out.distances, out.hamming)

    def candidates(self, query_codes: np.ndarray, pool: int, *, radius: int | None = None,
                   nflip: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Coarse level: (hamming [nq, m], rows [nq, m]) sorted by Hamming, padded with -1.

        With `radius`, every code within that Hamming distance (at most `pool`).
        """
        gen = self._current()
        pool = search_count("pool", pool, gen.collection.items)
        self._check_probe(gen, radius, nflip)
        return self._candidates(gen, gen.hamming, self._check_codes(gen, query_codes), pool, radius, nflip)

    def rerank_pool(self, query_codes: np.ndarray, query_features: np.ndarray,
                    params: SearchConfig | int | None = None, **options) -> np.ndarray:
        """The rows hds reranks for each query [nq, m], -1 padded: H's pool (none with pool 0), the neighbour
        pool and the cells' rows, each row once (before the sketch's shortlist)."""
        gen = self._current()
        params = search_params(params, **options)
        k, pool, query_codes, query_features = check_query(gen.collection, gen.meta["coarse"], query_codes,
                                                           query_features, dataclasses.replace(params, mode="hds"))
        npool, probe, _ = _sources(gen, params, k, False)       # this generation's, whatever a refresh does
        check_h_pool(pool, npool or probe, False)
        projected = gen.neighbours.projection.project(query_features) if npool or probe else None
        (_, rows), (_, near) = self._pools(gen, query_codes, projected, h_pool_width(pool, k), npool, params)
        if probe:
            near = self._cell_rows(gen, projected, k, probe, near)
        return rows if near is None else np.stack([union_of_pools(a, b) for a, b in zip(rows, near)])

    def _pools(self, gen: Generation, query_codes, projected, width: int, npool: int, params: SearchConfig):
        """hds's two candidate pools, each (hamming, rows): H's `width` nearest (by radius and nflip where
        asked; none when width is 0), and the neighbour codes' `npool` nearest, of the queries' `projected`
        features (the neighbour projection's; (None, None) when npool is 0)."""
        if width:
            pool = self._candidates(gen, gen.hamming, query_codes, width, params.radius, params.nflip)
        else:
            pool = np.zeros((len(query_codes), 0), np.int32), np.zeros((len(query_codes), 0), np.int64)
        if not npool:
            return pool, (None, None)
        return pool, self._candidates(gen, gen.neighbours, codes_of_projection(projected), npool, None, None)

    @staticmethod
    def _check_codes(gen: Generation, query_codes) -> np.ndarray:
        return check_query_codes(query_codes, gen.collection.bits)

    @staticmethod
    def _check_probe(gen: Generation, radius, nflip) -> None:
        check_probe(radius, nflip, gen.collection.bits, gen.meta["coarse"])

    def _candidates(self, gen: Generation, level: Level, query_codes, pool: int, radius: int | None,
                    nflip: int | None):
        """`level`'s `pool` nearest live candidates: gen.hamming (H's codes) or gen.neighbours."""
        if gen.exact_base:
            if radius is None:
                return level.base.search(query_codes, min(pool, level.base.ntotal), nflip)
            lims, dist, labels = level.base.range_search(query_codes, int(radius) + 1, nflip)
            return nearest_of_ranges(lims, dist, labels, pool)
        if len(query_codes) == 1:
            return self._one_query_candidates(gen, level, query_codes, pool, radius, nflip)
        parts = []
        if level.base.ntotal:
            parts.append(self._base_candidates(gen, level, query_codes, pool, radius, nflip))
        if level.delta is not None:
            ham, found = self._part_candidates(level.delta, query_codes, pool + gen.delta_deleted, radius, nflip)
            rows = np.where(found >= 0, found + gen.base_end, -1)
            if gen.deleted is not None:
                alive = (rows >= 0) & ~gen.deleted[np.maximum(rows, 0)]
                ham, rows = live_first(ham, rows, alive, pool)
            parts.append((ham, rows))
        return merge_candidates(parts, pool)

    def _one_query_candidates(self, gen: Generation, level: Level, query_code, pool: int, radius, nflip):
        """The same answer as the batch path for one query, in a few flat array operations.

        Batch 1 is the latency-bound case (~0.1 ms in all), where the batch path's
        per-part padding and sorting would add tens of microseconds.
        """
        want = pool
        while True:         # the base, fetching more while deleted rows leave it short
            dist, rows, short = self._one_part(level.base, query_code, want, radius, nflip)
            if gen.base_rows is not None:
                rows = gen.base_rows[rows]
            if gen.base_has_deleted:
                alive = ~gen.deleted[rows]
                dist, rows = dist[alive], rows[alive]
            # Enough live base candidates, or the base has no more to give: its part of the pool is exact.
            if len(rows) >= pool or not short or want >= level.base.ntotal or radius is not None:
                break
            want = min(level.base.ntotal, 2 * want + 8)
        if level.delta is not None:
            d, r, _ = self._one_part(level.delta, query_code, pool + gen.delta_deleted, radius, nflip)
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

    def _base_candidates(self, gen: Generation, level: Level, query_codes, pool: int, radius, nflip):
        """The base's `pool` nearest live candidates, mapped to rows."""
        want = pool
        if gen.base_has_deleted and radius is None:
            # Fetch for the expected share of deleted rows, then more while a query is short.
            share = float(np.count_nonzero(gen.deleted)) / max(gen.collection.n, 1)
            want = min(level.base.ntotal, int(pool / max(1 - share, 0.05)) + 8)
        while True:
            ham, found = self._part_candidates(level.base, query_codes, want if radius is None else level.base.ntotal,
                                               radius, nflip)
            rows = found if gen.base_rows is None else np.where(found >= 0, gen.base_rows[np.maximum(found, 0)], -1)
            if not gen.base_has_deleted:
                return ham, rows
            alive = (rows >= 0) & ~gen.deleted[np.maximum(rows, 0)]
            exhausted = (found[:, -1] < 0) | (want >= level.base.ntotal) | (radius is not None)
            if np.all((alive.sum(1) >= pool) | exhausted):
                return live_first(ham, rows, alive, pool)
            want = min(level.base.ntotal, 2 * want)

    def _exhaustive(self, gen: Generation, query_codes, query_features, k: int) -> SearchResult:
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
        return self._result(gen, rows, dist, hamming_of_results(query_codes, gen.codes, rows))

    def duplicates(self, params=None, **options):
        """The near-duplicate pairs and groups of the live items (engine/duplicates.py): `params`, a
        DuplicatesConfig, with `options` (max_distance, copy_distance, radius, relative, since) replacing its
        fields."""
        from .duplicates import collection_duplicates
        return collection_duplicates(self._current(), params, **options)

    def close(self) -> None:
        """Release the shard file handles and search threads; any later call raises."""
        if self._closed:
            return
        self._closed = True
        self._splitter.shutdown()
        self._gen.collection.close()

    @staticmethod
    def _result(gen: Generation, rows, dist, hamming) -> SearchResult:
        ids = np.where(rows >= 0, gen.ids[rows], -1)     # row -1 reads the last id, then masked
        return SearchResult(rows=rows, ids=ids, hamming=hamming.astype(np.int32, copy=False), distances=dist)


def _neighbour_settings(coll: Collection, settings: IndexConfig) -> dict:
    """The neighbour codes a build writes: their length, and the collection's projection and cells unless
    refitting."""
    return {"neighbour_bits": settings.neighbour_bits_for(coll.feature_dim, coll.items),
            "neighbour_kind": settings.neighbour_coarse,
            "projection": None if settings.refit else collection_projection(coll),
            "kept_cells": None if settings.refit else collection_cells(coll)}


def neighbour_pool(meta: dict, params: SearchConfig, items: int) -> int:
    """How many candidates the neighbour codes add to an hds pool where the cells are not searched: none
    where the index has no neighbour codes (one built before them, or with --neighbour-bits 0), and none
    with a radius, which asks for the paper's thresholded search of H's codes alone."""
    if not meta.get("neighbour_bits") or params.radius is not None:
        return 0
    npool = NEIGHBOUR_POOL if params.neighbour_pool is None else params.neighbour_pool
    return search_count("neighbour pool", npool, items) if npool else 0


def _sources(gen: Generation, params: SearchConfig, k: int, whole_pool: bool) -> tuple[int, int, bool]:
    """(neighbour pool, cells probed, whether it shortlists by the sketch) of one hds search for k results.
    Only a search that shortlists asks for the sketch: asking projects it, the first time, and fills its cells."""
    shortlist = not whole_pool and k <= params.neighbour_places and gen.sketch is not None
    npool, probe = sources_for(gen, params, whole_pool, shortlist)
    shortlist = shortlist and bool(npool or probe) and gen.sketch.usable()
    if probe and not shortlist:     # the sketch could not be made: no cells either
        npool, probe = sources_for(gen, params, whole_pool, False)
    return npool, probe, shortlist


def sources_for(gen: Generation, params: SearchConfig, whole_pool: bool, cells: bool) -> tuple[int, int]:
    """(neighbour pool, cells probed) of one hds search.  Where its sketch's cells can be searched (`cells`:
    it shortlists) and the search sets neither, they are what build-index measured best for the collection
    (engine/tuning.py); one set leaves the other at 0.  Elsewhere the cells are not searched and the pool is
    NEIGHBOUR_POOL unless set."""
    meta = gen.meta
    if not cells or not meta.get("cells") or params.radius is not None:
        items = np.iinfo(np.int64).max if whole_pool else gen.collection.items
        return neighbour_pool(meta, params, items), 0
    if params.neighbour_pool is None and params.neighbour_cells is None:
        tuned = meta.get("tuned") or {"neighbour_pool": NEIGHBOUR_POOL, "neighbour_cells": 0}
        npool, probe = tuned["neighbour_pool"], tuned["neighbour_cells"]
    else:
        npool, probe = params.neighbour_pool or 0, params.neighbour_cells or 0
    return (search_count("neighbour pool", npool, gen.collection.items) if npool else 0,
            search_count("neighbour cells", probe, meta["cells"]) if probe else 0)


def hamming_of_results(query_codes: np.ndarray, codes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """H's Hamming distance of each result row [nq, k] to its query, -1 where there is none."""
    found = rows >= 0
    return np.where(found, popcount_distances(query_codes, codes[np.where(found, rows, 0)]), -1).astype(np.int32)


def union_of_pools(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The rows of two candidate lists (-1 padded), each once, sorted, then -1 padded to both's width."""
    rows = np.concatenate([a[a >= 0], b[b >= 0]])
    rows.sort()
    first = np.empty(len(rows), bool)       # not np.unique: its hashing took 37 of a query's ~500 us
    first[:1] = True
    np.not_equal(rows[1:], rows[:-1], out=first[1:])
    rows = rows[first]
    return np.concatenate([rows, np.full(len(a) + len(b) - len(rows), -1, np.int64)])


def _rank_union(rr, query: np.ndarray, cand: np.ndarray, near: np.ndarray, out: SearchResult, q: int,
                places: int, sketched=None) -> None:
    """One query's hds results from H's pool and the neighbour pool: the union by L2, where rows found only
    by the neighbour codes take at most the first `places` places.  `sketched`: (the generation's sketch,
    the query's), to rerank by L2 on F7 only the union's nearest few in the sketch (engine/sketch.py), or None."""
    union = union_of_pools(cand, near)
    k = out.rows.shape[1]
    if k <= places:         # the common case: every place is open to both pools
        if sketched is not None:
            union = rr.shortlist(sketched[1], sketched[0], union, SHORTLIST_PER_RESULT * k)
        rr.search(query, union, out.distances[q], out.rows[q])
        return
    m = int(np.count_nonzero(union >= 0))
    dist, rows = np.full(m, np.inf, np.float32), np.full(m, -1, np.int64)
    found = len(rr.search(query, union, dist, rows))
    keep = admitted(rows[:found], np.isin(rows[:found], cand), places)
    kept = min(k, int(np.count_nonzero(keep)))
    out.rows[q, :kept], out.distances[q, :kept] = rows[:found][keep][:kept], dist[:found][keep][:kept]


def _pool_order(rr, query: np.ndarray, cand: np.ndarray, cand_ham: np.ndarray, out: SearchResult, q: int,
                first: int) -> None:
    """One pool of one query into out's columns from `first`, in pool order, each with its L2 distance."""
    found = int(np.count_nonzero(cand >= 0))
    dist, rows = np.full(found, np.inf, np.float32), np.full(found, -1, np.int64)
    order = rr.search(query, cand, dist, rows)
    out.distances[q, first + order] = dist[:len(order)]
    out.rows[q, first:first + found], out.hamming[q, first:first + found] = cand[:found], cand_ham[:found]


_SEARCH_FIELDS = frozenset(f.name for f in dataclasses.fields(SearchConfig))


def search_params(params: SearchConfig | int | None = None, **options) -> SearchConfig:
    """One search's parameters: `params` (a SearchConfig, or k alone) with `options` replacing its fields."""
    if isinstance(params, SearchConfig) and not options:
        return params
    if params is not None and not isinstance(params, SearchConfig):
        params, options = None, {"k": params, **options}
    unknown = options.keys() - _SEARCH_FIELDS
    if unknown:
        raise HashsearchError(f"unknown search parameter {sorted(unknown)[0]!r}")
    # numpy's integers are integers here; the range checks are check_query's, which knows the collection
    options = {k: int(v) if isinstance(v, np.integer) else v for k, v in options.items()}
    if options.get("mode", "hds") not in MODES:
        raise HashsearchError(f"unknown mode {options['mode']!r}; choose one of {', '.join(MODES)}")
    return SearchConfig(**options) if params is None else dataclasses.replace(params, **options)


def check_query(coll: Collection, coarse: dict, query_codes, query_features, params: SearchConfig):
    """A search's arguments checked against `coll` and its coarse index: (k, pool, codes, features), k and
    pool capped at the live items (pool 0: no H's pool), features float32 (None in bcs mode, which needs none)."""
    k, pool = search_count("k", params.k, coll.items), search_count("pool", params.pool, coll.items, least=0)
    check_probe(params.radius, params.nflip, coll.bits, coarse)
    query_codes = check_query_codes(query_codes, coll.bits)
    if params.mode == "bcs":
        return k, pool, query_codes, None
    if query_features is None:
        raise HashsearchError(f"mode {params.mode} needs query features")
    query_features = np.ascontiguousarray(np.atleast_2d(_numbers(query_features, "query features", "iuf")),
                                          dtype=np.float32)
    if query_features.shape != (len(query_codes), coll.feature_dim):
        raise HashsearchError(f"query features have shape {query_features.shape}; expected "
                              f"({len(query_codes)}, {coll.feature_dim})")
    return k, pool, query_codes, query_features


def check_query_codes(query_codes, bits: int) -> np.ndarray:
    """Query codes as a contiguous uint8 [nq, ceil(bits/8)] array, or the error saying what they are.

    Bytes of any integer type will do; a value past 255 or a float would be wrapped or truncated into
    another code, so they raise.
    """
    codes = _numbers(query_codes, "query codes", "iu")
    if codes.size and codes.dtype != np.uint8 and (codes.min() < 0 or codes.max() > 255):
        raise HashsearchError(f"query codes must be bytes from 0 to 255, got values from {codes.min()} to "
                              f"{codes.max()}")
    query_codes = np.ascontiguousarray(np.atleast_2d(codes), dtype=np.uint8)
    width = code_bytes(bits)
    if query_codes.ndim != 2 or query_codes.shape[1] != width:
        raise HashsearchError(f"query codes have shape {query_codes.shape}; this collection's codes have "
                              f"{bits} bits in {width} bytes")
    return query_codes


def _numbers(values, what: str, kinds: str) -> np.ndarray:
    """`values` as an array of one of numpy's `kinds` ("i", "u", "f"), or the error saying what they are."""
    try:
        array = np.asarray(values)
    except (OverflowError, ValueError, TypeError):       # ragged lists, objects numpy cannot hold
        raise HashsearchError(f"{what} must be an array of numbers, got {type(values).__name__}") from None
    if array.size and array.dtype.kind not in kinds:
        raise HashsearchError(f"{what} must be {'integers' if kinds == 'iu' else 'numbers'}, got {array.dtype} values")
    return array


def check_probe(radius, nflip, bits: int, coarse: dict) -> None:
    """A search's radius and nflip against the code length and the coarse index described by `coarse`."""
    if radius is not None and (isinstance(radius, bool) or not isinstance(radius, (int, np.integer))
                               or not 0 <= radius <= bits):
        raise HashsearchError(f"radius must be an integer from 0 to the code length ({bits}), got {radius!r}")
    coarse_mod.check_nflip(nflip, coarse.get("hash_bits"))


def h_pool_width(pool: int, k: int) -> int:
    """How many of H's nearest codes an hds search takes: at least k, or none with pool 0."""
    return max(pool, k) if pool else 0


def check_h_pool(pool: int, neighbour_sources: bool, whole_pool: bool) -> None:
    """Pool 0 leaves hds the neighbour sources alone: there must be some, and one index must answer."""
    if pool:
        return
    if not neighbour_sources:
        raise HashsearchError("pool 0 leaves hds only the neighbour codes and the cells, and this search has "
                              "neither: the index has no neighbour codes, a radius or --neighbour-pool 0 turns "
                              "them off, or the cells cannot be searched here")
    if whole_pool:
        raise HashsearchError("pool 0 is for a search of one index, not across --ray partitions, whose merge "
                              "cuts H's pools")


def search_count(name: str, value, items: int, least: int = 1) -> int:
    """k or pool, checked (at least `least`: 1, or 0 where 0 means none), and capped at the live items before
    anything of that size is allocated."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise HashsearchError(f"{name} must be an integer, got {value!r}")
    if value < least:
        raise HashsearchError(f"{name} must be {'positive' if least == 1 else f'{least} or more'}, got {value}")
    return int(min(value, max(items, 1)))

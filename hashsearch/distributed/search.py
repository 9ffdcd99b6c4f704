"""Distributed search: a collection's generation split into partitions, one Ray actor each.

A partition is a run of consecutive shards of one generation (Collection.part):
nothing is copied to distribute a collection, and every actor reads the
collection's own files.  Each actor builds, in memory, a coarse index of the
kind and settings `build-index` recorded over its live rows, and answers a
search for them: the coarse pool, its rerank by L2 (hds), Hamming alone (bcs)
or an exhaustive scan (es).  The driver merges the partitions' answers with
engine.index.merge_partitions, cutting the merged pool by (Hamming, row) where
one index over every row would.  With a flat coarse index the results (ids,
Hamming and L2) are those of Index; with hash kinds too when a radius bounds
the pool, but without one, rows tied at the pool's edge may differ, since
faiss's hash tables give ties in bucket order, not row order.

>>> with ray_cluster():                       # or ray.init(address="auto") first
...     index = ShardedIndex("coll", partitions=4)
...     res = index.search(codes, feats, k=10)  # an engine.SearchResult, as Index.search's

A partition's actor that dies is restarted by Ray (up to MAX_RESTARTS times);
the driver loads its partition into it again and retries the query once.
"""
from __future__ import annotations

import dataclasses
import threading
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..config import RaySearchConfig, SearchConfig
from ..engine.index import (Index, SearchResult, SearchTarget, check_h_pool, check_query, check_query_codes,
                            hamming_of_results, merge_partitions, neighbour_pool, search_params)
from ..errors import HashsearchError
from ..shards import Collection, GenerationGone, read_manifest
from .cluster import MAX_RESTARTS, check_resources, cluster_cpus, import_ray, task_error, wait_started

# An actor keeps the generation searches are starting on and the one before, for searches in flight.
_KEEP_GENERATIONS = 2
# Ray sends arguments this small inside the call itself; larger ones are worth one shared put.
_INLINE_BYTES = 100 * 1024


def plan_partitions(shard_rows: list[int], partitions: int, where) -> list[tuple[int, int]]:
    """[first, end) shard ranges of `partitions` consecutive runs with about equal rows each."""
    if partitions > len(shard_rows):
        raise HashsearchError(f"{partitions} partitions need at least {partitions} shards; {where} has "
                              f"{len(shard_rows)} (encode it with a smaller --shard-size, or use fewer partitions)")
    ends = np.cumsum(shard_rows)
    cuts = [0]
    for j in range(1, partitions):
        # the first shard that ends past j/P of the rows, leaving at least one shard for each partition after
        cut = int(np.searchsorted(ends, ends[-1] * j / partitions, side="left")) + 1
        cuts.append(min(max(cut, cuts[-1] + 1), len(shard_rows) - (partitions - j)))
    cuts.append(len(shard_rows))
    return list(zip(cuts[:-1], cuts[1:]))


class PartitionSearcher:
    """What a partition's actor runs: the partition's Index for each generation loaded."""

    def __init__(self, root: str):
        self.root = root
        self.indexes: dict[int, Index] = {}

    def load(self, manifest: dict, first: int, end: int) -> int:
        generation = int(manifest.get("generation", 0))
        if generation not in self.indexes:
            self.indexes[generation] = Index.partition(Collection.part(self.root, manifest, first, end),
                                                       manifest["index"])
        # The one just loaded stays (a retry may load an old generation again), with the newest of the others.
        others = sorted(g for g in self.indexes if g != generation)
        for old in others[:max(0, len(others) - (_KEEP_GENERATIONS - 1))]:
            self.indexes.pop(old).close()
        return self.indexes[generation].collection.items

    def search(self, generation: int, codes, feats, params: SearchConfig):
        index = self.indexes.get(generation)
        if index is None:       # a restarted actor: the driver loads the partition again
            raise _NotLoaded(f"generation {generation} is not loaded")
        if index.collection.items == 0:
            empty = np.zeros((len(codes), 0))
            return empty.astype(np.int32), empty.astype(np.int64), empty.astype(np.float32)
        res = index.search_pool(codes, feats, params)
        return res.hamming, res.rows, res.distances


class _NotLoaded(HashsearchError):
    pass


class PartitionAnswers(NamedTuple):
    collection: Collection      # the generation they answer for
    parts: list                 # (hamming, rows, distances) [nq, m_i] per partition
    params: SearchConfig        # k, pool and the neighbour pool as capped for this generation


class ShardedIndex(SearchTarget):
    """Index's search over a collection split into `partitions` partitions on Ray actors.

    It needs a connection to Ray (distributed.ray_cluster, or the caller's ray.init).  Like Index,
    it pins a generation; refresh() moves every partition to the newest one.
    """

    def __init__(self, collection, partitions: int = RaySearchConfig.partitions, *,
                 cpus_per_actor: float | None = None, start_timeout: float = RaySearchConfig.start_timeout):
        self._ray = ray = import_ray()
        if not ray.is_initialized():
            raise HashsearchError("ShardedIndex needs a Ray connection: open one with hashsearch.distributed.ray_cluster")
        RaySearchConfig(ray=True, partitions=partitions, start_timeout=start_timeout)    # --partitions' checks
        self.root = Path(collection.root if isinstance(collection, Collection) else collection)
        self.partitions = partitions
        # Fractional CPUs, so that P actors fit on a cluster of fewer CPUs (whole ones would wait forever).
        cpus = cpus_per_actor if cpus_per_actor is not None else min(1.0, cluster_cpus(ray) / partitions)
        check_resources(ray, cpus, 0, partitions)
        actor, token = ray.remote(PartitionSearcher), uuid.uuid4().hex[:8]
        self.actors = [actor.options(num_cpus=cpus, max_restarts=MAX_RESTARTS,
                                     name=f"hashsearch-partition-{token}-{i}").remote(str(self.root))
                       for i in range(partitions)]
        self._refresh_lock = threading.Lock()
        self._closed = False
        self._state = None
        self._start_timeout = start_timeout
        try:
            self._state = self._load(collection if isinstance(collection, Collection) else Collection.open(self.root))
        except BaseException:
            self.close()
            raise

    # -- generations ---------------------------------------------------------------------
    def _load(self, coll: Collection, refreshing: bool = False):
        """Load `coll`'s generation into the actors; the state searches then use.  A refresh after a
        compaction left fewer shards than partitions uses fewer actors, rather than fail every search."""
        manifest = coll.manifest
        if manifest.get("index") is None:
            raise HashsearchError(f"no index in {self.root}; run `hashsearch build-index {self.root}` first")
        count = min(self.partitions, max(1, len(coll.shards))) if refreshing else self.partitions
        plan = plan_partitions([s.rows for s in coll.shards], count, self.root)
        first_rows = [int(coll.offsets[a]) for a, _ in plan]
        if not refreshing:      # the actors' first call: bad partitions are refused before any wait
            wait_started(self._ray, self.actors, self._start_timeout, "partition")
        self._get([a.load.remote(manifest, s, e) for a, (s, e) in zip(self.actors, plan)])
        return coll, plan, first_rows

    def refresh(self) -> bool:
        """Move every partition to the collection's newest generation; False if there is none newer."""
        with self._refresh_lock:
            coll = self._current()[0]
            if read_manifest(self.root).get("generation", 0) == coll.generation:
                return False
            for _ in range(5):
                try:
                    self._state = self._load(Collection.open(self.root, previous=coll), refreshing=True)
                    return True
                except GenerationGone:      # a writer published again while the actors opened it
                    continue
            raise HashsearchError(f"collection {self.root} changed under every attempt to load it")

    def _current(self):
        if self._closed:
            raise HashsearchError("this index is closed")
        return self._state

    @property
    def collection(self) -> Collection:
        return self._current()[0]

    # -- searching -------------------------------------------------------------------------
    def search(self, query_codes: np.ndarray, query_features: np.ndarray | None = None,
               params: SearchConfig | int | None = None, **options) -> SearchResult:
        answers = self.partition_answers(query_codes, query_features, search_params(params, **options))
        p = answers.params          # as capped for the generation answered, the neighbour pool included
        rows, ham, dist = merge_partitions(answers.parts, p.k, p.mode, p.pool, p.neighbour_pool, p.neighbour_places)
        if p.mode == "hds" and p.neighbour_pool:      # the union's merge leaves H's distances to measure
            ham = hamming_of_results(check_query_codes(query_codes, answers.collection.bits),
                                     answers.collection.codes(), rows)
        ids = np.where(rows >= 0, answers.collection.ids()[rows], -1)
        return SearchResult(rows=rows, ids=ids, hamming=ham, distances=dist)

    def partition_answers(self, query_codes, query_features=None, params: SearchConfig | None = None
                          ) -> "PartitionAnswers":
        """Every partition's answer, rows numbered in the whole collection: what search() merges
        (`bench sharded` times the two apart)."""
        coll, plan, first_rows = self._current()
        params = search_params(params)
        # Checked here as Index checks them, so that bad input is one error, not one from every partition.
        k, pool, codes, feats = check_query(coll, coll.manifest["index"]["coarse"], query_codes, query_features,
                                            params)
        # A partition answers with its whole pool, which the sketch's cells cannot give (engine/index.py): the
        # cells are searched on one machine only, and a --ray search's pool is the neighbour codes' alone.
        if params.neighbour_cells:
            raise HashsearchError("--neighbour-cells is searched on one machine only, not across --ray "
                                  "partitions; leave it unset or 0")
        check_h_pool(pool, True, whole_pool=True)      # the merge cuts H's pools, in every mode
        params = dataclasses.replace(params, k=k, pool=pool, neighbour_cells=0,
                                     neighbour_pool=neighbour_pool(coll.manifest["index"], params, coll.items))
        if feats is not None and feats.nbytes > _INLINE_BYTES:
            feats = self._ray.put(feats)    # one copy in the object store for every partition, not one per call
        args = (coll.generation, codes, feats, params)
        answers = self._get([a.search.remote(*args) for a in self.actors[:len(plan)]],
                            retry=lambda i: self._retry(i, coll, plan, args))
        parts = [(h, np.where(r >= 0, r + first, -1), d) for (h, r, d), first in zip(answers, first_rows)]
        return PartitionAnswers(coll, parts, params)

    def _retry(self, i: int, coll: Collection, plan, args):
        """Partition i's answer once more, after loading it into its (restarted) actor again."""
        self._get([self.actors[i].load.remote(coll.manifest, *plan[i])])
        return self._get([self.actors[i].search.remote(*args)])[0]

    def _get(self, futures, retry=None) -> list:
        """Every partition's answer; `retry(i)` gets partition i's once more where its actor died."""
        ray = self._ray
        try:
            return ray.get(futures)         # one wait for all: the common case, and the fast one
        except ray.exceptions.RayError:
            pass                            # sorted out one by one below (results already in are kept)
        out, error = [], None
        for i, future in enumerate(futures):
            try:
                out.append(ray.get(future))
                continue
            except ray.exceptions.RayTaskError as exc:
                lost = isinstance(exc.cause, _NotLoaded)
                failure = task_error(exc) or HashsearchError(f"partition {i} of {self.root} failed: {exc.cause!r}")
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                lost = True
                failure = HashsearchError(f"partition {i} of {self.root}: its actor died ({type(exc).__name__})")
            except ray.exceptions.RayError as exc:         # the object store, the cluster itself
                lost = False
                failure = HashsearchError(f"partition {i} of {self.root}: {type(exc).__name__}: "
                                          f"{(str(exc).splitlines() or [''])[0]}")
            if lost and retry is not None and error is None:
                out.append(retry(i))
            else:
                error = error or failure        # the others are still collected: none is left unread
        if error is not None:
            raise error
        return out

    def close(self) -> None:
        """Stop the partitions' actors; any later call raises."""
        if self._closed:
            return
        self._closed = True
        for a in self.actors:
            self._ray.kill(a, no_restart=True)
        if self._state is not None:
            self._state[0].close()



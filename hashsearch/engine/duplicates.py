"""Near-duplicate pairs and groups of a collection, from its neighbour codes and F7 (numpy in, numpy out).

  1. Candidates: each item with each of its JOIN_NEIGHBOURS nearest neighbour codes (engine/neighbours.py:
     ITQ fitted to F7, so Hamming distance follows L2) that lies within `radius`: a Hamming self-join by
     faiss's k-nearest search, a block of query rows at a time.  Up to EXACT_JOIN_ROWS items the join
     scans every code (IndexBinaryFlat), so an item's nearest codes are exactly those; past that, a scan
     costs n^2 (about 1000 s at 1M on this project's 2-core machine), so the codes go in an
     IndexBinaryIVF and each item is searched in its JOIN_PROBES nearest cells only.  Near-duplicates lie
     far closer than a cell's width, so they share a cell almost always: on 1M synthetic items it found
     999,600 of 999,679 planted pairs (README, "Near-duplicate groups"); flat's share was not measured there.
  2. Exact check: each candidate pair's L2 distance on F7, read through a callable (the collection's
     reader), block by block as the join yields them, so memory holds only the pairs kept; pairs within
     `max_distance` are the duplicates.  Distances are in units of the
     collection's median F7 length (`feature_scale`), so that one threshold serves models whose F7
     differ in scale.  With `relative` (`duplicates --relative`), every candidate of an item is checked,
     within the radius or not, and its distance to its LOCAL_SCALE_NEIGHBOUR-th nearest is its local
     scale: a pair is also kept within `relative` times it, seen from either end (so, the larger of the
     two items' scales).  Inside a dense class that asks for a closer copy than in a sparse one.
  Pairs also come from the items' miniatures (engine/copies.py: edited copies, which F7 places far apart),
  given to find_duplicates as `copies`; they are kept whatever their F7 distance, which is what they report.
  3. Groups: connected components of the pairs.  Chaining (a~b, b~c, ... where a and z look nothing
     alike) is bounded by splitting: a group is a centre and members each paired with it.
     A component in which one item is paired with every other stays whole, centred on it; any other is
     split greedily: the item with the most unassigned partners (ties: the smaller sum of distances to
     its partners, then the lower position) takes them as its group, and so on until none is left.  By F7's
     test alone, every group's diameter is then at most twice the threshold.  The centre is the group's
     most central item.

Positions here are indexes into the `codes` given; the caller maps them to rows and ids
(Index.duplicates passes live rows only, so deleted items never appear).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable

import faiss
import numpy as np

from ..config import LOCAL_SCALE_NEIGHBOUR
from ..errors import HashsearchError
from .threads import MAX_THREADS, faiss_threads

# All-pairs by a flat scan below this: 100k items take about 10 s on this project's machine.
EXACT_JOIN_ROWS = 100_000
# Past it, IVF cells of about this many items, and the cells each item is joined against.
JOIN_CELL_ROWS = 1000
JOIN_PROBES = 8
JOIN_TRAIN_ROWS = 100_000
# Each item's candidates are its nearest codes, this many at most: without a cap, items of a dense region
# (a class, a burst of shots) within the radius of thousands of others make candidates grow as n^2.
JOIN_NEIGHBOURS = 64
# Query rows per search: their candidates stay a few MB.
JOIN_BLOCK_ROWS = 8192
# Pairs checked per feature read: at most twice as many F7 rows, 128 MB of 4096-d float32.
CHECK_BLOCK_PAIRS = 4096
# F7 rows whose lengths set the unit of distance: the median settles long before this.
SCALE_SAMPLE_ROWS = 10_000


@dataclass
class Duplicates:
    """Pairs within the threshold and the groups they form, in positions of the codes given."""
    pairs: np.ndarray       # int64 [m, 2], i < j, each pair once, sorted
    distances: np.ndarray   # float32 [m], L2 on F7 in units of `scale`
    labels: np.ndarray      # int64 [n], group of each position, -1 for none; groups numbered by size, largest first
    centres: np.ndarray     # int64 [groups], each group's most central position
    to_centre: np.ndarray   # float32 [n], each grouped position's distance to its group's centre, nan for none
    scale: float            # the median F7 length the distances are measured in
    candidates: int         # candidate pairs checked by L2 (a pair found from both ends counts twice)

    def groups(self, min_group: int = 2) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each group of at least `min_group`, largest first: (positions, distance of each to the centre),
        the centre first, the others by distance, then position."""
        grouped = np.flatnonzero(self.labels >= 0)
        order = grouped[np.lexsort((grouped, self.to_centre[grouped], self.labels[grouped]))]
        bounds = np.searchsorted(self.labels[order], np.arange(len(self.centres) + 1))
        return [(order[a:b], self.to_centre[order[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])
                if b - a >= min_group]


def check_thresholds(max_distance, radius, bits: int, relative=None) -> None:
    named = [("max distance", max_distance), ("radius", radius)]
    if relative is not None:
        named.append(("relative", relative))
    for name, value in named:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not np.isfinite(value) or value < 0:
            raise HashsearchError(f"{name} must be a finite number of zero or more, got {value!r}")
    if int(radius) != radius or radius > bits:
        raise HashsearchError(f"radius must be a whole number of bits from 0 to the codes' {bits}, got {radius}")


def find_duplicates(codes: np.ndarray, features: Callable[[np.ndarray], np.ndarray], *, max_distance: float,
                    radius: int, scale: float, queries: np.ndarray | None = None,
                    relative: float | None = None, scale_neighbour: int = LOCAL_SCALE_NEIGHBOUR,
                    copies: np.ndarray | None = None) -> Duplicates:
    """The duplicates among `codes` (uint8 [n, bytes], packed neighbour codes): `features(positions)` gives
    F7 rows [len, D]; `scale` the unit of distance (feature_scale); `queries`, positions to join against
    all the others instead of every pair (the new items of `duplicates --since`).  With `relative`, a pair
    is also kept when its distance is at most `relative` times the local scale of either item: its distance
    to its `scale_neighbour`-th nearest candidate (see local_scales).  `copies` (int64 [m, 2], i < j) are
    pairs found otherwise (engine/copies.py), kept whatever their F7 distance, which they are given."""
    codes = np.ascontiguousarray(codes, np.uint8)
    check_thresholds(max_distance, radius, codes.shape[1] * 8, relative)
    if not np.isfinite(scale) or scale <= 0:
        raise HashsearchError(f"the unit of distance must be positive, got {scale}")
    kept, kept_dist, candidates = [], [], 0
    # Checked a block at a time: memory holds the pairs kept, not the candidates.
    for q, found, hamming in join_blocks(codes, queries):
        near = (found >= 0) & (found != q[:, None])
        within = near & (hamming <= radius)
        mine = np.broadcast_to(q[:, None], found.shape)
        block = _pairs(mine[within], found[within])
        if relative is None:
            dist = pair_distances(block, features, scale)
            keep = dist <= max_distance
        else:           # every candidate's distance, for each query's local scale; then those within the radius
            table = np.full(found.shape, np.inf, np.float32)
            table[near] = pair_distances(np.stack([mine[near], found[near]], 1), features, scale)
            local = local_scales(table, scale_neighbour)
            dist = table[within]
            keep = (dist <= max_distance) | (dist <= relative * np.broadcast_to(local[:, None], found.shape)[within])
        kept.append(block[keep])
        kept_dist.append(dist[keep])
        candidates += len(block)
    if copies is not None and len(copies):
        kept.append(np.asarray(copies, np.int64))
        kept_dist.append(pair_distances(kept[-1], features, scale))
    pairs = np.concatenate(kept) if kept else np.zeros((0, 2), np.int64)
    dist = np.concatenate(kept_dist) if kept else np.zeros(0, np.float32)
    # Both ends of a pair may find it: keep it once.
    pairs, first = np.unique(pairs, axis=0, return_index=True)
    dist = dist[first]
    labels, centres = group_pairs(len(codes), pairs, dist)
    return Duplicates(pairs, dist, labels, centres, distances_to_centres(pairs, dist, labels, centres),
                      float(scale), candidates)


def feature_scale(features: Callable[[np.ndarray], np.ndarray], n: int, seed: int = 0) -> float:
    """The median F7 length over a seeded sample of positions 0..n-1."""
    if n == 0:
        raise HashsearchError("no items to measure")
    rows = np.arange(n) if n <= SCALE_SAMPLE_ROWS else \
        np.sort(np.random.default_rng(seed).choice(n, SCALE_SAMPLE_ROWS, replace=False))
    norms = np.concatenate([np.linalg.norm(features(rows[a:a + CHECK_BLOCK_PAIRS]), axis=1)
                            for a in range(0, len(rows), CHECK_BLOCK_PAIRS)])
    scale = float(np.median(norms))
    if not np.isfinite(scale) or scale <= 0:
        raise HashsearchError("the items' F7 are all zero or not finite; they have no distances to compare")
    return scale


def _join_index(codes: np.ndarray):
    """What the join searches: a flat index, or an IVF one past EXACT_JOIN_ROWS (see the module's doc)."""
    bits = codes.shape[1] * 8
    if len(codes) <= EXACT_JOIN_ROWS:
        index = faiss.IndexBinaryFlat(bits)
    else:
        cells = max(1, len(codes) // JOIN_CELL_ROWS)
        index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(bits), bits, cells)
        sample = np.random.default_rng(0).choice(len(codes), min(len(codes), JOIN_TRAIN_ROWS), replace=False)
        index.train(codes[np.sort(sample)])
        index.nprobe = JOIN_PROBES
    index.add(codes)
    return index


def join_blocks(codes: np.ndarray, queries: np.ndarray | None = None):
    """Yield, a block of query positions at a time, (queries [b], their JOIN_NEIGHBOURS + 1 nearest codes'
    positions [b, k] (-1 padded; an item finds itself), those codes' Hamming distances [b, k])."""
    n = len(codes)
    queries = np.arange(n) if queries is None else np.unique(np.asarray(queries, np.int64))
    if n < 2 or not len(queries):
        return
    index = _join_index(codes)
    k = min(JOIN_NEIGHBOURS + 1, n)         # + 1: an item finds itself
    with faiss_threads(MAX_THREADS):
        for a in range(0, len(queries), JOIN_BLOCK_ROWS):
            q = queries[a:a + JOIN_BLOCK_ROWS]
            dist, found = index.search(codes[q], k)
            yield q, found.astype(np.int64), dist


def candidate_blocks(codes: np.ndarray, radius: int, queries: np.ndarray | None = None):
    """Yield blocks of candidate pairs (int64 [m, 2], i < j): each query position with each of its
    JOIN_NEIGHBOURS nearest codes that lies within `radius` bits.  A pair may come twice, from both ends."""
    for q, found, dist in join_blocks(codes, queries):
        near = (found >= 0) & (dist <= radius) & (found != q[:, None])
        yield _pairs(np.broadcast_to(q[:, None], found.shape)[near], found[near])


def _pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """int64 [m, 2]: each (a, b), smaller first."""
    return np.stack([np.minimum(a, b), np.maximum(a, b)], 1)


def local_scales(table: np.ndarray, neighbour: int) -> np.ndarray:
    """Each query's distance to its `neighbour`-th nearest candidate (float32 [b]), nan where it has fewer:
    `table` [b, k] holds each query's candidate distances, inf where there is no candidate."""
    if table.shape[1] < neighbour:
        return np.full(len(table), np.nan, np.float32)
    out = np.partition(table, neighbour - 1, axis=1)[:, neighbour - 1]
    return np.where(np.isfinite(out), out, np.nan)


def hamming_join(codes: np.ndarray, radius: int, queries: np.ndarray | None = None) -> np.ndarray:
    """Every candidate pair of `candidate_blocks`, each once, sorted."""
    blocks = list(candidate_blocks(codes, radius, queries))
    return np.unique(np.concatenate(blocks), axis=0) if blocks else np.zeros((0, 2), np.int64)


def pair_distances(pairs: np.ndarray, features: Callable[[np.ndarray], np.ndarray], scale: float) -> np.ndarray:
    """L2 distance of each pair's F7 / scale, float32 [m]; features are read once per block of pairs."""
    out = np.empty(len(pairs), np.float32)
    for a in range(0, len(pairs), CHECK_BLOCK_PAIRS):
        block = pairs[a:a + CHECK_BLOCK_PAIRS]
        rows, where = np.unique(block, return_inverse=True)
        feats = np.asarray(features(rows), np.float32)
        where = where.reshape(block.shape)
        diff = feats[where[:, 0]] - feats[where[:, 1]]
        out[a:a + len(block)] = np.sqrt(np.einsum("ij,ij->i", diff, diff)) / scale
    return out


def distances_to_centres(pairs: np.ndarray, distances: np.ndarray, labels: np.ndarray,
                         centres: np.ndarray) -> np.ndarray:
    """Each grouped position's distance to its centre (float32 [n], nan where ungrouped), found among the
    pairs: every member of a group is paired with its centre."""
    out = np.full(len(labels), np.nan, np.float32)
    grouped = np.flatnonzero(labels >= 0)
    centre = centres[labels[grouped]]
    out[centres] = 0.0
    members = grouped != centre
    p, c = grouped[members], centre[members]
    n = np.int64(len(labels))
    keys = pairs[:, 0] * n + pairs[:, 1]            # pairs are sorted, so are their keys
    at = np.searchsorted(keys, np.minimum(p, c) * n + np.maximum(p, c))
    out[p] = distances[at]
    return out


def connected_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """The smallest position of each position's component (int64 [n]), by vectorised union-find."""
    parent = np.arange(n, dtype=np.int64)
    if not len(pairs):
        return parent
    i, j = pairs[:, 0], pairs[:, 1]
    while True:
        pi, pj = parent[i], parent[j]
        if np.array_equal(pi, pj):
            return parent
        np.minimum.at(parent, np.maximum(pi, pj), np.minimum(pi, pj))
        while True:         # point every position at its root
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up


def group_pairs(n: int, pairs: np.ndarray, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels int64 [n], centres int64 [groups]): the components of the pairs, split where they chain (see
    the module's doc); groups numbered largest first, then by centre; positions in no pair get -1."""
    labels = np.full(n, -1, np.int64)
    if not len(pairs):
        return labels, np.zeros(0, np.int64)
    root = connected_components(n, pairs)
    both = np.concatenate([pairs[:, 0], pairs[:, 1]])
    other = np.concatenate([pairs[:, 1], pairs[:, 0]])
    dist2 = np.concatenate([distances, distances]).astype(np.float64)
    order = np.argsort(both, kind="stable")
    both, other, dist2 = both[order], other[order], dist2[order]
    starts = np.searchsorted(both, np.arange(n + 1))
    degree = np.diff(starts)
    total = np.bincount(both, weights=dist2, minlength=n)
    in_pairs = np.flatnonzero(degree)
    comp_of = root[in_pairs]
    comp_order = np.argsort(comp_of, kind="stable")
    members_sorted = in_pairs[comp_order]
    cuts = np.flatnonzero(np.diff(comp_of[comp_order])) + 1
    groups: list[tuple[int, np.ndarray]] = []
    for members in np.split(members_sorted, cuts):
        best = members[np.lexsort((members, total[members], -degree[members]))[0]]
        if degree[best] == len(members) - 1:        # a star: one item is paired with every other
            groups.append((int(best), members))
        else:
            groups.extend(_split(members, starts, other, degree, total))
    groups.sort(key=lambda g: (-len(g[1]), g[0]))
    centres = np.array([c for c, _ in groups], np.int64)
    for g, (_, members) in enumerate(groups):
        labels[members] = g
    return labels, centres


def _split(members: np.ndarray, starts, other, degree, total) -> list[tuple[int, np.ndarray]]:
    """Greedy centres of one chaining component: each takes its unassigned partners (see the module's doc)."""
    taken: set[int] = set()
    heap = [(-int(degree[m]), float(total[m]), int(m)) for m in members]
    heapq.heapify(heap)
    groups = []
    while heap:
        neg, _, m = heapq.heappop(heap)
        if m in taken:
            continue
        partners = [p for p in other[starts[m]:starts[m + 1]].tolist() if p not in taken]
        if len(partners) != -neg:       # partners were taken since: its place in the queue is stale
            heapq.heappush(heap, (-len(partners), float(total[m]), m))
            continue
        taken.add(m)
        taken.update(partners)
        if partners:
            groups.append((m, np.sort(np.array([m, *partners], np.int64))))
    return groups


@dataclass
class CollectionDuplicates:
    """Index.duplicates's answer: the duplicates among a generation's live items, with positions mapped."""
    found: Duplicates       # in positions of `rows`
    rows: np.ndarray        # int64 [n], the live rows, ascending
    ids: np.ndarray         # int64 [n], their ids
    generation: int
    since_id: int | None    # with `since`: the first id added after that generation

    @property
    def pairs(self) -> np.ndarray:
        """int64 [m, 2]: the ids of each pair, smaller first, each pair once."""
        return self.ids[self.found.pairs]

    @property
    def distances(self) -> np.ndarray:
        return self.found.distances

    def groups(self, min_group: int = 2, limit: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """(rows, distances to the centre) of each group, largest first, the centre first in each."""
        return [(self.rows[members], dist) for members, dist in self.found.groups(min_group)[:limit]]


def collection_duplicates(gen, params=None, **options) -> CollectionDuplicates:
    """The duplicates among the live items of `gen` (an engine.generation.Generation), by `params` (a
    DuplicatesConfig) with `options` replacing its fields."""
    import dataclasses
    from ..config import COPY_RATIO, DUPLICATE_RADIUS, DuplicatesConfig
    from .copies import copy_pairs
    from ..shards.manifest import first_id_after
    params = DuplicatesConfig(**options) if params is None else dataclasses.replace(params, **options)
    coll = gen.collection
    if coll.items == 0:
        raise HashsearchError(f"collection {coll.root} is empty")
    rows, codes = gen.live_neighbour_codes()
    ids = gen.ids[rows]

    def features(positions):
        return coll.features(rows[positions])

    queries = since_id = None
    if params.since is not None:
        since_id = first_id_after(coll.manifest, params.since, coll.root)
        queries = np.flatnonzero(ids >= since_id)
    # The default radius is capped at the code length: neighbour codes of a small collection are shorter.
    radius = min(params.radius, codes.shape[1] * 8) if params.radius == DUPLICATE_RADIUS else params.radius
    # Edited copies, by the items' miniatures; a collection whose shards lack them has F7 alone.
    miniatures = coll.miniatures()
    copies = None if miniatures is None or not params.copy_distance else \
        copy_pairs(miniatures[rows], params.copy_distance, COPY_RATIO, LOCAL_SCALE_NEIGHBOUR, queries)[0]
    found = find_duplicates(codes, features, max_distance=params.max_distance, radius=radius,
                            scale=feature_scale(features, len(rows)), queries=queries, relative=params.relative,
                            copies=copies)
    return CollectionDuplicates(found, rows, ids, coll.generation, since_id)

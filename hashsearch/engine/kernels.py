"""The coarse level's merge and ordering kernels: numpy in, numpy out, no files and no faiss.

Candidates are (hamming, rows) pairs of [nq, m] arrays, padded with -1 where a
query has fewer than m, and ordered by (Hamming, row): the order faiss's flat
binary index itself uses, so that merged parts answer as one index would.
Each kernel checks the shapes it is given (a wrong one would silently pair a
query with another query's candidates) and raises ValueError.
"""
from __future__ import annotations

import numpy as np

from ..codes import hamming_distances

_NO_ROW = np.iinfo(np.int64).max
# The merge key packs (Hamming, row) into one int64: Hamming below 2**23, rows below 2**40.
_ROW_BITS = 40


def _check_pairs(parts, what: str, width: int = 2) -> None:
    if not parts:
        raise ValueError(f"{what}: no parts to merge")
    nq = parts[0][0].shape[0]
    for part in parts:
        if len(part) != width or any(a.ndim != 2 or a.shape != part[0].shape for a in part) or part[0].shape[0] != nq:
            raise ValueError(f"{what}: each part must be {width} arrays of one shape [nq, m] with the same nq, "
                             f"got {[a.shape for a in part]}")


def popcount_distances(query_codes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Hamming distance of each row of `codes` [nq, k, B] to its query [nq, B], int32 like SearchResult.hamming."""
    return hamming_distances(query_codes[:, None, :], codes).astype(np.int32)


def nearest_of_ranges(lims: np.ndarray, dist: np.ndarray, labels: np.ndarray, pool: int):
    """The `pool` nearest of each query's range-search results: (hamming, rows) [nq, m],
    sorted by distance then row, padded with -1.  One sort for the whole batch."""
    if lims.ndim != 1 or len(lims) < 1 or dist.shape != labels.shape or len(dist) != int(lims[-1]):
        raise ValueError(f"nearest_of_ranges: lims {lims.shape} ending at {lims[-1] if len(lims) else None} "
                         f"against {dist.shape} distances and {labels.shape} labels")
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
    _check_pairs(parts, "merge_candidates")
    ham = np.concatenate([h for h, _ in parts], axis=1).astype(np.int64)
    rows = np.concatenate([r for _, r in parts], axis=1)
    order = _nearest_codes(ham, rows, pool)
    rows, ham = np.take_along_axis(rows, order, 1), np.take_along_axis(ham, order, 1)
    return np.where(rows >= 0, ham, -1).astype(np.int32), rows


def merge_partitions(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int, mode: str, pool: int,
                     neighbour_pool: int = 0, neighbour_places: int | None = None):
    """One search's answer from its partitions' answers (Index.search_pool), each (hamming, rows, distances)
    [nq, m_i] with rows numbered in the whole collection: (rows, hamming, distances) [nq, k].

    k and pool must be capped as Index.search caps them.  hds cuts the merged pool at the pool's
    size by (Hamming, row), exactly where one index over every row cuts it, then ranks it by L2; bcs
    keeps the k first by (Hamming, row); es the k nearest.  Equal L2 distances, which only duplicate
    features give, come in partition order.  With a `neighbour_pool`, each part's last neighbour_pool
    columns are its neighbour pool, by neighbour-code Hamming distance: that pool is cut the same way,
    the union of both pools is ranked by L2 (ties by row), rows of the neighbour pool alone taking at
    most the first `neighbour_places` places (admitted), and the hamming returned is -1 throughout (the
    caller measures H's distances of the results).
    """
    _check_pairs(parts, "merge_partitions", width=3)
    if mode not in ("bcs", "es", "hds") or k <= 0 or pool <= 0 or neighbour_pool < 0:
        raise ValueError(f"merge_partitions: mode {mode!r}, k {k}, pool {pool}, neighbour pool {neighbour_pool}")
    if mode == "hds" and neighbour_pool:
        places = k if neighbour_places is None else neighbour_places
        return _merge_union(parts, k, max(pool, k), neighbour_pool, places)
    ham = np.concatenate([h for h, _, _ in parts], axis=1).astype(np.int64)
    rows = np.concatenate([r for _, r, _ in parts], axis=1)
    dist = np.concatenate([d for _, _, d in parts], axis=1)
    if mode == "es":
        order = np.argsort(np.where(rows >= 0, dist, np.inf), axis=1, kind="stable")[:, :k]
    else:
        order = _nearest_codes(ham, rows, max(pool, k) if mode == "hds" else k)
        if mode == "hds":
            pooled = np.where(np.take_along_axis(rows, order, 1) >= 0, np.take_along_axis(dist, order, 1), np.inf)
            order = np.take_along_axis(order, np.argsort(pooled, axis=1, kind="stable")[:, :k], 1)
    rows, ham, dist = (np.take_along_axis(a, order, 1) for a in (rows, ham, dist))
    return _padded(rows, ham, dist, k, np.nan if mode == "bcs" else np.inf)


def _nearest_codes(ham: np.ndarray, rows: np.ndarray, m: int) -> np.ndarray:
    """Positions of each query's m first candidates by (Hamming, row)."""
    key = np.where(rows >= 0, (ham.astype(np.int64) << _ROW_BITS) | rows, _NO_ROW)
    return np.argsort(key, axis=1, kind="stable")[:, :m]


def _merge_union(parts, k: int, width: int, npool: int, places: int):
    """hds over two pools: each cut across the parts where one index cuts it, then their union by L2."""
    if any(r.shape[1] < npool for _, r, _ in parts):
        raise ValueError(f"merge_partitions: a part is narrower than its neighbour pool of {npool}")
    picked_rows, picked_dist = [], []
    for cols, m in ((slice(None, -npool), width), (slice(-npool, None), npool)):
        ham = np.concatenate([h[:, cols] for h, _, _ in parts], axis=1)
        rows = np.concatenate([r[:, cols] for _, r, _ in parts], axis=1)
        dist = np.concatenate([d[:, cols] for _, _, d in parts], axis=1)
        order = _nearest_codes(ham, rows, m)
        picked_rows.append(np.take_along_axis(rows, order, 1))
        picked_dist.append(np.take_along_axis(dist, order, 1))
    h_rows = picked_rows[0]
    rows, dist = np.concatenate(picked_rows, axis=1), np.concatenate(picked_dist, axis=1)
    by_row = np.argsort(rows, axis=1, kind="stable")
    sorted_rows = np.take_along_axis(rows, by_row, 1)
    repeat = np.zeros(rows.shape, bool)         # a row both pools hold counts once
    repeat[:, 1:] = (sorted_rows[:, 1:] == sorted_rows[:, :-1]) & (sorted_rows[:, 1:] >= 0)
    np.put_along_axis(repeat, by_row, repeat.copy(), 1)
    gone = repeat | (rows < 0)
    rows = np.where(gone, -1, rows)
    order = np.lexsort((np.where(gone, _NO_ROW, rows), np.where(gone, np.inf, dist)))
    rows, dist = np.take_along_axis(rows, order, 1), np.take_along_axis(dist, order, 1)
    if k > places:
        out_rows, out_dist = np.full((len(rows), k), -1, np.int64), np.full((len(rows), k), np.inf, np.float32)
        for q in range(len(rows)):
            found = rows[q] >= 0
            keep = admitted(rows[q][found], np.isin(rows[q][found], h_rows[q]), places)
            kept = min(k, int(np.count_nonzero(keep)))
            out_rows[q, :kept], out_dist[q, :kept] = rows[q][found][keep][:kept], dist[q][found][keep][:kept]
        rows, dist = out_rows, out_dist
    rows, dist = rows[:, :k], dist[:, :k]
    return _padded(rows, np.full(rows.shape, -1, np.int64), dist, k, np.inf)


def _padded(rows, ham, dist, k: int, no_distance: float):
    pad = k - rows.shape[1]
    if pad > 0:
        rows, ham = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1), np.pad(ham, ((0, 0), (0, pad)), constant_values=-1)
        dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=no_distance)
    found = rows >= 0
    return rows, np.where(found, ham, -1).astype(np.int32), np.where(found, dist, no_distance).astype(np.float32)


def admitted(ranked: np.ndarray, from_h: np.ndarray, places: int) -> np.ndarray:
    """Which of one query's candidates, ranked by L2 [m], stay in an hds ranking: those of H's pool
    (`from_h`), and those found only by the neighbour codes within the first `places` of the ranking."""
    if ranked.shape != from_h.shape or ranked.ndim != 1:
        raise ValueError(f"admitted: {ranked.shape} candidates against {from_h.shape} flags")
    return from_h | (np.arange(len(ranked)) < places)


def live_first(ham: np.ndarray, rows: np.ndarray, alive: np.ndarray, pool: int):
    """Each query's live candidates, in their order, first `pool` of them; the rest -1."""
    if not ham.shape == rows.shape == alive.shape or ham.ndim != 2:
        raise ValueError(f"live_first: shapes {ham.shape}, {rows.shape}, {alive.shape} differ")
    order = np.argsort(~alive, axis=1, kind="stable")[:, :pool]
    keep = np.take_along_axis(alive, order, 1)
    return (np.where(keep, np.take_along_axis(ham, order, 1), -1),
            np.where(keep, np.take_along_axis(rows, order, 1), -1))


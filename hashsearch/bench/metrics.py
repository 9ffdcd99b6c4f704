"""Retrieval metrics in the protocol of the paper's released evaluation code.

Every query is ranked against the whole database and a database item is
relevant when it has the query's label.  All functions take and return
numpy arrays; nothing here touches a collection on disk.  The benchmarks'
recall_at_k scores a search against the exact nearest neighbours instead.

Hamming distances are computed a block of queries at a time (HammingScanner),
so the memory held is a few [block, n_database] matrices whatever the query
count, and every ranking is exact and deterministic.
"""
from __future__ import annotations

import math

import numpy as np

from ..codes import code_words, hamming_distances
from ..errors import HashsearchError

# Keeps one block's [block, n] intermediates near 100 MB at 50k database rows.
QUERY_BLOCK = 256


class HammingScanner:
    """Hamming distances and rankings from query blocks to a fixed database.

    The database is converted to uint64 words once (hashsearch.codes.code_words),
    so each block costs one popcount of xors per word.  With ids, the database
    is stored in id order: a stable sort of the small-integer distances (numpy
    uses radix sort for them) then breaks ties by id for free.
    """

    def __init__(self, db_codes: np.ndarray, db_ids: np.ndarray | None = None):
        db_codes = np.ascontiguousarray(db_codes, np.uint8)
        self.n, nbytes = db_codes.shape
        self.bits = nbytes * 8
        self.perm = None
        if db_ids is not None:
            db_ids = np.asarray(db_ids, np.int64)
            if db_ids.shape != (self.n,):
                raise HashsearchError(f"{len(db_ids)} database ids for {self.n} codes")
            self.perm = np.argsort(db_ids, kind="stable")
            db_codes = db_codes[self.perm]
        self.words = code_words(db_codes)

    def distances(self, query_codes: np.ndarray) -> np.ndarray:
        """[nq, n] small unsigned ints, columns in the scanner's order (id order when ids were given)."""
        query_codes = np.ascontiguousarray(query_codes, np.uint8)
        if query_codes.ndim != 2 or query_codes.shape[1] * 8 != self.bits:
            raise HashsearchError(f"query codes of shape {query_codes.shape} do not hold "
                                  f"{self.bits}-bit codes like the database")
        return hamming_distances(code_words(query_codes)[:, None, :], self.words[None])

    def topk(self, query_codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows int64 [nq, k], hamming int32 [nq, k]), nearest first, ties by id."""
        dist = self.distances(query_codes)
        cols = np.argsort(dist, axis=1, kind="stable")[:, :min(int(k), self.n)]
        ham = np.take_along_axis(dist, cols, 1).astype(np.int32)
        return (cols if self.perm is None else self.perm[cols]), ham


def rank_by_hamming(query_codes: np.ndarray, db_codes: np.ndarray, topk: int,
                    db_ids: np.ndarray | None = None, block: int = QUERY_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Top-k database rows per query by Hamming distance: (rows int64 [nq, k], hamming int32 [nq, k]).

    Equal distances are ordered by database id (by row when `db_ids` is
    None), so results do not depend on the selection algorithm.  k is
    clipped to the database size.
    """
    if topk <= 0:
        raise HashsearchError(f"topk must be positive, got {topk}")
    scan = HammingScanner(db_codes, db_ids)
    query_codes = np.ascontiguousarray(query_codes, np.uint8)
    k = min(int(topk), scan.n)
    rows = np.empty((len(query_codes), k), np.int64)
    ham = np.empty((len(query_codes), k), np.int32)
    for a in range(0, len(query_codes), block):
        rows[a:a + block], ham[a:a + block] = scan.topk(query_codes[a:a + block], k)
    return rows, ham


def average_precision(relevant: np.ndarray, n_relevant_total=None) -> np.ndarray:
    """Per-query AP, float64 [nq]; see mean_average_precision."""
    rel = np.asarray(relevant, bool)
    if rel.ndim != 2:
        raise HashsearchError(f"relevance must be [n_queries, depth], got shape {rel.shape}")
    hits = np.cumsum(rel, axis=1, dtype=np.float64)
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    summed = np.where(rel, hits / ranks, 0.0).sum(1)
    denom = hits[:, -1] if n_relevant_total is None else np.broadcast_to(
        np.asarray(n_relevant_total, np.float64), summed.shape)
    return np.divide(summed, denom, out=np.zeros_like(summed), where=denom > 0)


def mean_average_precision(relevant: np.ndarray, n_relevant_total=None) -> float:
    """mAP of ranked relevance flags, bool [nq, depth].

    AP = sum_j P@j * rel_j / R.  With `n_relevant_total` None, R is the number
    of relevant items within the depth (mAP@K as in DeepHash-pytorch's
    CalcTopMap): a query with no relevant item there scores 0.  For mAP over
    the full ranking pass full-length rankings and R = each query's total
    number of relevant database items (scalar or [nq]).
    """
    ap = average_precision(relevant, n_relevant_total)
    return float(ap.mean()) if len(ap) else 0.0


def recall_at_k(found, truth) -> float:
    """Mean over queries of |found top k ∩ truth| / k, where truth [nq, k] holds each query's exact top k ids
    (-1 never counts); NaN for no queries."""
    found, truth = np.asarray(found), np.asarray(truth)
    k = truth.shape[1]
    hits = [len(set(f[:k][f[:k] >= 0].tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth)]
    return float(np.mean(hits) / k) if hits else math.nan


def precision_at_k(relevant: np.ndarray) -> np.ndarray:
    """Mean over queries of P@k for k = 1..depth, float64 [depth]."""
    rel = np.asarray(relevant, bool)
    hits = np.cumsum(rel, axis=1, dtype=np.float64).mean(0)
    return hits / np.arange(1, rel.shape[1] + 1)


def _hamming_label_blocks(query_codes, db_codes, q_labels, db_labels, block=QUERY_BLOCK):
    """Yield (hamming [b, n] small unsigned ints, same-label bool [b, n]) per query block."""
    q_labels, db_labels = np.asarray(q_labels), np.asarray(db_labels)
    if len(q_labels) != len(query_codes) or len(db_labels) != len(db_codes):
        raise HashsearchError("labels and codes differ in length")
    scan = HammingScanner(db_codes)
    for a in range(0, len(query_codes), block):
        yield scan.distances(query_codes[a:a + block]), q_labels[a:a + block, None] == db_labels[None, :]


def precision_within_radius(query_codes, db_codes, q_labels, db_labels, radius: int = 2) -> float:
    """Mean over queries of the precision of the Hamming ball of `radius` around each query.

    A query whose ball holds no database item scores 0, the usual convention
    in the hashing literature (it penalises codes too spread out to return
    anything by hash lookup).
    """
    total, nq = 0.0, len(query_codes)
    for dist, same in _hamming_label_blocks(query_codes, db_codes, q_labels, db_labels):
        inside = dist <= radius
        found = inside.sum(1)
        good = (inside & same).sum(1)
        total += np.divide(good, found, out=np.zeros(len(found)), where=found > 0).sum()
    return float(total / nq) if nq else 0.0


def pr_curve_hamming(query_codes, db_codes, q_labels, db_labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(radius [K+1], precision [K+1], recall [K+1]) of Hamming-ball retrieval for radius 0..K.

    Micro-averaged: precision = relevant pairs within the radius / all pairs
    within it, recall = relevant pairs within it / all relevant pairs, pooled
    over queries.  That weights each retrieved item equally, so radii where
    few queries find anything do not swing the curve; a radius where no pair
    at all lies within gets precision nan.
    """
    bits = np.asarray(db_codes).shape[1] * 8
    all_pairs = np.zeros(bits + 1, np.int64)
    rel_pairs = np.zeros(bits + 1, np.int64)
    for dist, same in _hamming_label_blocks(query_codes, db_codes, q_labels, db_labels):
        all_pairs += np.bincount(dist.ravel(), minlength=bits + 1)
        rel_pairs += np.bincount(dist[same], minlength=bits + 1)
    retrieved, hit = np.cumsum(all_pairs), np.cumsum(rel_pairs)
    precision = np.divide(hit, retrieved, out=np.full(bits + 1, np.nan), where=retrieved > 0)
    recall = hit / hit[-1] if hit[-1] else np.zeros(bits + 1)
    return np.arange(bits + 1), precision, recall

"""Would an inverted file over the sketch find the exact top 10 better than the neighbour codes do?

    python docs/sketch-ivf.py DATABASE QUERIES [--queries 1000] [--nlist 256]

DATABASE and QUERIES are collections encoded by the same model (CIFAR-10
train and test), DATABASE with an index (`build-index`).  Both candidate
sources below hand their 60 nearest in the sketch (the neighbour projection
at 4 bits a value, engine/sketch.py) to exact L2 on F7, as hds does, and the
script prints recall@10 against the exact top 10 of random held-out queries
and the time of the candidate step alone, one query at a time on one thread:
  neighbours P     the P nearest neighbour codes by Hamming distance (faiss
                   IndexBinaryFlat over the index's 256-bit codes), ranked by
                   the sketch: the neighbour pool of hds today
  ivf nprobe N     faiss IndexIVFScalarQuantizer over the projected rows
                   (k-means cells, 4-bit values, not by residual): the rows of
                   the N cells nearest the query, ranked by the sketch
H's pool is left out of both: it adds the same rows to either.
"""
from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from hashsearch.engine import Index
from hashsearch.engine.neighbours import codes_of_projection
from hashsearch.engine.sketch import RANGE_MARGIN, SHORTLIST_PER_RESULT
from hashsearch.shards import Collection

K = 10


def recall_after_rerank(cand: np.ndarray, F: np.ndarray, Q: np.ndarray, truth: np.ndarray) -> float:
    hits = 0
    for i in range(len(Q)):
        rows = cand[i][cand[i] >= 0]
        d = ((F[rows] - Q[i]) ** 2).sum(1)
        hits += len(np.intersect1d(rows[np.argsort(d)[:K]], truth[i]))
    return hits / K / len(Q)


def nearest_in_sketch(candidates, values: np.ndarray, SQ: np.ndarray, keep: int) -> np.ndarray:
    """Each query's `keep` candidates nearest to it in the decoded sketch `values`."""
    return np.stack([c[np.argsort(((values[c] - SQ[i]) ** 2).sum(1), kind="stable")[:keep]]
                     for i, c in enumerate(candidates)])


def per_query_ms(search, nq: int) -> float:
    started = time.perf_counter()
    for i in range(nq):
        search(i)
    return (time.perf_counter() - started) / nq * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("database")
    ap.add_argument("queries")
    ap.add_argument("--queries", dest="nq", type=int, default=1000)
    ap.add_argument("--nlist", type=int, default=256)
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    keep = SHORTLIST_PER_RESULT * K
    db, qc = Collection.open(args.database), Collection.open(args.queries)
    with Index.open(args.database) as index:      # its own handles: closing it leaves `db` open
        projection = index._current().neighbours.projection
    F = db.features(np.arange(db.n))
    Q = qc.features(np.sort(np.random.default_rng(0).choice(qc.n, args.nq, replace=False)))
    exact = faiss.IndexFlatL2(F.shape[1])
    exact.add(F)
    truth = exact.search(Q, K)[1]
    S, SQ = projection.project(F), projection.project(Q)

    sketch = faiss.IndexScalarQuantizer(S.shape[1], faiss.ScalarQuantizer.QT_4bit, faiss.METRIC_L2)
    sketch.sq.rangestat, sketch.sq.rangestat_arg = faiss.ScalarQuantizer.RS_minmax, RANGE_MARGIN
    sketch.train(S[np.random.default_rng(0).choice(len(S), min(len(S), 10_000), replace=False)])
    values = sketch.sa_decode(sketch.sa_encode(S))
    hamming = faiss.IndexBinaryFlat(S.shape[1])
    hamming.use_heap = False
    hamming.add(codes_of_projection(S))
    query_codes = codes_of_projection(SQ)
    hamming_pools = {}
    for pool in (250, 500, 1000, 1500):
        ms = per_query_ms(lambda i: hamming.search(query_codes[i:i + 1], pool), len(Q))
        found = hamming_pools[pool] = hamming.search(query_codes, pool)[1]
        ranked = nearest_in_sketch(found, values, SQ, keep)
        print(f"neighbours {pool:5d}   recall@10 {recall_after_rerank(ranked, F, Q, truth):.4f}   "
              f"Hamming scan {ms:.3f} ms (the sketch's ranking of the pool comes on top)")

    ivf = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(S.shape[1]), S.shape[1], args.nlist,
                                        faiss.ScalarQuantizer.QT_4bit, faiss.METRIC_L2, False)
    started = time.perf_counter()
    ivf.train(S)
    ivf.add(S)
    print(f"ivf: {args.nlist} cells trained and filled in {time.perf_counter() - started:.2f} s")
    for nprobe in (4, 8, 16, 32):
        ivf.nprobe = nprobe
        ms = per_query_ms(lambda i: ivf.search(SQ[i:i + 1], keep), len(Q))
        print(f"ivf nprobe {nprobe:3d}   recall@10 {recall_after_rerank(ivf.search(SQ, keep)[1], F, Q, truth):.4f}   "
              f"cells and ranking {ms:.3f} ms")
    for pool, nprobe in ((250, 4), (250, 8), (500, 4), (500, 8)):
        ivf.nprobe = nprobe
        found = ivf.search(SQ, keep)[1]
        union = [np.union1d(a[a >= 0], b) for a, b in zip(found, hamming_pools[pool])]
        ranked = nearest_in_sketch(union, values, SQ, keep)
        print(f"union: neighbours {pool} and ivf nprobe {nprobe}   recall@10 "
              f"{recall_after_rerank(ranked, F, Q, truth):.4f}")


if __name__ == "__main__":
    main()

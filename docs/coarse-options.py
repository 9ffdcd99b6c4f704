"""Which coarse stage keeps what exact search finds?  The measurement behind the neighbour codes.

    python docs/coarse-options.py DATABASE QUERIES [--originals 500] [--queries 1000]

DATABASE and QUERIES are collections encoded by the same model (CIFAR-10 train
and test).  Every design gives each query a candidate pool, which exact L2 on
F7 then ranks, as hds does:
  H              the H codes' nearest (the paper's coarse stage)
  N<b>           the nearest of b-bit ITQ codes fitted to DATABASE's F7
  H + N<b>/<p>   the union of H's pool and the p nearest neighbour codes
For each it prints recall@10 against the exact L2 top 10 of held-out
queries, class mAP@1000 of the test queries (the paper's protocol, pool 1000
for H, as `eval` uses; in a union, rows outside H's pool take at most the
first --places places, as hds ranks them), and how often the original of an
edited copy of a database image comes first (the edits of `eval
--near-duplicates`).
Hamming ties are broken by row, as the engine's flat index breaks them.
"""
from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from hashsearch.bench.metrics import average_precision
from hashsearch.bench.near_duplicates import EDITS
from hashsearch.encoders.images import load_image
from hashsearch.engine.neighbours import fit_projection, sample_rows
from hashsearch.retrieval import query_encoder
from hashsearch.shards import Collection


def hamming_top(db_codes: np.ndarray, q_codes: np.ndarray, m: int) -> np.ndarray:
    index = faiss.IndexBinaryFlat(db_codes.shape[1] * 8)
    index.add(db_codes)
    return index.search(q_codes, m)[1]


def l2_rank(db: np.ndarray, q: np.ndarray, pools: list[np.ndarray], depth: int, h_pools=None,
            places: int = 0) -> np.ndarray:
    """Each query's pool (rows, any order, repeats allowed) ranked by L2, cut at `depth`, -1 padded.  With
    `h_pools`, rows outside H's pool take at most the first `places` places, as hds ranks them."""
    out = np.full((len(q), depth), -1, np.int64)
    for i, pool in enumerate(pools):
        rows = np.unique(pool[pool >= 0])
        d = ((db[rows] - q[i]) ** 2).sum(1)
        ranked = rows[np.lexsort((rows, d))]
        if h_pools is not None:
            ranked = ranked[np.isin(ranked, h_pools[i]) | (np.arange(len(ranked)) < places)]
        out[i, :min(depth, len(ranked))] = ranked[:depth]
    return out


def design_pools(name, h_top, n_tops, npool):
    """Per query, its pool under design `name` ("H", "N<b>", "H+N<b>")."""
    if name == "H":
        return list(h_top)
    bits = int(name.split("N")[1])
    near = n_tops[bits][:, :npool]
    if name.startswith("N"):
        return list(near)
    return [np.concatenate([a, b]) for a, b in zip(h_top, near)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("database")
    ap.add_argument("queries")
    ap.add_argument("--originals", type=int, default=500)
    ap.add_argument("--queries-recall", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--places", type=int, default=10, help="as query's --neighbour-places")
    args = ap.parse_args()
    db, qc = Collection.open(args.database), Collection.open(args.queries)
    db_f = db.features(np.arange(db.n))
    q_f = qc.features(np.arange(qc.n))
    db_c, q_c = db.codes(), qc.codes()
    rng = np.random.default_rng(args.seed)

    # held-out queries, and edited copies of database images, encoded once
    recall_rows = np.sort(rng.choice(qc.n, args.queries_recall, replace=False))
    originals = np.sort(np.random.default_rng(args.seed).choice(db.n, args.originals, replace=False))
    images = [load_image(p) for p in db.paths(originals)]
    nd_codes, nd_feats = query_encoder(db).encode([edit(im) for edit in EDITS.values() for im in images])
    nd_wanted = np.tile(originals, len(EDITS))

    flat = faiss.IndexFlatL2(db.feature_dim)
    flat.add(db_f)
    truth = flat.search(q_f[recall_rows], 10)[1]

    projections = {}
    for bits in (64, 128, 256):
        t = time.perf_counter()
        projections[bits] = fit_projection(db_f[sample_rows(np.arange(db.n))], bits)
        print(f"ITQ {bits} bits fitted in {time.perf_counter() - t:.1f} s")
    db_n = {b: p.encode(db_f) for b, p in projections.items()}

    designs = [("H", 0), ("N128", 200), ("N256", 500), ("H+N64", 200), ("H+N128", 200), ("H+N256", 200),
               ("H+N256", 500)]
    print("| coarse stage | neighbour pool | recall@10 vs exact L2 | rows reranked | class mAP@1000 | "
          "near-duplicate top-1 | top-10 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, npool in designs:
        bits_needed = [int(name.split("N")[1])] if "N" in name else []
        # recall@10 at the search defaults: H pool 200
        h_top = hamming_top(db_c, q_c[recall_rows], 200)
        n_tops = {b: hamming_top(db_n[b], projections[b].encode(q_f[recall_rows]), npool) for b in bits_needed}
        pools = design_pools(name, h_top, n_tops, npool)
        found = l2_rank(db_f, q_f[recall_rows], pools, 10)
        recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
        reranked = np.mean([len(np.unique(p[p >= 0])) for p in pools])
        # class mAP@1000: H pool 1000, as eval's hds
        h_top = hamming_top(db_c, q_c, 1000)
        n_tops = {b: hamming_top(db_n[b], projections[b].encode(q_f), max(npool, 1000 if name.startswith("N")
                                                                          else npool)) for b in bits_needed}
        union = name.startswith("H+")
        ranked = l2_rank(db_f, q_f, design_pools(name, h_top, n_tops, 1000 if name.startswith("N") else npool),
                         1000, h_top if union else None, args.places)
        relevant = db.labels()[np.maximum(ranked, 0)] == qc.labels()[:, None]
        mean_ap = average_precision(relevant & (ranked >= 0)).mean()
        # near-duplicates: H pool 200
        h_top = hamming_top(db_c, nd_codes, 200)
        n_tops = {b: hamming_top(db_n[b], projections[b].encode(nd_feats), npool) for b in bits_needed}
        nd = l2_rank(db_f, nd_feats, design_pools(name, h_top, n_tops, npool), 10)
        top1, top10 = (nd[:, 0] == nd_wanted).mean(), (nd == nd_wanted[:, None]).any(1).mean()
        print(f"| {name} | {npool if 'N' in name else '-'} | {recall:.3f} | {reranked:.0f} | {mean_ap:.4f} | "
              f"{top1:.3f} | {top10:.3f} |", flush=True)
    es = flat.search(nd_feats, 10)[1]
    es_ranked = flat.search(q_f, 1000)[1]
    es_map = average_precision(db.labels()[es_ranked] == qc.labels()[:, None]).mean()
    print(f"| es (exhaustive L2) | - | 1.000 | {db.n} | {es_map:.4f} | {(es[:, 0] == nd_wanted).mean():.3f} | "
          f"{(es == nd_wanted[:, None]).any(1).mean():.3f} |")


if __name__ == "__main__":
    main()

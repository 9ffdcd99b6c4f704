"""Which pair criterion finds more planted duplicates at the same precision?  A measurement, not a feature.

    python docs/duplicate-criteria.py WORK [--neighbours 16]

WORK is a `hashsearch bench duplicates --work WORK` folder: its test set
(testset/truth.json) and the collection it encoded.  Every item's exact F7
neighbours (faiss IndexFlatL2, all items) give the candidate pairs, so the
criteria are compared on the same pairs, without the coarse join.  For each
criterion it prints the largest pair recall at which pair precision is still
0.95 or more, and the threshold that gives it:
  absolute          L2 distance / the median F7 length (what `duplicates` uses)
  ratio to kth (min) L2 distance / the smaller of the two items' distances to
                     their k-th nearest neighbour (a local scale: dense classes
                     have near neighbours everywhere, sparse ones do not)
  ratio to kth (max) the same with the larger of the two.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import faiss
import numpy as np

from hashsearch.shards import Collection


def planted_pairs(work: Path, row_of: dict) -> set:
    truth = json.loads((work / "testset" / "truth.json").read_text())
    pairs = set()
    for group in truth["groups"]:
        rows = sorted(row_of[os.path.realpath(work / "testset" / p)] for p in group)
        pairs.update(itertools.combinations(rows, 2))
    return pairs


def best_recall(score: np.ndarray, is_planted: np.ndarray, planted: int, precision: float = 0.95):
    """(recall, threshold) at the largest threshold on `score` that keeps pair precision >= `precision`."""
    order = np.argsort(score, kind="stable")
    hits = np.cumsum(is_planted[order])
    ok = np.flatnonzero(hits / np.arange(1, len(order) + 1) >= precision)
    if not len(ok):
        return 0.0, float("nan")
    return hits[ok[-1]] / planted, float(score[order][ok[-1]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--neighbours", type=int, default=16)
    args = ap.parse_args()
    with Collection.open(args.work / "collection") as coll:
        feats = coll.features(np.arange(coll.n)).astype(np.float32)
        row_of = {os.path.realpath(p): i for i, p in enumerate(coll.paths(np.arange(coll.n)))}
    planted = planted_pairs(args.work, row_of)
    index = faiss.IndexFlatL2(feats.shape[1])
    index.add(feats)
    dist, near = index.search(feats, args.neighbours + 1)
    dist = np.sqrt(np.maximum(dist, 0)) / np.median(np.linalg.norm(feats, axis=1))
    candidates = {}
    for i in range(len(feats)):
        for j, d in zip(near[i, 1:], dist[i, 1:]):
            candidates[(min(i, j), max(i, j))] = d
    pairs = np.array(list(candidates), np.int64)
    d = np.array(list(candidates.values()), np.float32)
    is_planted = np.array([p in planted for p in map(tuple, pairs.tolist())])
    print(f"{len(feats)} items, {len(planted)} planted pairs, {len(pairs)} candidate pairs "
          f"({is_planted.sum()} of them planted)")
    print("| criterion | recall at precision 0.95 | threshold |\n| --- | ---: | ---: |")
    rows = [("absolute", d)]
    for k in (2, 4, 8, 16):
        if k <= args.neighbours:
            scale = dist[:, k]
            rows.append((f"ratio to {k}th nearest (min)", d / np.minimum(scale[pairs[:, 0]], scale[pairs[:, 1]])))
            rows.append((f"ratio to {k}th nearest (max)", d / np.maximum(scale[pairs[:, 0]], scale[pairs[:, 1]])))
    for name, score in rows:
        recall, threshold = best_recall(score, is_planted, len(planted))
        print(f"| {name} | {recall:.3f} | {threshold:.3f} |")


if __name__ == "__main__":
    main()

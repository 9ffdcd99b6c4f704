"""`make demo`: Fashion-MNIST end to end in a few minutes on a laptop CPU.

Trains `small` at 48 bits on the 60,000 training images, encodes them as the
database and the 10,000 test images as queries, builds the index, runs the
hierarchical search for every query, prints precision@10 and a few results,
and saves a PNG grid of queries with their top-10.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .encoders.runner import encode_collection
from .encoders.sources import open_source
from .encoders.train import TrainConfig, train
from .engine import Index
from .shards import Collection


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo-out")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--bits", type=int, default=48)
    ap.add_argument("--limit", type=int, help="Use only the first N training and test images.")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def step(msg):
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    model = out / "model.pt"
    step(f"training small at {args.bits} bits on fashion-mnist:train ({args.epochs} epochs)")
    train(TrainConfig(source="fashion-mnist:train", out=str(model), bits=args.bits, epochs=args.epochs,
                      lr=3e-3, limit=args.limit, quiet=False))
    step("encoding the database (train) and the queries (test)")
    for split in ("train", "test"):
        encode_collection(model, f"fashion-mnist:{split}", out / split, limit=args.limit, overwrite=True, quiet=True)
    db, queries = Collection.open(out / "train"), Collection.open(out / "test")
    step(f"building the coarse index over {db.n} codes")
    index = Index.build(db, "flat")

    step(f"searching {queries.n} queries (hierarchical: Hamming pool of 200, then L2 on F7)")
    all_rows = np.arange(queries.n)
    started = time.perf_counter()
    result = index.search(queries.codes(), queries.features(all_rows), k=10, mode="hds", pool=200)
    ms = (time.perf_counter() - started) * 1000 / queries.n
    relevant = db.labels()[result.rows] == queries.labels()[:, None]
    p10 = float(relevant.mean())
    step(f"precision@10 = {p10:.4f} over {queries.n} test queries ({ms:.3f} ms/query)")

    names = db.manifest["class_names"]
    for q in range(3):
        hits = ", ".join(names[db.labels()[r]] for r in result.rows[q][:5])
        print(f"  query {q} ({names[queries.labels()[q]]}): top-5 {hits}")
    png = out / "results.png"
    save_grid(png, open_source("fashion-mnist:test"), open_source("fashion-mnist:train"),
              queries.ids()[:8], result.ids[:8], relevant[:8])
    step(f"wrote {png}")
    return p10


def save_grid(path, query_source, db_source, query_ids, result_ids, relevant):
    """One row per query: the query image, then its results framed green (same class) or red."""
    from .bench.plots import pyplot, save_png
    plt = pyplot()

    nq, k = result_ids.shape
    fig, axes = plt.subplots(nq, k + 1, figsize=(1.1 * (k + 1), 1.2 * nq))
    for q in range(nq):
        axes[q, 0].imshow(query_source.load(int(query_ids[q])))
        axes[q, 0].set_title("query", fontsize=7)
        for j in range(k):
            ax = axes[q, j + 1]
            ax.imshow(db_source.load(int(result_ids[q, j])))
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if relevant[q, j] else "tab:red")
                spine.set_linewidth(2)
        for ax in axes[q]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    save_png(fig, path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""How SSDH's two terms on H move mAP@1000, against ITQ on the same F7 (docs/results.md, issue 31's sweep).

    python docs/ssdh-terms.py DATABASE QUERIES --bits 48 --weights 0:0,1:0,0:1,1:1 [--epochs 30] \
        [--itq-target 0,0.3] [--itq-start 0,3] [--itq-seeds 10] [--pseudo-labels K]

DATABASE and QUERIES are encoded collections of one model (the CIFAR-10 training and test splits, say).  The
latent layer H and the classifier F8 are trained from scratch on DATABASE's stored F7 and labels, as
`train --freeze-backbone` trains them on F7 it computes (the same loss, hash_loss, the same optimiser and
schedule), once per binary:balance weight pair.  Each is scored as `eval` scores bcs (mAP@1000, Hamming
ranking of H > 0.5).  ITQ fitted on the same F7 is scored with seeds 0..--itq-seeds-1.  Fast: the backbone
never runs, so a sweep of a few weight pairs takes minutes on 2 cores.

With --pseudo-labels K, H and F8 train on k-means clusters of DATABASE's F7 instead of its labels (K clusters,
faiss k-means, seed 0), which needs no labels; the labels then only score the codes.

With --itq-target W, hash_loss also teaches H the ITQ code of each training row's F7 (train --itq-weight W);
with --itq-start S, H's layer starts as ITQ's projection and rotation, scaled to pre-activations of standard
deviation S.  Each takes a comma-separated list, crossed with the weight pairs.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from hashsearch.bench.baselines import fit_baseline
from hashsearch.bench.metrics import mean_average_precision, rank_by_hamming
from hashsearch.codes import pack_codes
from hashsearch.config import TrainConfig
from hashsearch.encoders.train import hash_loss, itq_targets, split_holdout, warmup_cosine
from hashsearch.itq import fit_itq
from hashsearch.shards import Collection

TOPK = 1000


def features_and_labels(root):
    with Collection.open(root) as coll:
        rows = np.arange(coll.n)
        return coll.features(rows).astype(np.float32), coll.labels()[rows]


def map_at_1000(q_codes, db_codes, q_labels, db_labels) -> float:
    found = rank_by_hamming(q_codes, db_codes, TOPK)[0]
    return mean_average_precision(db_labels[found] == q_labels[:, None])


def train_head(feats, labels, bits: int, binary: float, balance: float, epochs: int, seed: int = 0,
               itq_start: float = 0.0, itq_target: float = 0.0):
    """H and F8 on F7, as train --freeze-backbone trains them (TrainConfig's defaults); H's activation function.
    With `itq_start`, H starts from ITQ fitted to the training rows' F7 (seed 0), as `train --unsupervised` does,
    scaled so that its pre-activations have that standard deviation."""
    defaults = TrainConfig(source="-", out="-")
    torch.manual_seed(seed)
    train_idx, _ = split_holdout(len(labels), defaults.val_fraction, seed)
    x, y = torch.from_numpy(feats[train_idx]), torch.from_numpy(labels[train_idx]).long()
    latent, classifier = torch.nn.Linear(feats.shape[1], bits), torch.nn.Linear(bits, int(labels.max()) + 1)
    target = itq_targets(x, bits, seed) if itq_target else None
    if itq_start:
        itq = fit_itq(feats[train_idx], bits, 0)
        wr = itq.projection.astype(np.float64) @ itq.rotation
        scale = itq_start / itq.project(feats[train_idx]).std()
        with torch.no_grad():
            latent.weight.copy_(torch.as_tensor(wr.T * scale, dtype=torch.float32))
            latent.bias.copy_(torch.as_tensor(-(itq.mean @ wr) * scale, dtype=torch.float32))
    params = [*latent.parameters(), *classifier.parameters()]
    opt = torch.optim.AdamW(params, lr=defaults.lr, weight_decay=defaults.weight_decay)
    steps = math.ceil(len(y) / defaults.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(int(defaults.warmup_epochs * steps), epochs * steps))
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for a in range(0, len(order), defaults.batch_size):
            sel = order[a:a + defaults.batch_size]
            h = torch.sigmoid(latent(x[sel]))
            loss = hash_loss(classifier(h), h, y[sel], binary, balance,
                             None if target is None else target[sel], itq_target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    @torch.no_grad()
    def activations(f):
        return torch.sigmoid(latent(torch.from_numpy(f))).numpy()
    return activations


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("database")
    ap.add_argument("queries")
    ap.add_argument("--bits", type=int, default=48)
    ap.add_argument("--weights", default="0:0,1:0,0:1,1:1", help="binary:balance pairs, comma-separated")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--itq-seeds", type=int, default=10)
    ap.add_argument("--pseudo-labels", type=int, default=0, metavar="K",
                    help="train on K k-means clusters of DATABASE's F7 instead of its labels")
    ap.add_argument("--itq-start", default="0", metavar="S,...",
                    help="start H from ITQ on the training F7, pre-activations of standard deviation S (0: at random); "
                         "comma-separated, each crossed with every weight pair")
    ap.add_argument("--itq-target", default="0", metavar="W,...",
                    help="add W times the cross-entropy of H against ITQ's bits of the same F7; comma-separated")
    ap.add_argument("--json")
    args = ap.parse_args()
    db_f, db_y = features_and_labels(args.database)
    q_f, q_y = features_and_labels(args.queries)
    train_y = db_y
    if args.pseudo_labels:
        import faiss
        started = time.perf_counter()
        kmeans = faiss.Kmeans(db_f.shape[1], args.pseudo_labels, niter=25, seed=0)
        kmeans.train(db_f)
        train_y = kmeans.index.search(db_f, 1)[1][:, 0].astype(np.int64)
        purity = sum(np.bincount(db_y[train_y == c]).max() for c in np.unique(train_y)) / len(db_y)
        print(json.dumps({"pseudo_labels": args.pseudo_labels, "purity": float(purity),
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    rows = []
    for pair, start, target in [(p, float(s), float(t)) for t in args.itq_target.split(",")
                                for s in args.itq_start.split(",") for p in args.weights.split(",")]:
        binary, balance = (float(w) for w in pair.split(":"))
        started = time.perf_counter()
        act = train_head(db_f, train_y, args.bits, binary, balance, args.epochs, itq_start=start, itq_target=target)
        h_db, h_q = act(db_f), act(q_f)
        score = map_at_1000(pack_codes(h_q > 0.5), pack_codes(h_db > 0.5), q_y, db_y)
        rows.append({"codes": "H", "binary_weight": binary, "balance_weight": balance, "itq_start": start,
                     "itq_target": target, "map": score,
                     "mean_distance_from_half": float(np.abs(h_db - 0.5).mean()),
                     "bit_balance_error": float(np.abs((h_db > 0.5).mean(0) - 0.5).mean()),
                     "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)
    itq = []
    for seed in range(args.itq_seeds):
        encode = fit_baseline("itq", db_f, args.bits, seed)
        itq.append(map_at_1000(encode(q_f), encode(db_f), q_y, db_y))
    if itq:
        rows.append({"codes": "ITQ", "map": float(np.mean(itq)), "map_sd": float(np.std(itq, ddof=1)) if len(itq) > 1
                     else 0.0, "map_min": float(min(itq)), "map_max": float(max(itq))})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"database": args.database, "queries": args.queries, "bits": args.bits,
                       "pseudo_labels": args.pseudo_labels,
                       "epochs": args.epochs, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

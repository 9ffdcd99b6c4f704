"""Which backbone and input size for `train --unsupervised`: mAP@1000 against the time F7 takes.

A subset of the CIFAR-10 protocol: 10,000 training images drawn at random (seed 0) as the database and
1,000 test images (seed 0) as queries.  F7 comes from hashsearch's own loader and backbones, with the
ImageNet weights of the efficientnet extra, in bf16 on the CPU, 2 threads.  Scores: exact L2 on F7
(`es`) and ITQ codes (hashsearch.itq) at 16, 32 and 64 bits, mean ± sd over seeds 0-2.  Labels only score.

    python docs/unlabeled-backbones.py ~/data/cifar10 efficientnet-lite0:128 efficientnet-lite0:224 \
        efficientnet-lite1:240 efficientnet-lite2:260

Results on 2 cores of an Intel Xeon are in docs/results.md.
"""
import sys
import time

import numpy as np
import torch

from hashsearch.bench.evaluate import rank_es, score
from hashsearch.bench.metrics import HammingScanner
from hashsearch.encoders.backbones import get_backbone
from hashsearch.encoders.checkpoint import build_model, make_config, read_weights
from hashsearch.encoders.dataset import make_loader
from hashsearch.encoders.sources import open_source
from hashsearch.encoders.initial_model import backbone_f7
from hashsearch.itq import fit_itq

SUBSET = {"train": 10_000, "test": 1_000}


def f7_of_subset(root: str, backbone: str, size: int) -> dict:
    config = make_config(backbone, 64, ["x"], size)
    model = build_model(config, read_weights(get_backbone(backbone).default_weights())).eval()
    out = {}
    for split, n in SUBSET.items():
        source = open_source(f"{root}/{split}")
        idx = np.sort(np.random.default_rng(0).choice(len(source), n, replace=False))
        loader = make_loader(source, size, 128, 1, indices=[int(i) for i in idx])
        all_labels, feats, labels, started = source.labels(), [], [], time.time()
        for _, pixels, good, _ in loader:          # an image that fails to decode drops out with its label
            if not good:
                continue
            feats.append(backbone_f7(model, pixels, config, torch.device("cpu"), "bf16").numpy())
            labels.append(all_labels[good])
        out[split], out[split + "_labels"] = np.concatenate(feats), np.concatenate(labels)
        print(f"{backbone} {size} px: F7 of {n} {split} images in {time.time() - started:.1f} s", flush=True)
    return out


def scores(d: dict) -> dict:
    x, y, q, qy = d["train"], d["train_labels"], d["test"], d["test_labels"]
    row = {"es": score(rank_es(q, x, 1000), qy, y, 1000)[0].mean()}
    for bits in (16, 32, 64):
        maps = []
        for seed in range(3):
            itq = fit_itq(x, bits, seed)
            maps.append(score(HammingScanner(itq.encode(x)).topk(itq.encode(q), 1000)[0], qy, y, 1000)[0].mean())
        row[f"itq{bits}"] = f"{np.mean(maps):.4f} ± {np.std(maps, ddof=1):.4f}"
    return row


if __name__ == "__main__":
    torch.set_num_threads(2)
    for spec in sys.argv[2:]:
        name, size = spec.split(":")
        print(spec, scores(f7_of_subset(sys.argv[1], name, int(size))), flush=True)

"""The miniatures' join on more real images (README, "Near-duplicate groups"): CIFAR-10's 50,000 training
images added to a `bench duplicates` test set, exact against the IVF join a million items get.

    python docs/duplicates-more-images.py ~/data/cifar10/train bench-u64 [--sample docs/duplicates-cifar10-found.jpg]

Miniatures are made as `encode` makes them for a 128-pixel model.  The pairs are scored against the planted
ones; the others are counted by split, and --sample draws 24 of them into a picture, to be looked at.  The IVF
join gets about 1,000 cells, as at a million items, so its cells are as fine in the descriptors' space.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from hashsearch.config import COPY_DISTANCE, COPY_RATIO, LOCAL_SCALE_NEIGHBOUR
from hashsearch.encoders.preprocess import decode_file, miniatures
from hashsearch.engine import copies

INPUT_SIZE = 128


def image_files(root: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("extra", help="a folder of more images (CIFAR-10's training split)")
    ap.add_argument("work", help="the --work folder of a `bench duplicates` run")
    ap.add_argument("--sample", help="write 24 of the unplanted pairs found, side by side, to this image")
    args = ap.parse_args()
    testset = os.path.join(args.work, "testset")
    paths = image_files(args.extra) + image_files(os.path.join(testset, "images"))
    started = time.perf_counter()
    mini = np.concatenate([miniatures(torch.stack([decode_file(p, INPUT_SIZE) for p in paths[a:a + 512]]))
                           for a in range(0, len(paths), 512)])
    print(f"{len(paths)} images, miniatures in {time.perf_counter() - started:.0f} s")
    position = {os.path.realpath(p): i for i, p in enumerate(paths)}
    planted = set()
    for group in json.load(open(os.path.join(testset, "truth.json")))["groups"]:
        members = sorted(position[os.path.realpath(os.path.join(testset, m))] for m in group)
        planted |= {(a, b) for k, a in enumerate(members) for b in members[k + 1:]}
    extra = len(image_files(args.extra))
    found = {}
    for label, exact_rows, probes in (("exact", len(paths), None), ("IVF, 1 probe", 0, 1), ("IVF, 2 probes", 0, 2)):
        copies.EXACT_JOIN_ROWS, copies.JOIN_CELL_ROWS = exact_rows, max(1, len(paths) // 1000)
        copies.JOIN_PROBES = probes or copies.JOIN_PROBES
        started = time.perf_counter()
        pairs, _ = copies.copy_pairs(mini, COPY_DISTANCE, COPY_RATIO, LOCAL_SCALE_NEIGHBOUR)
        seconds = time.perf_counter() - started
        found[label] = {tuple(p) for p in pairs.tolist()}
        hits = len(found[label] & planted)
        others = found[label] - planted
        both_extra = sum(b < extra for a, b in others)
        across = sum(a < extra <= b for a, b in others)
        print(f"{label}: {seconds:.1f} s, {len(found[label])} pairs, planted {hits}/{len(planted)} = "
              f"{hits / len(planted):.3f}; unplanted {len(others)}: {both_extra} within the extra images, "
              f"{across} across, {len(others) - both_extra - across} within the test set")
    if args.sample:
        from PIL import Image
        others = sorted(found["exact"] - planted)
        pick = [others[i] for i in np.random.default_rng(0).choice(len(others), 24, replace=False)]
        sheet = Image.new("RGB", (6 * 140, 4 * 70), "white")
        for k, pair in enumerate(pick):
            for j, i in enumerate(pair):
                with Image.open(paths[i]) as im:
                    sheet.paste(im.convert("RGB").resize((64, 64)), ((k % 6) * 140 + j * 66, (k // 6) * 70))
        sheet.save(args.sample, quality=85)


if __name__ == "__main__":
    main()

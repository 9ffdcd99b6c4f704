"""`hashsearch bench duplicates SOURCE --model M`: how well `hashsearch duplicates` finds planted groups.

The test set is made from a real folder of images (CIFAR-10's test JPEGs in the
README): a seeded share of the images each get 1 to 3 edited copies, each
copy a different edit of bench/near_duplicates.py's EDITS, written beside
the originals as PNG files (lossless, so the edit is all that changes).  The
folder is encoded with the given model and indexed, and the duplicate pairs
found at several thresholds are scored against the planted ones:
  pair precision  found pairs that are an original and its copy, or two
                  copies of one original;
  pair recall     planted pairs found.
Images of the folder that are already near-duplicates of each other (CIFAR-10
holds a few) count against precision: nothing here knows about them.

With --synthetic-n, it also times `hashsearch duplicates` itself, in a child
process so its peak RSS is its own, on a synthetic collection of that size
(bench/synthetic.py, F7-like features in groups of 1 to 4 near-identical
rows: planted duplicates, not images) after `build-index` fits its neighbour
codes.  The test set and the synthetic collection are kept in --work, so a
second run reuses them.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..config import DuplicatesBenchConfig, DuplicatesConfig
from ..engine import Index
from ..errors import HashsearchError
from ..fileio import atomic_write_bytes
from ..shards import Collection
from .near_duplicates import EDITS
from .sysinfo import machine_info

TRUTH = "truth.json"


def build_test_set(source_spec: str, folder: Path, share: float, seed: int) -> dict:
    """Write the test set into `folder` (originals linked, copies as PNG); its planted groups, by path.
    A folder already holding the same test set is reused."""
    from ..encoders.sources import open_source
    source = open_source(source_spec)
    spec = {"source": source.spec, "images": len(source), "share": share, "seed": seed, "edits": list(EDITS)}
    truth_path = folder / TRUTH
    if truth_path.exists():
        truth = json.loads(truth_path.read_text())
        if truth["spec"] == spec:
            return truth
        raise HashsearchError(f"{folder} holds another test set; give another --work")
    rng = np.random.default_rng(seed)
    edited = np.sort(rng.choice(len(source), round(share * len(source)), replace=False))
    copies = {int(i): rng.choice(list(EDITS), rng.integers(1, 4), replace=False).tolist() for i in edited}
    images = folder / "images"
    groups = []
    for i in range(len(source)):
        original = source.file(i)
        if original is None:
            raise HashsearchError(f"{source_spec} is not a folder or list of image files")
        rel = Path(os.path.relpath(original, source.spec))
        target = images / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            try:
                os.link(original, target)
            except OSError:          # another file system: a copy reads the same
                shutil.copyfile(original, target)
        if i in copies:
            im = source.load(i)
            members = [str(target)]
            for edit in copies[i]:
                path = target.with_name(f"{target.stem}~{edit}.png")
                EDITS[edit](im).save(path)
                members.append(str(path))
            groups.append(members)
    truth = {"spec": spec, "groups": groups}
    atomic_write_bytes(truth_path, json.dumps(truth).encode())
    return truth

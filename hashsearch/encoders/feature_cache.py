"""`train --unsupervised --features-cache FILE`: the backbone's F7 of a SOURCE and of its augmented views, kept.

Nearly all of an unsupervised run is backbone passes (29 of its 29 minutes on
50,000 CIFAR-10 images with 4 views); fitting H takes seconds.  The backbone
is frozen there, so another --bits, --epochs or --lr on the same images needs
the very same F7: the cache hands it back instead of recomputing it.

The file is an .npz (numpy arrays only, read without pickle) written
atomically.  Its `key` records everything the arrays depend on: the source's
item list, the backbone's weights, input size, precision, device, view count
and seed.  A cache made under another key is refused, never silently used and
never overwritten: its F7 would be another model's.
"""
from __future__ import annotations

import json
import zipfile

import numpy as np

from ..errors import HashsearchError
from ..fileio import NotRegularFile, atomic_write, open_regular

FORMAT = "hashsearch-features"


def read_features(path, key: dict):
    """(f7 float32 [n, D], views float16 [n, V, D] or None, rejected) kept in `path` under `key`."""
    try:
        with open(open_regular(path), "rb", closefd=True) as f, np.load(f, allow_pickle=False) as arrays:
            kept = json.loads(str(arrays["key"][()]))
            if not isinstance(kept, dict) or kept.get("format") != FORMAT:
                raise ValueError("not a features cache")
            _check_same(path, kept, key)
            f7 = np.asarray(arrays["f7"], dtype=np.float32)
            views = np.asarray(arrays["views"], dtype=np.float16) if "views" in arrays.files else None
            rejected = int(arrays["rejected"][()])
    except HashsearchError:
        raise
    except (OSError, NotRegularFile, ValueError, TypeError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise HashsearchError(f"--features-cache {path} is not a hashsearch features cache ({exc}); "
                              "give another file name") from None
    n = len(f7)
    if f7.ndim != 2 or (views is not None and (views.ndim != 3 or len(views) != n or views.shape[2] != f7.shape[1])):
        raise HashsearchError(f"--features-cache {path} is damaged: F7 {f7.shape} and views "
                              f"{None if views is None else views.shape} do not fit together")
    return f7, views, rejected


def write_features(path, key: dict, f7: np.ndarray, views: np.ndarray | None, rejected: int) -> None:
    arrays = {"key": np.array(json.dumps({"format": FORMAT, **key}, sort_keys=True)),
              "f7": np.asarray(f7, dtype=np.float32), "rejected": np.array(rejected, dtype=np.int64)}
    if views is not None:
        arrays["views"] = np.asarray(views, dtype=np.float16)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _check_same(path, kept: dict, key: dict) -> None:
    differ = [f"another {name}" if name in _HASHED else f"{name} {kept.get(name)!r}, not {key[name]!r}"
              for name in key if kept.get(name) != key[name]]
    if differ:
        raise HashsearchError(f"--features-cache {path} was made from other inputs ({'; '.join(differ)}); "
                              "remove it or give another file name")


# fingerprints, which would say nothing printed
_HASHED = ("source", "backbone_weights")

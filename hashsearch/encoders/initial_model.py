"""The model a training run starts from, and the backbone's F7 of images: both `train` and
`train --unsupervised` (encoders.train, encoders.unsupervised) begin with them."""
from __future__ import annotations

import torch

from ..config import TrainConfig
from .backbones import get_backbone
from .checkpoint import build_model, is_checkpoint, make_config, read_weights
from .encoder import autocast, to_device
from .preprocess import normalize


def initial_model(cfg: TrainConfig, class_names: list, device):
    """(config, model on `device`, whether it starts from pretrained weights, the config of the hashsearch
    checkpoint whose backbone it reuses or None): --weights, else the backbone's own weights."""
    weights = read_weights(cfg.weights) if cfg.weights else None
    reused = weights if is_checkpoint(weights) else None
    # a reused backbone keeps the input size it learned at (one of another backbone is refused by build_model)
    same = reused is not None and reused["config"]["backbone"] == cfg.backbone
    input_size = cfg.input_size or (reused["config"]["input_size"] if same else None)
    config = make_config(cfg.backbone, cfg.bits, class_names, input_size)
    if weights is None:
        installed = get_backbone(cfg.backbone).default_weights()
        weights = read_weights(installed) if installed else None
    return (config, to_device(build_model(config, weights), device), weights is not None,
            reused["config"] if reused is not None else None)


@torch.no_grad()
def backbone_f7(model, pixels: torch.Tensor, config: dict, device, precision: str) -> torch.Tensor:
    """F7 float32 [n, D] on the CPU of uint8 images [n, 3, S, S], through the model's backbone alone (no gradient)."""
    x = normalize(pixels.to(device), config["mean"], config["std"])
    with autocast(device, precision):
        return model.backbone(x.contiguous(memory_format=torch.channels_last)).float().cpu()

"""`train --unsupervised`: codes for images without labels, as an ordinary checkpoint.

F7 is the ImageNet-pretrained backbone's, unchanged.  ITQ (hashsearch.itq)
fits binary codes to the F7 of SOURCE's images, and the fit becomes the latent
layer: with W the PCA basis, R the rotation and m the mean,

    H = sigmoid(F7 (W R) - m (W R)),   so  H > 0.5  <=>  (F7 - m) W R > 0,

which is ITQ's own bit (>= 0 there; the two differ only where a projection is
exactly 0).  F8 has a single class and nothing to say.  encode, add, query,
serve and eval take the checkpoint as any other, and F7 still drives the
rerank.  The checkpoint's config records how it was made ("training"), and
so does every collection it encodes.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import TrainConfig
from ..errors import HashsearchError
from ..fileio import check_output_file
from ..itq import ITQ_ITERATIONS, fit_itq
from .backbones import get_backbone
from .checkpoint import build_model, make_config, read_weights, save_checkpoint
from .encoder import resolve_device, to_device
from .sources import open_source
from .train import _decode_all

# F8 needs a class; there is one, and it is never scored.
UNLABELLED = "unlabelled"


def train_unsupervised(cfg: TrainConfig) -> dict:
    check_output_file(cfg.out, "--out")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    source = open_source(cfg.source, data_dir=cfg.data_dir, limit=cfg.limit)
    if len(source) == 0:
        raise HashsearchError(f"no images in {cfg.source}")
    installed = get_backbone(cfg.backbone).default_weights()
    if not cfg.weights and not installed:
        raise HashsearchError(f"--unsupervised needs a pretrained backbone: {cfg.backbone} has no installed weights "
                              "(use --backbone efficientnet-lite0, or pass --weights)")
    config = make_config(cfg.backbone, cfg.bits, [UNLABELLED], cfg.input_size)
    model = to_device(build_model(config, read_weights(cfg.weights or installed)), device)
    f7, _, rejected = _decode_all(cfg, source, np.zeros(len(source), np.int64), np.arange(len(source)),
                                  config["input_size"], model, config, device, "training")
    if len(f7) < 2:
        raise HashsearchError(f"--unsupervised needs at least 2 readable images in {cfg.source}, got {len(f7)}")
    itq = fit_itq(f7.numpy(), cfg.bits, cfg.seed)
    wr = itq.projection.astype(np.float64) @ itq.rotation
    with torch.no_grad():
        model.latent.weight.copy_(torch.as_tensor(wr.T, dtype=torch.float32))
        model.latent.bias.copy_(torch.as_tensor(-(itq.mean @ wr), dtype=torch.float32))
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
    config["training"] = {"labels": False, "method": "itq", "images": int(len(f7)), "seed": cfg.seed,
                          "iterations": ITQ_ITERATIONS, "quantisation_loss": float(itq.losses[-1] / len(f7))}
    save_checkpoint(cfg.out, model.cpu(), config, train_state={"history": [], "rejected": rejected})
    return {"config": config, "history": [], "rejected": rejected, "itq": itq}

"""`train --unsupervised`: codes for images without labels, as an ordinary checkpoint.

F7 is the ImageNet-pretrained backbone's, unchanged.  ITQ (hashsearch.itq)
fits binary codes to the F7 of SOURCE's images, and the fit becomes the latent
layer: with W the PCA basis, R the rotation and m the mean,

    H = sigmoid(F7 (W R) - m (W R)),   so  H > 0.5  <=>  (F7 - m) W R > 0,

which is ITQ's own bit (>= 0 there; the two differ only where a projection is
exactly 0).  With --views, H is then trained further without labels so that
augmented views of an image share its code (encoders.contrastive).  F8 has a
single class and nothing to say.  encode, add, query,
serve and eval take the checkpoint as any other, and F7 still drives the
rerank.  The checkpoint's config records how it was made ("training"), and
so does every collection it encodes.  With --features-cache the backbone's
F7 is kept (encoders.feature_cache), so that another --bits on the same images
skips the backbone passes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import EncodeConfig, TrainConfig, saw_labels
from ..errors import HashsearchError
from ..fileio import check_output_file
from ..itq import ITQ_ITERATIONS, fit_itq
from .checkpoint import save_checkpoint
from .encoder import resolve_device
from .sources import open_source
from .contrastive import TEMPERATURE, refine_latent
from .dataset import make_loader
from .feature_cache import features_key, read_features, write_features
from .initial_model import backbone_f7, initial_model
from .preprocess import augment_views

# F8 needs a class; there is one, and it is never scored.
UNLABELLED = "unlabelled"


def train_unsupervised(cfg: TrainConfig) -> dict:
    check_output_file(cfg.out, "--out")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    source = open_source(cfg.source, data_dir=cfg.data_dir, limit=cfg.limit)
    if len(source) == 0:
        raise HashsearchError(f"no images in {cfg.source}")
    config, model, pretrained, reused = initial_model(cfg, [UNLABELLED], device)
    if not pretrained:
        raise HashsearchError(f"--unsupervised needs a pretrained backbone: {cfg.backbone} has no installed weights "
                              "(use --backbone efficientnet-lite0, or pass --weights)")
    f7, views, rejected, cache_use = _cached_f7_and_views(cfg, source, model, config, device)
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
                          "iterations": ITQ_ITERATIONS, "quantisation_loss": float(itq.losses[-1] / len(f7)),
                          "backbone_weights": str(cfg.weights) if cfg.weights else "installed ImageNet weights",
                          # --weights ft48b.pt fits ITQ to a backbone that labels trained: not a model without labels
                          "backbone_from_labelled_model": reused is not None and saw_labels(reused.get("training"))}
    history = []
    if cfg.views:
        history = refine_latent(model.latent.cpu(), torch.cat([f7[:, None].half(), views], 1), epochs=cfg.epochs,
                                batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
        config["training"].update(method="itq+contrastive", views=cfg.views, epochs=cfg.epochs,
                                  temperature=TEMPERATURE, view_pair_loss=[r["pair_loss"] for r in history])
    save_checkpoint(cfg.out, model.cpu(), config, train_state={"history": history, "rejected": rejected})
    return {"config": config, "history": history, "rejected": rejected, "itq": itq, "features_cache": cache_use}


def _cached_f7_and_views(cfg: TrainConfig, source, model, config: dict, device):
    """_f7_and_views, read from --features-cache when it holds this run's, else computed (and kept there);
    and what the cache did: "read", "written" or None."""
    if not cfg.features_cache:
        return (*_f7_and_views(cfg, source, model, config, device), None)
    key = features_key(source, model.backbone, config, precision=cfg.precision, device=device, views=cfg.views,
                       seed=cfg.seed, batch_size=EncodeConfig.batch_size)
    if Path(cfg.features_cache).exists():
        f7, views, rejected = read_features(cfg.features_cache, key)
        return torch.from_numpy(f7), None if views is None else torch.from_numpy(views), rejected, "read"
    check_output_file(cfg.features_cache, "--features-cache")
    f7, views, rejected = _f7_and_views(cfg, source, model, config, device)
    write_features(cfg.features_cache, key, f7.numpy(), None if views is None else views.numpy(), rejected)
    return f7, views, rejected, "written"


@torch.no_grad()
def _f7_and_views(cfg: TrainConfig, source, model, config: dict, device):
    """F7 float32 [n, D] of SOURCE's readable images, F7 float16 [n, views, D] of their augmented views
    (None without --views), and the count of rejected images."""
    model.eval()
    loader = make_loader(source, config["input_size"], EncodeConfig.batch_size, cfg.workers)
    plain, augmented, rejected = [], [], 0
    what = "F7 of the images" + (f" and {cfg.views} views of each" if cfg.views else "")
    with torch.random.fork_rng(devices=[]):
        # the views draw from a generator of their own, so they are the same whatever --bits (whose
        # initialisation draws first) and a --features-cache holds what any such run would compute
        torch.random.default_generator.manual_seed(cfg.seed)
        for _, pixels, good, rejects in tqdm(loader, desc=what, disable=cfg.quiet, leave=False):
            rejected += len(rejects)
            if len(good) == 0:
                continue
            plain.append(backbone_f7(model, pixels, config, device, cfg.precision))
            if cfg.views:
                augmented.append(torch.stack([backbone_f7(model, view, config, device, cfg.precision).half()
                                              for view in augment_views(pixels, cfg.views)], 1))
    if not plain:
        raise HashsearchError(f"none of the images in {cfg.source} could be decoded")
    return torch.cat(plain), (torch.cat(augmented) if cfg.views else None), rejected

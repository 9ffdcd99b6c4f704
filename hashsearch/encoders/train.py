"""Training: softmax on class labels through the latent hash layer (the paper's loss), with SSDH's two
terms on H (Yang, Lin & Chen, TPAMI 2017) where their weights are set (hash_loss).

Fine-tuning recipe: AdamW with weight decay, linear warm-up then cosine
decay, the backbone at a lower rate than the new layers (the paper trains
the new layers 10x faster), random crop + flip.  With --freeze-backbone
F7 is computed once and only the latent and classifier layers train, which
makes an ImageNet backbone usable on a CPU.  The checkpoint is rewritten
after every epoch with the optimizer state, so --resume continues a killed run.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..errors import HashsearchError
from ..fileio import check_output_file
from .backbones import load_weights
from .checkpoint import read_checkpoint, save_checkpoint
from ..config import TrainConfig
from .dataset import make_loader
from .encoder import autocast, resolve_device, to_device
from .initial_model import backbone_f7, initial_model
from .preprocess import augment, normalize
from .sources import open_source
from .unsupervised import train_unsupervised

# Decoded training images are kept in RAM, up to this size; beyond it, training
# needs --freeze-backbone (which keeps only F7) or a smaller --input-size.
PRELOAD_LIMIT_BYTES = 3 << 30


def train(cfg: TrainConfig) -> dict:
    if cfg.unsupervised:
        return train_unsupervised(cfg)
    # the checkpoint is first written after a whole epoch: a bad --out must fail now, not then
    check_output_file(cfg.out, "--out")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    source, labels, class_names = _labelled_source(cfg)
    config, model, pretrained, _ = initial_model(cfg, class_names, device)
    # read now, to fail before the slow decoding if there is nothing to resume
    resumed = read_checkpoint(cfg.out) if cfg.resume else None
    train_idx, val_idx = split_holdout(len(source), cfg.val_fraction, cfg.seed)
    batches = _batch_provider(cfg, source, labels, config, model, train_idx, val_idx, device)
    steps_per_epoch = max(1, math.ceil(len(train_idx) / cfg.batch_size))
    optimizer, scheduler = _optimizer(cfg, model, pretrained, steps_per_epoch)
    start_epoch, history = 0, []
    if cfg.resume:
        start_epoch, history = _resume(cfg, resumed, config, model, optimizer, scheduler)
    for epoch in range(start_epoch, cfg.epochs):
        history.append(_train_epoch(cfg, epoch, model, batches, optimizer, scheduler, steps_per_epoch))
        _report_epoch(cfg, history[-1])
        state = {"epoch": epoch + 1, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "history": history, "recipe": _recipe(cfg)}
        save_checkpoint(cfg.out, model.cpu(), config, train_state=state)
        to_device(model, device)
    return {"config": config, "history": history, "rejected": batches.rejected}


def _labelled_source(cfg: TrainConfig):
    """(SOURCE, its labels, the class names): refused when it is empty or any item has no label."""
    source = open_source(cfg.source, data_dir=cfg.data_dir, limit=cfg.limit)
    labels = source.labels()
    if len(labels) == 0:
        raise HashsearchError(f"no images in {cfg.source}")
    if (labels < 0).any():
        raise HashsearchError("training needs class labels: use a folder with one subfolder per class, or a list file "
                              "with labels; or add --unsupervised")
    return source, labels, source.class_names or [str(c) for c in range(int(labels.max()) + 1)]


def _optimizer(cfg: TrainConfig, model, pretrained: bool, steps_per_epoch: int):
    """AdamW, the backbone at its own rate (or frozen), and the warm-up + cosine schedule stepped per batch."""
    mult = cfg.backbone_lr_mult if cfg.backbone_lr_mult is not None else (0.1 if pretrained else 1.0)
    if cfg.freeze_backbone:
        model.backbone.requires_grad_(False)
        groups = [{"params": model.new_layers(), "lr": cfg.lr}]
    else:
        groups = [{"params": list(model.backbone.parameters()), "lr": cfg.lr * mult},
                  {"params": model.new_layers(), "lr": cfg.lr}]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(int(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch))
    return optimizer, scheduler


def _train_epoch(cfg: TrainConfig, epoch: int, model, batches, optimizer, scheduler, steps_per_epoch: int) -> dict:
    """One pass over the training items; the epoch's record (loss, train and held-out accuracy, seconds)."""
    started = time.perf_counter()
    model.train()
    if cfg.freeze_backbone:
        model.backbone.eval()
    seen = correct = 0
    total_loss = 0.0
    bar = tqdm(batches.train(epoch), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=cfg.quiet, leave=False)
    for x, y, itq_bits in bar:
        logits, h = batches.forward(x)
        logits = logits.float()
        loss = hash_loss(logits, h.float(), y, cfg.binary_weight, cfg.balance_weight, itq_bits, cfg.itq_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        seen += len(y)
        correct += int((logits.argmax(1) == y).sum())
        total_loss += loss.item() * len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    return {"epoch": epoch + 1, "loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1),
            "val_acc": batches.evaluate(), "seconds": round(time.perf_counter() - started, 1)}


def hash_loss(logits: torch.Tensor, h: torch.Tensor, labels: torch.Tensor, binary_weight: float,
              balance_weight: float, itq_bits: torch.Tensor | None = None, itq_weight: float = 0.0) -> torch.Tensor:
    """Softmax cross-entropy on the labels (the paper's loss), less `binary_weight` times the mean squared
    distance of H's activations from 0.5, which pushes each towards 0 or 1 so that thresholding at 0.5 loses
    little, plus `balance_weight` times the mean over bits of (the bit's mean over the batch - 0.5)^2, which
    keeps each bit set for about half the images, so that every bit splits the data.  SSDH's terms, except that
    its balance term is taken over each image's bits; over each bit's images is what a balanced code asks.
    Plus `itq_weight` times the cross-entropy of H's activations against `itq_bits` (0 or 1), the ITQ code of
    each image's F7 (itq_targets): softmax alone has no reason to order two images of one class, and ITQ's
    bits keep F7's order inside the class."""
    loss = nn.functional.cross_entropy(logits, labels)
    if binary_weight:
        loss = loss - binary_weight * (h - 0.5).square().mean()
    if balance_weight:
        loss = loss + balance_weight * (h.mean(0) - 0.5).square().mean()
    if itq_weight:
        loss = loss + itq_weight * nn.functional.binary_cross_entropy(h, itq_bits)
    return loss


def itq_targets(f7: torch.Tensor, bits: int, seed: int) -> torch.Tensor:
    """float32 [n, bits] of 0 and 1: the ITQ codes (hashsearch.itq, seeded) of these F7 rows, fitted to them."""
    from ..itq import fit_itq
    itq = fit_itq(f7.float().numpy(), bits, seed)
    return torch.from_numpy((itq.project(f7.float().numpy()) >= 0).astype(np.float32))


def code_activations(model, f7: torch.Tensor) -> torch.Tensor:
    """H's activations as hash_loss's terms see them: their gradient trains the latent layer, not the backbone.
    F7 is what the rerank, the neighbour codes and duplicates measure distances on; the binary term passed
    into the backbone reshaped it (a session-sized model then found more false duplicate pairs, and hds fell
    behind exhaustive search on edited copies), while softmax alone shapes F7 as the paper does."""
    return torch.sigmoid(model.latent(f7.detach()))


def _report_epoch(cfg: TrainConfig, record: dict) -> None:
    # one line per epoch even with --quiet: a log of a long run needs it
    val = "n/a" if record["val_acc"] is None else f"{record['val_acc']:.4f}"
    tqdm.write(f"epoch {record['epoch']}/{cfg.epochs}  loss {record['loss']:.4f}  "
               f"train acc {record['train_acc']:.4f}  held-out acc {val}  ({record['seconds']}s)")


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * fraction)) if fraction > 0 else 0
    n_val = min(n_val, n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _recipe(cfg: TrainConfig) -> dict:
    return {k: v for k, v in vars(cfg).items() if k not in ("resume", "quiet", "device", "workers")}


def _resume(cfg, payload, config, model, optimizer, scheduler):
    if payload["config"] != config:
        raise HashsearchError(f"{cfg.out} was trained with another configuration; drop --resume to start over")
    state = payload.get("train_state")
    if state is None:
        raise HashsearchError(f"{cfg.out} holds no training state to resume from")
    load_weights(model, payload["state_dict"], f"the weights in {cfg.out} do not fit its config")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), list(state["history"])


class _Batches:
    """Feeds training: decoded images from RAM, or cached F7 when the backbone is frozen."""

    def __init__(self, cfg, model, device, train_x, train_y, val_x, val_y, config, features: bool, rejected: int):
        self.cfg, self.model, self.device, self.config = cfg, model, device, config
        self.train_x, self.train_y, self.val_x, self.val_y = train_x, train_y, val_x, val_y
        self.features, self.rejected = features, rejected
        # With --itq-weight (which needs --freeze-backbone, so train_x is F7 that never changes): each row's
        # ITQ code, fitted once.
        self.itq_bits = itq_targets(train_x, config["bits"], cfg.seed) if cfg.itq_weight else None

    def train(self, epoch: int):
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
        order = torch.randperm(len(self.train_y), generator=g)
        for a in range(0, len(order), self.cfg.batch_size):
            sel = order[a:a + self.cfg.batch_size]
            x = self.train_x[sel]
            if not self.features:
                x = augment(x, g)
            itq_bits = None if self.itq_bits is None else self.itq_bits[sel].to(self.device)
            yield x.to(self.device), self.train_y[sel].to(self.device), itq_bits

    def forward(self, x):
        """(class logits, H's activations for hash_loss's terms) of a batch of images, or of their F7 when the
        backbone is frozen."""
        with autocast(self.device, self.cfg.precision):
            if self.features:
                h = torch.sigmoid(self.model.latent(x))
                return self.model.classifier(h), h
            x = normalize(x, self.config["mean"], self.config["std"])
            logits, _, f7 = self.model(x.contiguous(memory_format=torch.channels_last))
            return logits, code_activations(self.model, f7)

    @torch.no_grad()
    def evaluate(self):
        if self.val_y is None or len(self.val_y) == 0:
            return None
        self.model.eval()
        correct = 0
        for a in range(0, len(self.val_y), 512):
            logits, _ = self.forward(self.val_x[a:a + 512].to(self.device))
            correct += int((logits.argmax(1).cpu() == self.val_y[a:a + 512]).sum())
        return correct / len(self.val_y)


def _batch_provider(cfg, source, labels, config, model, train_idx, val_idx, device) -> _Batches:
    size = config["input_size"]
    n_bytes = len(source) * 3 * size * size
    if not cfg.freeze_backbone and n_bytes > PRELOAD_LIMIT_BYTES:
        raise HashsearchError(f"{len(source)} images at {size}px need {n_bytes >> 30} GiB decoded; "
                              "use --freeze-backbone or a smaller --input-size")
    tx, ty, rej_t = _decode_all(cfg, source, labels, train_idx, size, model if cfg.freeze_backbone else None,
                                config, device, "train")
    vx, vy, rej_v = _decode_all(cfg, source, labels, val_idx, size, model if cfg.freeze_backbone else None,
                                config, device, "held-out")
    return _Batches(cfg, model, device, tx, ty, vx, vy, config, cfg.freeze_backbone, rej_t + rej_v)


@torch.no_grad()
def _decode_all(cfg, source, labels, indices, size, model, config, device, what):
    """Decode `indices` once: uint8 images, or F7 features when `model` (a frozen backbone) is given."""
    if len(indices) == 0:
        return None, None, 0
    loader = make_loader(source, size, 256, cfg.workers, indices=[int(i) for i in indices])
    xs, ys, rejected = [], [], 0
    if model is not None:
        model.eval()
    desc = f"{'F7 of' if model is not None else 'decoding'} {what} images"
    for _, pixels, good, rejects in tqdm(loader, desc=desc, disable=cfg.quiet, leave=False):
        rejected += len(rejects)
        if len(good) == 0:
            continue
        if model is not None:
            xs.append(backbone_f7(model, pixels, config, device, cfg.precision))
        else:
            xs.append(pixels)
        ys.append(torch.as_tensor(labels[good], dtype=torch.long))
    if not xs:
        raise HashsearchError(f"none of the {what} images could be decoded")
    return torch.cat(xs), torch.cat(ys), rejected

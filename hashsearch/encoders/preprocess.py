"""Images to model input.

Decoding, resizing and cropping happen once per image, in DataLoader workers,
into compact uint8 tensors; normalisation and augmentation run batch-wise on
the device, where they cost almost nothing.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_uint8_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the shorter side to `size`, centre-crop a square: uint8 [3, size, size]."""
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def normalize(batch: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [n, 3, H, W] -> float, scaled to [0, 1] then standardised per channel."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    return (batch.float() / 255.0 - mean) / std


def augment(batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (zero-padded by 1/8 of the side) and horizontal flip, per image."""
    n, _, h, w = batch.shape
    pad = max(1, h // 8)
    padded = torch.nn.functional.pad(batch, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)                       # [n, h]
    cols = dx[:, None] + torch.arange(w)                       # [n, w]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    n_idx = torch.arange(n)[:, None, None, None]
    c_idx = torch.arange(batch.shape[1])[None, :, None, None]
    return padded[n_idx, c_idx, rows[:, None, :, None], cols[:, None, None, :]]

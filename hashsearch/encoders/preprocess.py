"""Images to model input.

Decoding, resizing and cropping happen once per image, in DataLoader workers,
into compact uint8 tensors; normalisation and augmentation run batch-wise on
the device, where they cost almost nothing.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from PIL import Image

from ..shards.layout import MINIATURE_SIDE
from .images import decode_image, read_image_file

# Start-of-frame markers of baseline, progressive and lossless JPEGs (not DHT/JPG/DAC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


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


def miniatures(pixels: torch.Tensor) -> np.ndarray:
    """uint8 [n, 3, S, S] model input -> uint8 [n, MINIATURE_SIDE ** 2]: grey (ITU-R 601 weights), each pixel
    the mean of its cell, as duplicates compares them (engine/copies.py)."""
    grey = torch.tensordot(pixels.float(), torch.tensor([0.299, 0.587, 0.114]), dims=([1], [0]))
    small = torch.nn.functional.adaptive_avg_pool2d(grey[:, None], MINIATURE_SIDE)
    return small.round().clamp(0, 255).to(torch.uint8).reshape(len(pixels), MINIATURE_SIDE ** 2).numpy()


def decode_file(path: str, size: int) -> torch.Tensor:
    """An image file -> uint8 [3, size, size]; raises ImageRejected like load_image.

    A JPEG already at the target size (CIFAR-style collections) is decoded by
    torchvision's libjpeg-turbo binding in about a third of the CPU time of the
    PIL path, with identical pixels; everything else, and anything unusual
    (truncated, CMYK, another size), takes the PIL path.
    """
    data = read_image_file(path)
    if path.lower().endswith((".jpg", ".jpeg")):
        pixels = _jpeg_at_size(data, size)
        if pixels is not None:
            return pixels
    return to_uint8_tensor(decode_image(data), size)


def _jpeg_at_size(data: bytes, size: int) -> torch.Tensor | None:
    if _jpeg_shape(data) not in ((size, size, 1), (size, size, 3)) or not data.endswith(b"\xff\xd9"):
        return None
    decoder = _torchvision_jpeg()
    if decoder is None:
        return None
    decode_jpeg, rgb = decoder
    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=rgb, apply_exif_orientation=True)
    except RuntimeError:
        return None


@functools.cache
def _torchvision_jpeg():
    # torchvision 0.29 deprecates its decoders in favour of TorchCodec and warns on
    # every call; when they are gone, every image simply takes the PIL path.
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    return decode_jpeg, ImageReadMode.RGB


def _jpeg_shape(data: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) from a JPEG's start-of-frame marker, or None."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:          # fill byte
            pos += 1
            continue
        if marker in _SOF_MARKERS:
            if pos + 10 > len(data):
                return None
            return (int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 7:pos + 9], "big"),
                    data[pos + 9])
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


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


@functools.lru_cache(maxsize=None)
def _view_transform(size: int):
    from torchvision.transforms import v2
    # SimCLR's augmentations, without blur: CIFAR-sized images have little detail left to blur
    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                       v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(0.2)])


def view_recipe(size: int) -> str:
    """The views' transforms with every parameter, as torchvision prints them."""
    return repr(_view_transform(size))


def augment_views(batch: torch.Tensor, views: int) -> torch.Tensor:
    """uint8 [n, 3, H, W] -> [views, n, 3, H, W]: random resized crops (a quarter of the area or more), flips,
    colour jitter and grayscale, each image's own (torch's global generator: seed it for a repeatable run)."""
    transform = _view_transform(batch.shape[-1])
    return torch.stack([torch.stack([transform(image) for image in batch]) for _ in range(views)])

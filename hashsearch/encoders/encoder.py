"""Encoder: a trained checkpoint that turns images into (codes, F7 features)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..codes import code_bytes, pack_codes
from ..config import PRECISIONS
from ..errors import HashsearchError
from ..shards.manifest import file_sha256
from .checkpoint import load_model
from .images import ImageRejected, image_from_array
from .preprocess import decode_file, normalize, to_uint8_tensor


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HashsearchError("--device cuda was asked for but no CUDA GPU is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise HashsearchError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


# The library may also name fp16, what auto resolves to on CUDA, which the command line leaves to auto.
ENCODER_PRECISIONS = (*PRECISIONS, "fp16")


def autocast(device: torch.device, precision: str = "auto"):
    """The model's arithmetic: auto is float16 autocast on CUDA and float32 on the CPU.

    bf16 runs convolutions in bfloat16, which pays on CPUs with native support
    (AVX512-BF16, AMX; README, "bf16 on the CPU"); elsewhere it is emulated and slower.
    """
    arithmetic = resolve_precision(device, precision)
    if arithmetic == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if arithmetic == "bf16" else torch.float16)


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """The arithmetic `precision` means on `device`: fp16, fp32 or bf16."""
    if precision not in ENCODER_PRECISIONS:
        raise HashsearchError(f"unknown precision {precision!r}; choose one of {', '.join(ENCODER_PRECISIONS)}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def to_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    # channels_last lets oneDNN/cuDNN pick their fast NHWC convolutions (README, "Encoding").
    return model.to(device, memory_format=torch.channels_last)


class Encoder:
    """Images in, (codes uint8 [n, ceil(bits/8)], features float32 [n, D]) out.

    >>> enc = Encoder.from_checkpoint("model.pt")
    >>> codes, feats = enc.encode(["cat.jpg", "dog.png"])
    >>> codes.shape, feats.shape                # (2, 6), (2, 512) for 48 bits, small
    """

    def __init__(self, model, config: dict, device: str = "auto", model_path=None, precision: str = "auto"):
        self.device = resolve_device(device)
        self.precision = resolve_precision(self.device, precision)    # rejects an unknown one now
        self.model = to_device(model, self.device).eval()
        self.config = config
        self.model_path = Path(model_path) if model_path else None

    @classmethod
    def from_checkpoint(cls, path, device: str = "auto", expect_bits: int | None = None,
                        precision: str = "auto") -> "Encoder":
        model, config = load_model(path, expect_bits=expect_bits)
        return cls(model, config, device, model_path=path, precision=precision)

    @property
    def bits(self) -> int:
        return self.config["bits"]

    @property
    def feature_dim(self) -> int:
        return self.config["feature_dim"]

    @property
    def input_size(self) -> int:
        return self.config["input_size"]

    @property
    def class_names(self) -> list[str]:
        return self.config["class_names"]

    def fingerprint(self) -> str:
        return file_sha256(self.model_path) if self.model_path else ""

    def prepare(self, image) -> torch.Tensor:
        """One image (path, PIL image or uint8 array) -> uint8 [3, S, S]."""
        if isinstance(image, (str, Path)):
            try:
                return decode_file(str(image), self.input_size)
            except ImageRejected as exc:
                raise HashsearchError(f"cannot read image {image}: {exc}") from None
        elif isinstance(image, np.ndarray):
            image = image_from_array(image)
        elif not isinstance(image, Image.Image):
            raise HashsearchError(f"cannot encode a {type(image).__name__}; pass paths, PIL images or arrays")
        return to_uint8_tensor(image.convert("RGB"), self.input_size)

    def encode(self, images, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
        images = list(images)
        if not images:
            return np.zeros((0, code_bytes(self.bits)), np.uint8), np.zeros((0, self.feature_dim), np.float32)
        codes, feats = [], []
        for a in range(0, len(images), batch_size):
            batch = torch.stack([self.prepare(im) for im in images[a:a + batch_size]])
            c, f = self.encode_batch(batch)
            codes.append(c)
            feats.append(f)
        return np.concatenate(codes), np.concatenate(feats)

    @torch.inference_mode()
    def encode_batch(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [n, 3, S, S] -> (packed codes, float32 F7)."""
        x = normalize(batch.to(self.device, non_blocking=True), self.config["mean"], self.config["std"])
        with autocast(self.device, self.precision):
            _, h, f7 = self.model(x.contiguous(memory_format=torch.channels_last))
        return pack_codes((h.float() > 0.5).cpu().numpy()), f7.float().cpu().numpy()

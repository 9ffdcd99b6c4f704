"""Binary hash codes: the one place that fixes their bit layout.

A K-bit code is stored as K/8 uint8 bytes.  Bit j of the code lives in byte
j // 8 at bit position j % 8, least significant bit first.  This is the layout
that faiss binary indexes read (IndexBinaryHash takes its bucket key from the
first b bits in exactly this order), so codes go to faiss without conversion.
"""
from __future__ import annotations

import numpy as np

from .errors import HashsearchError

def check_bits(bits: int) -> int:
    """Validate a code length; faiss binary indexes need whole bytes."""
    bits = int(bits)
    if bits <= 0 or bits % 8:
        raise HashsearchError(f"bit length must be a positive multiple of 8, got {bits}")
    return bits


def code_bytes(bits: int) -> int:
    return check_bits(bits) // 8


def pack_codes(bits: np.ndarray) -> np.ndarray:
    """Pack a boolean [n, K] matrix into uint8 [n, K/8] in the faiss layout."""
    bits = np.asarray(bits, dtype=bool)
    if bits.ndim != 2 or bits.shape[1] % 8:
        raise HashsearchError(f"codes must be [n, K] with K a multiple of 8, got shape {bits.shape}")
    return np.packbits(bits, axis=1, bitorder="little")


def unpack_codes(codes: np.ndarray) -> np.ndarray:
    """Inverse of pack_codes: uint8 [n, K/8] to a boolean [n, K] matrix."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    return np.unpackbits(codes, axis=1, bitorder="little").astype(bool)

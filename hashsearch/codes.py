"""Binary hash codes: the one place that fixes their bit layout.

A K-bit code is stored as ceil(K/8) uint8 bytes.  Bit j of the code lives in
byte j // 8 at bit position j % 8, least significant bit first.  This is the
layout that faiss binary indexes read (IndexBinaryHash takes its bucket key
from the first b bits in exactly this order), so codes go to faiss without
conversion.  When K is not a multiple of 8 (the paper's 12 bits), the last
byte's unused high bits are always 0, so they never add to a Hamming distance
and faiss indexes the codes as 8 * ceil(K/8) bits.
"""
from __future__ import annotations

import numpy as np

from .errors import HashsearchError

MAX_BITS = 4096


def check_bits(bits: int) -> int:
    """Validate a code length."""
    bits = int(bits)
    if not 1 <= bits <= MAX_BITS:
        raise HashsearchError(f"bit length must be between 1 and {MAX_BITS}, got {bits}")
    return bits


def code_bytes(bits: int) -> int:
    return (check_bits(bits) + 7) // 8


def pack_codes(bits: np.ndarray) -> np.ndarray:
    """Pack a boolean [n, K] matrix into uint8 [n, ceil(K/8)] in the faiss layout (zero padding bits)."""
    bits = np.asarray(bits, dtype=bool)
    if bits.ndim != 2 or bits.shape[1] == 0:
        raise HashsearchError(f"codes must be a [n, K] matrix, got shape {bits.shape}")
    return np.packbits(bits, axis=1, bitorder="little")


def unpack_codes(codes: np.ndarray, bits: int | None = None) -> np.ndarray:
    """Inverse of pack_codes: uint8 [n, B] to a boolean [n, bits] matrix (all 8 * B bits by default)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    return np.unpackbits(codes, axis=1, bitorder="little", count=bits).astype(bool)

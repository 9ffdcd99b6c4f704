"""Binary hash codes: the one place that fixes their bit layout, and their Hamming distance.

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


def code_words(codes: np.ndarray) -> np.ndarray:
    """Packed codes uint8 [..., B] as uint64 words [..., ceil(B/8)], the form hamming_distances reads.

    The padding bytes are 0, so they add nothing to a distance; without padding
    (B a multiple of 8, contiguous rows) the words are a view of the codes.
    """
    codes = np.asarray(codes, np.uint8)
    pad = -codes.shape[-1] % 8
    if pad:     # not np.pad, whose Python bookkeeping costs more than a batch-1 search's distances
        padded = np.zeros(codes.shape[:-1] + (codes.shape[-1] + pad,), np.uint8)
        padded[..., :codes.shape[-1]] = codes
        codes = padded
    return np.ascontiguousarray(codes).view(np.uint64)


def hamming_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between packed codes a [..., B] and b [..., B], broadcast over the leading axes as a ^ b.

    a and b are uint8 codes or their code_words (convert a database once and
    pass its words).  Small unsigned ints: uint8 up to 192-bit codes, else
    uint16, which numpy sorts by radix.  The xor is taken a word at a time, so
    the memory needed is a few outputs' worth, never one byte per code byte.
    """
    a, b = np.asarray(a), np.asarray(b)
    a_words, b_words = (x if x.dtype == np.uint64 else code_words(x) for x in (a, b))
    # Words hide a few bytes of padding; uint8 codes on both sides must match exactly.
    if a_words.shape[-1] != b_words.shape[-1] or (a.dtype == b.dtype == np.uint8 and a.shape[-1] != b.shape[-1]):
        raise HashsearchError(f"codes of {a.shape[-1] * a.itemsize} and {b.shape[-1] * b.itemsize} bytes "
                              f"cannot be compared")
    words = a_words.shape[-1]
    out = np.zeros(np.broadcast_shapes(a.shape[:-1], b.shape[:-1]), np.uint8 if words <= 3 else np.uint16)
    for w in range(words):
        np.add(out, _popcount(a_words[..., w] ^ b_words[..., w]), out=out)
    return out


# Set bits of each byte value: the popcount where numpy (< 2) has no bitwise_count.
_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _popcount(words: np.ndarray) -> np.ndarray:
    count = getattr(np, "bitwise_count", None)     # looked up per call, so a test can take it away
    if count is not None:
        return count(words)
    return _BYTE_POPCOUNT[np.ascontiguousarray(words)[..., None].view(np.uint8)].sum(-1, dtype=np.uint8)

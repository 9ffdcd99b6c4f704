"""The coarse level: a faiss binary index over the hash codes.

Three kinds, all searched by Hamming distance:
  flat       IndexBinaryFlat, an exact scan of every code (popcount SIMD).
  hash       IndexBinaryHash, buckets keyed on the first `hash_bits` bits,
             probing every bucket within `nflip` flipped bits.
  multihash  IndexBinaryMultiHash, `nhash` tables over disjoint bit slices,
             so a neighbour is found if any one slice is within `nflip`.
Hash kinds are sublinear but may return fewer than the asked number of
candidates (padded with -1) when the probed buckets hold fewer.
"""
from __future__ import annotations

import math

import faiss
import numpy as np

from ..errors import HashsearchError

KINDS = ("flat", "hash", "multihash")


def default_hash_bits(bits: int, n: int) -> int:
    # About 16 codes a bucket for random codes; clustered codes fill fewer, larger ones.
    want = int(round(math.log2(max(n, 2) / 16)))
    return max(4, min(bits, 24, want))


def build_coarse(codes: np.ndarray, bits: int, kind: str = "flat", *, hash_bits: int | None = None,
                 nhash: int | None = None, nflip: int | None = None) -> faiss.IndexBinary:
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.ndim != 2 or codes.shape[1] * 8 != bits:
        raise HashsearchError(f"codes of shape {codes.shape} do not hold {bits}-bit codes")
    if kind == "flat":
        index = faiss.IndexBinaryFlat(bits)
    elif kind in ("hash", "multihash"):
        b = hash_bits or default_hash_bits(bits, len(codes))
        if not 1 <= b <= min(bits, 64):
            raise HashsearchError(f"hash bits must be between 1 and {min(bits, 64)}, got {b}")
        if kind == "hash":
            index = faiss.IndexBinaryHash(bits, b)
        else:
            tables = nhash or max(1, bits // b)
            if tables * b > bits:
                raise HashsearchError(f"{tables} tables of {b} bits do not fit in {bits}-bit codes")
            index = faiss.IndexBinaryMultiHash(bits, tables, b)
        index.nflip = 1 if nflip is None else int(nflip)
    else:
        raise HashsearchError(f"unknown coarse index {kind!r}; choose one of {', '.join(KINDS)}")
    index.add(codes)
    return index


def describe(index: faiss.IndexBinary) -> dict:
    if isinstance(index, faiss.IndexBinaryHash):
        return {"kind": "hash", "hash_bits": index.b, "nflip": index.nflip}
    if isinstance(index, faiss.IndexBinaryMultiHash):
        return {"kind": "multihash", "hash_bits": index.b, "nhash": index.nhash, "nflip": index.nflip}
    return {"kind": "flat"}


def set_nflip(index: faiss.IndexBinary, nflip: int | None) -> None:
    if nflip is not None and hasattr(index, "nflip"):
        index.nflip = int(nflip)

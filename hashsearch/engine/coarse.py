"""The coarse level: a faiss binary index over the hash codes.

Three kinds, all searched by Hamming distance:
  flat       IndexBinaryFlat, an exact scan of every code (popcount SIMD).
  hash       IndexBinaryHash, buckets keyed on the first `hash_bits` bits,
             probing every bucket within `nflip` flipped bits.
  multihash  IndexBinaryMultiHash, `nhash` tables over disjoint bit slices,
             so a neighbour is found if any one slice is within `nflip`.
Hash kinds are sublinear but may return fewer than the asked number of
candidates (padded with -1) when the probed buckets hold fewer.

Which wins (measured on 1M synthetic 128-bit codes, one thread, see the README):
flat scans every code, ~0.6 ms at 1M (~0.6 ns a code), so it only wins
below ~50k rows.  hash must flip bits to find neighbours that differ in its
key, and the probes grow as C(hash_bits, nflip): 0.1 ms at 1M for 16 bits
and nflip=3.  multihash with 16-bit slices and nflip=0 is both fastest
(~0.03 ms at 1M) and exact up to Hamming nhash - 1 (a closer code matches
some slice exactly), at the cost of a slower open (~0.5 s at 1M).
"""
from __future__ import annotations

import contextlib
import math
import threading

import faiss
import numpy as np

from ..codes import code_bytes
from ..config import COARSE_KINDS as KINDS
from ..errors import HashsearchError


DEFAULT_NFLIP = {"hash": 2, "multihash": 0}


def default_hash_bits(bits: int, n: int, kind: str = "hash") -> int:
    # About 16 codes a bucket for random codes; clustered codes fill fewer, larger ones.
    want = max(4, int(round(math.log2(max(n, 2) / 16))))
    if kind == "multihash":
        # At least 4 tables, so that with nflip=0 every code within Hamming 3 is found
        # (one of 4 slices must then match exactly); 16 bits is the measured sweet spot at 1M.
        return max(1, min(want, 16, bits // 4))
    return min(bits, 24, want)


def build_coarse(codes: np.ndarray, bits: int, kind: str = "flat", *, hash_bits: int | None = None,
                 nhash: int | None = None, nflip: int | None = None) -> faiss.IndexBinary:
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.ndim != 2 or codes.shape[1] != code_bytes(bits):
        raise HashsearchError(f"codes of shape {codes.shape} do not hold {bits}-bit codes")
    bits = codes.shape[1] * 8       # faiss works in whole bytes; padding bits are always 0
    if kind == "flat":
        index = faiss.IndexBinaryFlat(bits)
    elif kind in ("hash", "multihash"):
        for name, value in (("hash bits", hash_bits), ("nhash", nhash)):
            if value is not None and value < 1:
                raise HashsearchError(f"{name} must be at least 1, got {value}")
        b = hash_bits or default_hash_bits(bits, len(codes), kind)
        if not 1 <= b <= min(bits, 64):
            raise HashsearchError(f"hash bits must be between 1 and {min(bits, 64)}, got {b}")
        check_nflip(nflip, b)
        if kind == "hash":
            index = faiss.IndexBinaryHash(bits, b)
        else:
            tables = nhash or max(1, bits // b)
            if tables * b > bits:
                raise HashsearchError(f"{tables} tables of {b} bits do not fit in {bits}-bit codes")
            index = faiss.IndexBinaryMultiHash(bits, tables, b)
        index.nflip = DEFAULT_NFLIP[kind] if nflip is None else int(nflip)
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


# Buckets one query may probe in one table: the sum of C(hash_bits, i) for i <= nflip.  A million is far
# past any useful depth; nflip 32 over 32-bit keys would be 4 billion probes, a query that never returns.
MAX_PROBES = 1_000_000


def check_nflip(nflip: int | None, hash_bits: int | None = None) -> None:
    # faiss loops forever on a negative nflip, and on one above the key's bits.
    if nflip is None:
        return
    top = 64 if hash_bits is None else hash_bits
    if isinstance(nflip, bool) or not isinstance(nflip, (int, np.integer)) or not 0 <= nflip <= top:
        raise HashsearchError(f"nflip must be an integer from 0 to {top} (the hash key's bits), got {nflip}")
    probes = sum(math.comb(top, i) for i in range(int(nflip) + 1))
    if hash_bits is not None and probes > MAX_PROBES:
        raise HashsearchError(f"nflip {nflip} over {top}-bit hash keys probes {probes:,} buckets a query; "
                              f"at most {MAX_PROBES:,} are allowed (use a smaller --nflip or --hash-bits)")


# Code widths in bytes that faiss's flat scan has a specialised Hamming kernel for; other widths take a
# generic loop about 3x slower (0.75 against 0.18 ms at 200k codes for 6 against 8 bytes, one thread, here).
# Zero bytes added to every code and query leave each distance as it was.
FAST_FLAT_WIDTHS = (4, 8, 16, 20, 32, 64)


def flat_codes(index: faiss.IndexBinaryFlat) -> np.ndarray:
    """The codes a flat index holds, uint8 [ntotal, code_size], in its positions' order."""
    return faiss.vector_to_array(index.xb).reshape(index.ntotal, index.code_size)


def searchable_flat(index: faiss.IndexBinaryFlat) -> tuple[faiss.IndexBinaryFlat, int]:
    """A flat index as it is fastest to search, and the zero bytes each query needs appended.

    Padded to the next width with a specialised kernel, and set to select the k nearest by
    counting sort rather than a heap: 0.11 against 0.23 ms for k=500 over 50k 256-bit codes, and
    the same results in the same (Hamming, row) order (checked against the heap on tied codes).
    """
    width = next((w for w in FAST_FLAT_WIDTHS if w >= index.code_size), index.code_size)
    pad = width - index.code_size
    if pad:
        codes = flat_codes(index)
        index = faiss.IndexBinaryFlat(width * 8)
        index.add(np.pad(codes, ((0, 0), (0, pad))))
    index.use_heap = False
    return index, pad


class Coarse:
    """A faiss binary index with per-call probing depth (nflip), safe to share between threads.

    nflip is a field of the faiss index itself, with no per-search parameter
    (binary hash indexes take no SearchParameters).  So searches that want the
    same depth run together, and one that wants another waits until none is
    running, then sets it: a search never runs with another thread's setting,
    and a batch split across threads still runs in parallel.  Flat indexes
    have no such field and search without any of this.
    """

    def __init__(self, index: faiss.IndexBinary):
        self.params = describe(index)
        self.hashed = "nflip" in self.params
        self.index, self._pad = (index, 0) if self.hashed else searchable_flat(index)
        self.built_nflip = self.params.get("nflip")
        if self.hashed:         # an index file from elsewhere may carry any depth
            check_nflip(self.built_nflip, self.params["hash_bits"])
        self._setting = threading.Condition()
        self._running = 0           # searches in flight, all with index.nflip == self._nflip
        self._nflip = self.built_nflip

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, codes: np.ndarray, k: int, nflip: int | None = None):
        if not self.hashed:
            return self.index.search(self._padded(codes), k)
        with self._probing(nflip):
            return self.index.search(codes, k)

    def range_search(self, codes: np.ndarray, radius: int, nflip: int | None = None):
        if not self.hashed:
            return self.index.range_search(self._padded(codes), radius)
        with self._probing(nflip):
            return self.index.range_search(codes, radius)

    def stored_codes(self) -> np.ndarray | None:
        """The codes the index holds, in its positions' order and as they were given (without the padding
        of searchable_flat); None for a hash index, which keeps them in its buckets."""
        index = self.index.storage if isinstance(self.index, faiss.IndexBinaryMultiHash) else self.index
        if not isinstance(index, faiss.IndexBinaryFlat):
            return None
        codes = flat_codes(index)
        return codes[:, :codes.shape[1] - self._pad]

    def _padded(self, codes: np.ndarray) -> np.ndarray:
        if not self._pad:
            return codes
        out = np.zeros((len(codes), codes.shape[1] + self._pad), np.uint8)
        out[:, :codes.shape[1]] = codes
        return out

    @contextlib.contextmanager
    def _probing(self, nflip: int | None):
        want = self.built_nflip if nflip is None else int(nflip)
        with self._setting:
            while self._running and self._nflip != want:
                self._setting.wait()
            if self._nflip != want:
                self.index.nflip = self._nflip = want
            self._running += 1
        try:
            yield
        finally:
            with self._setting:
                self._running -= 1
                if not self._running:
                    self._setting.notify_all()

    def like(self, codes: np.ndarray, bits: int) -> "Coarse":
        """A new index of the same kind and parameters over `codes` (the delta of newer rows)."""
        params = {k: v for k, v in self.params.items() if k != "kind"}
        return Coarse(build_coarse(codes, bits, self.params["kind"], **params))

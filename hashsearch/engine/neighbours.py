"""Neighbour codes: a second binary code per item, fitted to F7 so that Hamming distance follows L2.

The latent layer H is trained with softmax on class labels, so its codes group
images by class: within a class, two codes' Hamming distance says little
about their F7 distance, and a pool of H's nearest codes is filled with
class-mates rather than with the query's neighbours.  An edited copy of a
database image (re-saved, cropped, brightened) is then often missed before
the rerank ever sees it.

ITQ (hashsearch.itq) fitted to the collection's own F7 makes codes whose
Hamming distance does follow F7's distances.  `build-index` fits it on the
live rows (a sample of them at scale), and the coarse level then holds two
indexes over the same rows: H's codes, for `bcs` and the class-level pool, and
these, for the neighbour pool.  `hds` reranks the union of both pools by L2 on
F7 (engine/index.py).  The projection is stored beside the index, so a query's
neighbour code is computed from its F7, which every hds query has.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

from ..codes import pack_codes
from ..errors import HashsearchError
from ..itq import fit_itq

# Rows ITQ is fitted on: the PCA and the rotation settle long before this (fit time grows with it).
FIT_SAMPLE_ROWS = 100_000
# Rows encoded at a time when a whole collection's codes are made: a 4096-d float32 block is 64 MB.
ENCODE_BLOCK_ROWS = 4096


# One query's projection is a matrix-vector product.  OpenBLAS's, for x @ matrix, slows sharply from about
# 2,000 features, where matrix.T @ x over the matrix stored transposed does not: 0.111 against 0.035 ms at
# 4096 x 256 and 0.040 against 0.010 ms at 2048 x 256 (Intel Xeon, numpy 2.4's OpenBLAS), but 0.011 against
# 0.015 ms at 1280 x 256.  So wide features keep the matrix in both layouts (4 MB more at 4096 x 256).
BY_BIT_MIN_DIM = 2048


@dataclass(frozen=True)
class NeighbourProjection:
    """code = pack(x . matrix - offset >= 0): ITQ's (x - mean) W R with the centring folded into `offset`."""
    matrix: np.ndarray      # float32 [D, bits]
    offset: np.ndarray      # float32 [bits]
    by_bit: np.ndarray | None = field(init=False, repr=False, compare=False)    # matrix.T, contiguous

    def __post_init__(self):
        wide = self.matrix.shape[0] >= BY_BIT_MIN_DIM
        object.__setattr__(self, "by_bit", np.ascontiguousarray(self.matrix.T) if wide else None)

    @property
    def bits(self) -> int:
        return self.matrix.shape[1]

    @property
    def feature_dim(self) -> int:
        return self.matrix.shape[0]

    def project(self, feats: np.ndarray) -> np.ndarray:
        """The centred projection float32 [n, bits] of features [n, D] (any float dtype): its signs are the
        code, and its L2 distances are F7's within the top principal directions (engine/sketch.py)."""
        feats = np.asarray(feats)
        if feats.ndim != 2 or feats.shape[1] != self.feature_dim:
            raise HashsearchError(f"features of shape {feats.shape} do not fit a {self.feature_dim}-d projection")
        feats = feats.astype(np.float32, copy=False)
        if len(feats) == 1 and self.by_bit is not None:
            return (self.by_bit @ feats[0] - self.offset)[None]
        return feats @ self.matrix - self.offset

    def encode(self, feats: np.ndarray) -> np.ndarray:
        """Packed codes uint8 [n, bits/8] of features [n, D] (any float dtype)."""
        return codes_of_projection(self.project(feats))

    def to_bytes(self) -> bytes:
        return float32_npy(np.vstack([self.matrix, self.offset[None]]))

    @classmethod
    def from_bytes(cls, data: bytes, feature_dim: int, bits: int) -> "NeighbourProjection":
        stacked = float32_from_npy(data, (feature_dim + 1, bits), "neighbour projection")
        return cls(np.ascontiguousarray(stacked[:-1]), np.ascontiguousarray(stacked[-1]))


def float32_npy(array: np.ndarray) -> bytes:
    """`array` as float32 in .npy format: the index's files of fitted numbers (the projection, the cells)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def float32_from_npy(data: bytes, shape: tuple, what: str) -> np.ndarray:
    """The finite float32 array of `shape` that float32_npy wrote, or HashsearchError naming `what`."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise HashsearchError(f"unreadable {what} ({exc})") from None
    if array.dtype != np.float32 or array.shape != tuple(shape) or not np.isfinite(array).all():
        raise HashsearchError(f"the {what} file holds {array.dtype} {array.shape}; expected finite float32 "
                              f"{tuple(shape)}")
    return array


def codes_of_projection(projected: np.ndarray) -> np.ndarray:
    """The packed neighbour codes of rows NeighbourProjection.project made."""
    return pack_codes(projected >= 0)


def check_neighbour_bits(bits: int, feature_dim: int, rows: int) -> None:
    # ITQ projects on principal directions: there are no more of them than feature dimensions or rows.
    top = min(feature_dim, rows)
    if bits % 8 or not 8 <= bits <= top:
        raise HashsearchError(f"neighbour bits must be a multiple of 8 from 8 to {top} (the features' dimension "
                              f"and the rows to fit, whichever is fewer), got {bits}")


def fit_projection(sample: np.ndarray, bits: int, seed: int = 0) -> NeighbourProjection:
    """ITQ on `sample` (float features [n, D]), as a projection."""
    check_neighbour_bits(bits, sample.shape[1], len(sample))
    itq = fit_itq(sample, bits, seed=seed)
    matrix = (itq.projection @ itq.rotation).astype(np.float32)
    return NeighbourProjection(matrix, (itq.mean @ matrix).astype(np.float32))


def sample_rows(live: np.ndarray, rows: int = FIT_SAMPLE_ROWS, seed: int = 0) -> np.ndarray:
    """Sorted rows to fit on: every live row, or a seeded sample of them."""
    if len(live) <= rows:
        return live
    return np.sort(np.random.default_rng(seed).choice(live, rows, replace=False))

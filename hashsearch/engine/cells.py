"""Cells: an inverted file over the sketch, the neighbour pool's second source.

The neighbour codes' Hamming pool (engine/neighbours.py) keeps F7's neighbours
where F7 is spread out, but a fine-tuned model's F7 is clustered by class:
on CIFAR-10's fine-tuned efficientnet, three principal directions hold 64 % of
its variance, so the 256 ITQ bits mostly say which cluster a row is in, and a
pool of 500 held 0.86 of the exact top 10.  k-means cells over the same
projection follow those clusters instead: the rows of the 8 cells nearest a
query, ranked by the sketch's 4-bit values, held 0.978 of it, in 0.09 ms
against the Hamming scan's 0.15 ms (README, "Faithful coarse search").

`build-index` fits the cells' centres to the projected live rows and stores
them beside the projection; which source (or both) a collection's searches
use is measured there too (engine/tuning.py).  The inverted lists themselves
are made in memory from the sketch (engine/sketch.py) for each generation,
so they hold exactly its live rows: faiss's IndexIVFScalarQuantizer, its
codes the sketch's own and its ids rows.
"""
from __future__ import annotations

import math

import faiss
import numpy as np

from ..errors import HashsearchError

# k-means wants about 39 rows a cell or faiss warns, and about sqrt(n) cells keeps a probe's rows and the
# centres it compares with in balance: 256 cells at CIFAR-10's 50,000 rows, 1,024 at a million.
MIN_ROWS_PER_CELL = 39
# k-means settles long before this many rows a cell (faiss's own default sample).
FIT_ROWS_PER_CELL = 256
KMEANS_ITERATIONS = 20


def cells_for(rows: int) -> int:
    """How many cells a collection of `rows` live rows gets: the power of two nearest sqrt(rows), at most one
    per MIN_ROWS_PER_CELL rows, at least one."""
    if rows < MIN_ROWS_PER_CELL:
        return 1
    return min(2 ** round(math.log2(math.sqrt(rows))), rows // MIN_ROWS_PER_CELL)


def fit_cells(projected: np.ndarray, cells: int, seed: int = 0) -> np.ndarray:
    """k-means centres float32 [cells, bits] of projected rows [n, bits]."""
    projected = np.ascontiguousarray(projected, dtype=np.float32)
    if not 1 <= cells <= len(projected):
        raise HashsearchError(f"cannot fit {cells} cells to {len(projected)} rows")
    if cells == 1:
        return projected.mean(0, keepdims=True)
    kmeans = faiss.Kmeans(projected.shape[1], cells, niter=KMEANS_ITERATIONS, seed=seed,
                          max_points_per_centroid=FIT_ROWS_PER_CELL)
    kmeans.train(projected)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


class CellIndex:
    """The live rows of one generation in their cells, each with its sketch code."""

    def __init__(self, centres: np.ndarray, quantizer: faiss.IndexScalarQuantizer):
        bits = centres.shape[1]
        self.centres = faiss.IndexFlatL2(bits)
        self.centres.add(centres)
        self.ivf = faiss.IndexIVFScalarQuantizer(self.centres, bits, len(centres), quantizer.sq.qtype,
                                                 faiss.METRIC_L2, False)
        self.ivf.sq = quantizer.sq              # the sketch's ranges: its codes are stored as they are
        self.ivf.is_trained = True
        self._probes: dict[int, faiss.SearchParametersIVF] = {}

    @property
    def cells(self) -> int:
        return self.ivf.nlist

    def assign(self, projected: np.ndarray) -> np.ndarray:
        """The cell int64 [n] of each projected row [n, bits]."""
        return self.centres.search(np.ascontiguousarray(projected, dtype=np.float32), 1)[1][:, 0]

    def fill(self, rows: np.ndarray, cells: np.ndarray, codes: np.ndarray) -> None:
        """Put `rows` (int64) into their `cells`, each with its sketch code (uint8 [n, code_size])."""
        order = np.argsort(cells, kind="stable")
        rows, cells = np.ascontiguousarray(rows[order], dtype=np.int64), cells[order]
        codes = np.ascontiguousarray(codes[order])
        bounds = np.searchsorted(cells, np.arange(self.cells + 1))
        for cell in range(self.cells):
            a, b = bounds[cell], bounds[cell + 1]
            if b > a:
                self.ivf.invlists.add_entries(cell, int(b - a), faiss.swig_ptr(rows[a:b]), faiss.swig_ptr(codes[a:b]))
        self.ivf.ntotal = int(self.ivf.ntotal + len(rows))

    def search(self, projected: np.ndarray, keep: int, probe: int) -> np.ndarray:
        """The `keep` rows nearest in the sketch to each projected query [nq, bits] among the rows of its
        `probe` nearest cells: int64 [nq, keep], -1 padded."""
        params = self._probes.get(probe)
        if params is None:
            params = self._probes[probe] = faiss.SearchParametersIVF(nprobe=min(probe, self.cells))
        return self.ivf.search(np.ascontiguousarray(projected, dtype=np.float32), keep, params=params)[1]

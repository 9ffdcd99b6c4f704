"""The fine level: exact L2 on F7 over each query's candidate pool.

Candidate rows are read from the shards (pread, see shards.RowReader) straight
into the storage of a small faiss flat index and scanned there: float16
rows by an IndexScalarQuantizer(QT_fp16), whose SIMD decode is far faster
than numpy's float16 -> float32 cast, float32 rows by an IndexFlatL2.
Reading into faiss's own buffer saves a copy, and the buffer is kept
between queries, so a query costs one read per row and one scan.
Distances are squared L2, as faiss reports them.

Measured alternatives at 4096-d, pool 50 (see the README): casting to
float32 in numpy and using BLAS or faiss.knn costs ~10x more (the cast),
and IndexFlat.compute_distance_subset is faster only by skipping the read,
because it needs every feature in RAM as float32 (16 GB at 1M).
"""
from __future__ import annotations

import threading

import faiss
import numpy as np

from ..errors import HashsearchError
from ..shards import RowReader


# Batch-1 latency is ~0.1 ms, so the faiss Python wrappers' per-call costs show: its
# __setattr__ guard takes ~2 us to set ntotal, and search() allocates its outputs.
_set_ntotal = faiss.Index.ntotal.fset


def flat_index_for(dtype: np.dtype, dim: int) -> faiss.Index:
    if np.dtype(dtype) == np.float16:
        return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
    return faiss.IndexFlatL2(dim)


class _Scratch:
    """A small faiss index whose storage the caller fills with candidate rows (`width` values of `dtype` each:
    a flat index's rows, or a scalar quantizer's codes), kept between queries."""

    def __init__(self, index: faiss.Index, dtype: np.dtype, width: int, capacity: int = 256):
        self.index, self.dtype, self.width = index, np.dtype(dtype), width
        self.capacity = 0
        self.reserve(capacity)

    def reserve(self, m: int) -> None:
        if m <= self.capacity:
            return
        nbytes = m * self.width * self.dtype.itemsize
        self.index.codes.resize(nbytes)
        self.buffer = faiss.rev_swig_ptr(self.index.codes.data(), nbytes).view(self.dtype).reshape(m, self.width)
        self.rows = [[memoryview(row).cast("B")] for row in self.buffer]
        self.capacity = m

    def nearest(self, query: np.ndarray, m: int, take: int) -> tuple[np.ndarray, np.ndarray]:
        """The `take` nearest of the buffer's first m rows to `query` (contiguous float32): (dist, positions)."""
        _set_ntotal(self.index, m)
        d, i = np.empty(take, np.float32), np.empty(take, np.int64)
        self.index.search_c(1, faiss.swig_ptr(query), take, faiss.swig_ptr(d), faiss.swig_ptr(i))
        if i.min() < 0:         # only a NaN in the query gets faiss to leave a slot empty
            raise HashsearchError("query features must be finite")
        return d, i


class Reranker:
    """Ranks candidate rows by exact L2.  One per thread: it owns faiss buffers."""

    def __init__(self, features: RowReader, capacity: int = 256):
        self.features = features
        self.dim = features.collection.feature_dim
        dtype = features.collection.feature_dtype
        self.f7 = _Scratch(flat_index_for(dtype, self.dim), dtype, self.dim, capacity)
        self.sketches: _Scratch | None = None
        self._sketch_ranges = None      # the quantizer whose ranges self.sketches decodes with

    def shortlist(self, query_sketch: np.ndarray, sketch, candidates: np.ndarray, keep: int) -> np.ndarray:
        """The `keep` candidates (-1 padded at the end) nearest to the query in `sketch` (engine/sketch.py),
        -1 padded to the same width; all of them where there are no more than `keep`."""
        m = int(np.count_nonzero(candidates >= 0))
        if m <= keep:
            return candidates
        if self._sketch_ranges is not sketch.quantizer:
            self.sketches = _Scratch(faiss.clone_index(sketch.quantizer), np.uint8, sketch.quantizer.code_size)
            self._sketch_ranges = sketch.quantizer
        self.sketches.reserve(m)
        sketch.gather(candidates[:m], self.sketches.buffer)
        _, nearest = self.sketches.nearest(np.ascontiguousarray(query_sketch, dtype=np.float32), m, keep)
        out = np.full(len(candidates), -1, np.int64)
        out[:keep] = np.sort(candidates[nearest])     # by row, as the pool was: L2 ties stay in row order
        return out

    def search(self, query: np.ndarray, candidates: np.ndarray, dist: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Rank candidate rows (-1 padded at the end) for one query [1, D] float32 into dist/rows [k],
        which hold inf/-1; returns the positions in `candidates` of the results."""
        query = np.ascontiguousarray(query, dtype=np.float32)      # swig_ptr reads raw memory
        if query.size != self.dim:
            raise HashsearchError(f"query has {query.size} features; this collection's have {self.dim}")
        m = int(np.count_nonzero(candidates >= 0))
        if m == 0:
            return candidates[:0]
        candidates = candidates[:m]
        self.f7.reserve(m)
        self.features.gather(candidates, self.f7.rows, self.f7.buffer)
        take = min(len(rows), m)
        d, i = self.f7.nearest(query, m, take)
        dist[:take], rows[:take] = d, candidates[i]
        return i


class PerThreadRerankers:
    """A Reranker for each thread that asks, kept between calls: each owns its faiss buffer."""

    def __init__(self):
        self._local = threading.local()

    def get(self, features: RowReader) -> Reranker:
        rr = getattr(self._local, "reranker", None)
        if rr is None:
            rr = self._local.reranker = Reranker(features)
        rr.features = features
        return rr

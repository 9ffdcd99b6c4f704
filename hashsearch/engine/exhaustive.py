"""The paper's baseline: exhaustive exact L2 over every F7 feature.

Two ways, for two situations:
  load_flat_l2   a float32 IndexFlatL2 in RAM, storage sized once up front
                 (growing it by add() would transiently need twice its size:
                 more than this machine has at 1M x 4096).  Fastest search.
  scan_knn       streams blocks and merges each block's top-k, so RAM
                 stays at one block whatever N is.
Both read the features with the collection's block reader (pread into one reused buffer) rather than
through the memory map, which would leave every page of the features file
mapped, and counted in the process's RSS, until the end (8 GB at 1M on top
of the 16 GB index).
"""
from __future__ import annotations

import faiss
import numpy as np

from ..shards import Collection


def load_flat_l2(coll: Collection, block_rows: int = 8192, progress=None) -> faiss.IndexFlatL2:
    n, d = coll.n, coll.feature_dim
    index = faiss.IndexFlatL2(d)
    index.codes.resize(n * d * 4)
    storage = faiss.rev_swig_ptr(index.codes.data(), n * d * 4).view(np.float32).reshape(n, d)
    for first, block in coll.iter_feature_blocks(block_rows):
        storage[first:first + len(block)] = block
        if progress is not None:
            progress(len(block))
    index.ntotal = n
    return index


def scan_knn(coll: Collection, queries: np.ndarray, k: int, block_rows: int = 8192):
    """Exact top-k by squared L2 over all rows: (distances [nq, k], rows [nq, k])."""
    queries = np.ascontiguousarray(queries, np.float32)
    heap = faiss.ResultHeap(len(queries), k)
    for first, block in coll.iter_feature_blocks(block_rows):
        d, i = faiss.knn(queries, np.ascontiguousarray(block, np.float32), min(k, len(block)))
        if d.shape[1] < k:
            pad = k - d.shape[1]
            d = np.hstack([d, np.full((len(d), pad), np.inf, np.float32)])
            i = np.hstack([i, np.full((len(i), pad), -1, np.int64)])
        heap.add_result(d, np.where(i >= 0, i + first, -1))
    heap.finalize()
    return heap.D, heap.I

"""faiss thread control.

OpenMP fork/join costs more than the work in a single small query, so
batch-1 search runs faiss on one thread; batches use every core, split by
Index across Python threads that each run faiss on one thread.
"""
from __future__ import annotations

import contextlib

import faiss

MAX_THREADS = faiss.omp_get_max_threads()


def threads_for_batch(nq: int) -> int:
    return 1 if nq < 2 * MAX_THREADS else MAX_THREADS


@contextlib.contextmanager
def faiss_threads(n: int):
    previous, n = faiss.omp_get_max_threads(), max(1, n)
    if n == previous:       # the common batch-1 case: no OpenMP calls at all
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)

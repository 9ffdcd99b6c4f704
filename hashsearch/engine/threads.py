"""faiss thread control.

OpenMP fork/join costs more than the work in a single small query, so
batch-1 search runs faiss on one thread; batches use every core, split by
Index across Python threads that each run faiss on one thread.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np

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


class QuerySplitter:
    """Runs work(a, b) over a batch's query range: in the caller's thread for a few queries, else split
    across Python threads that each run faiss on one thread.

    Its OpenMP would parallelise each faiss call over queries, but one query's work is too small for
    that, and when other processes share the cores, OpenMP's spin-then-sleep barrier costs ~20 ms a call
    where Python threads, which block instead, cost microseconds.  faiss and pread release the GIL.
    """

    def __init__(self):
        # Threads start on first use, so a searcher that only serves batch-1 queries has none.
        self._pool = ThreadPoolExecutor(MAX_THREADS, initializer=faiss.omp_set_num_threads, initargs=(1,))

    def run(self, work, nq: int) -> None:
        workers = min(threads_for_batch(nq), nq)
        if workers <= 1:
            with faiss_threads(1):
                work(0, nq)
            return
        cuts = np.linspace(0, nq, workers + 1).astype(int).tolist()
        for f in [self._pool.submit(work, a, b) for a, b in zip(cuts[:-1], cuts[1:])]:
            f.result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)

"""OpenMP thread count for one FAISS call.

FAISS parallelises searches over queries, so a single query gains nothing from extra threads but
pays for waking them (milliseconds when the cores are busy). libgomp keeps the thread count per
calling thread, so setting it here does not affect searches running in other threads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import faiss

# Batches smaller than this run on the calling thread alone.
MIN_QUERIES_PER_THREAD = 8


@contextmanager
def omp_threads(count: int | None) -> Iterator[None]:
    """Run the block with `count` OpenMP threads (None = leave as is)."""
    if count is None:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, count))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def threads_for(num_queries: int) -> int | None:
    """1 thread for small batches, FAISS's default otherwise."""
    return 1 if num_queries < MIN_QUERIES_PER_THREAD else None

"""Recall against exact search, and tuning of the search-time knob (nprobe / efSearch) to the
smallest value that reaches a target recall@k."""

from __future__ import annotations

import time
from dataclasses import dataclass

import faiss
import numpy as np
from tqdm import tqdm

from index.factory import use_gpu
from index.omp import omp_threads
from index.search_index import SEARCH_KNOB, SearchIndex

DEFAULT_TARGET_RECALL = 0.95
DEFAULT_K = 10
DEFAULT_NUM_QUERIES = 1000
EXACT_BATCH = 4096
PLATEAU_TOLERANCE = 0.005


def exact_neighbours(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ground truth: ids (QxK) of the exact top-k by inner product (GPU when FAISS has one)."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    if use_gpu():
        flat = faiss.index_cpu_to_all_gpus(flat)
    flat.add(vectors)
    found = np.empty((queries.shape[0], min(k, vectors.shape[0])), dtype=np.int64)
    for start in range(0, queries.shape[0], EXACT_BATCH):
        _, rows = flat.search(queries[start : start + EXACT_BATCH], found.shape[1])
        found[start : start + EXACT_BATCH] = ids[rows]
    return found


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:k] ∩ truth[:k]| / k (the usual ANN recall@k)."""
    found, truth = found[:, :k], truth[:, :k]
    hits = sum(np.intersect1d(f[f >= 0], t).size for f, t in zip(found, truth, strict=True))
    return hits / float(truth.size) if truth.size else 1.0


def sample_queries(num_vectors: int, count: int, seed: int = 0) -> np.ndarray:
    """Row numbers of held-out query vectors sampled from the data (sorted)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_vectors, size=min(count, num_vectors), replace=False))


def time_search(
    index: SearchIndex,
    queries: np.ndarray,
    k: int,
    params: dict[str, int] | None = None,
    threads: int | None = None,
) -> float:
    """Seconds per query for one batched search of all `queries` (with `threads` OpenMP threads)."""
    with omp_threads(threads):
        start = time.perf_counter()
        index.search(queries, k, params=params)
        return (time.perf_counter() - start) / max(1, queries.shape[0])


def single_query_latency(
    index: SearchIndex, queries: np.ndarray, k: int, params: dict[str, int] | None = None, count: int = 200
) -> float:
    """Median seconds for one query searched on its own (what a service request sees)."""
    timings = []
    for row in queries[:count]:
        start = time.perf_counter()
        index.search(row[None, :], k, params=params)
        timings.append(time.perf_counter() - start)
    return float(np.median(timings)) if timings else 0.0


@dataclass
class TuneResult:
    knob: str | None
    value: int | None
    recall: float
    reached: bool
    seconds_per_query: float
    curve: list[tuple[int, float]]  # every (value, recall) tried


def tune_search(
    index: SearchIndex,
    queries: np.ndarray,
    truth: np.ndarray,
    k: int = DEFAULT_K,
    target_recall: float = DEFAULT_TARGET_RECALL,
    progress: bool = True,
) -> TuneResult:
    """Find the smallest nprobe / efSearch with recall@k >= target: doubling until reached, then a
    binary search between the last miss and the first hit (recall grows with the knob). When even
    the largest value misses the target, the result says so (reached=False) and holds the smallest
    value within PLATEAU_TOLERANCE of the best recall."""
    knob = SEARCH_KNOB[index.index_type]

    def measure(value: int | None) -> float:
        params = {knob: value} if knob else None
        return recall_at_k(index.search(queries, k, params=params)[1], truth, k)

    if knob is None:
        recall = measure(None)
        return TuneResult(None, None, recall, recall >= target_recall, time_search(index, queries, k), [])
    ceiling = int(index.params["nlist"]) if knob == "nprobe" else max(4096, 8 * k)
    curve: list[tuple[int, float]] = []
    with tqdm(desc=f"tune {knob}", unit="step", disable=not progress) as bar:

        def tried(value: int) -> float:
            recall = measure(value)
            curve.append((value, recall))
            bar.set_postfix({knob: value, f"recall@{k}": f"{recall:.4f}"})
            bar.update(1)
            return recall

        # HNSW searches with max(efSearch, k), so efSearch values below k are all the same.
        value = min(1 if knob == "nprobe" else max(16, k), ceiling)
        doubling = [(k - 1 if knob == "efSearch" else 0, 0.0)]
        while (recall := tried(value)) < target_recall and value < ceiling:
            doubling.append((value, recall))
            value = min(2 * value, ceiling)
        doubling.append((value, recall))
        reached = recall >= target_recall
        # Unreachable target (lossy PQ codes): settle for the smallest value within PLATEAU_TOLERANCE of
        # the best recall seen rather than searching every list.
        goal = target_recall if reached else max(r for _, r in doubling) - PLATEAU_TOLERANCE
        first_hit = next(i for i in range(1, len(doubling)) if doubling[i][1] >= goal)
        (low, _), (high, best) = doubling[first_hit - 1], doubling[first_hit]
        while high - low > 1:
            middle = (low + high) // 2
            middle_recall = tried(middle)
            if middle_recall >= goal:
                high, best = middle, middle_recall
            else:
                low = middle
    params = {knob: high}
    return TuneResult(knob, high, best, reached, time_search(index, queries, k, params), curve)

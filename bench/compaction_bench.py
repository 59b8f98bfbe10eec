"""HNSW compaction beside live searches: how long searches wait while a graph with deleted vectors
is rebuilt.

    python bench/compaction_bench.py [--views 2] [--remove 0.21] [--seconds-idle 5]

Vectors: the demo encoder's embeddings of all 70k Fashion-MNIST images, `--views` of them (view 0 the
images, then augmented views; computed and cached as `bench/index_bench.py --real` does), in an HNSW
graph with the parameters `index.choose` picks for that size. `--remove` of the ids are removed
(past the 20% rebuild fraction), then the graph is compacted twice from the same state while one
thread searches single queries back to back:

- `under the lock`: the rebuild holds the index's write lock throughout, as every compaction did
  before `SearchIndex.compact` built off the lock (still the path for re-adding a deleted id);
- `off the lock`: `SearchIndex.compact`, which builds the new graph beside the searches and takes
  the write lock only to catch up and swap.

Prints the compaction's wall time, the searches served meanwhile, and their p50 / p99 / max latency
against an idle baseline.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import index  # noqa: E402,F401  (its __init__ sets OMP_WAIT_POLICY before FAISS's OpenMP starts)

# isort: split
import faiss  # noqa: E402

from bench.index_bench import fashion_mnist_embeddings  # noqa: E402
from index.choose import choose_index  # noqa: E402
from index.factory import build_index  # noqa: E402
from index.search_index import SearchIndex  # noqa: E402
from index.synthetic import random_ids  # noqa: E402

K = 10


def search_while(
    graph: SearchIndex, queries: np.ndarray, busy: threading.Event | None, seconds: float
) -> list[float]:
    """Single-query search latencies (ms), until `busy` clears (or for `seconds` when idle)."""
    latencies, position = [], 0
    deadline = time.perf_counter() + seconds
    while busy.is_set() if busy is not None else time.perf_counter() < deadline:
        query = queries[position % len(queries) : position % len(queries) + 1]
        started = time.perf_counter()
        graph.search(query, K)
        latencies.append((time.perf_counter() - started) * 1000)
        position += 1
    return latencies


def compact_beside_searches(graph: SearchIndex, queries: np.ndarray, mode: str) -> dict:
    busy, timing = threading.Event(), {}

    def compact() -> None:
        started = time.perf_counter()
        if mode == "under the lock":  # the behaviour before the off-lock build (bench-only access)
            with graph._lock.write():
                graph._compact_locked()
        else:
            graph.compact()
        timing["seconds"] = time.perf_counter() - started
        busy.clear()

    busy.set()
    worker = threading.Thread(target=compact)
    worker.start()
    latencies = search_while(graph, queries, busy, 0)
    worker.join()
    return {"mode": mode, "compaction_s": timing["seconds"], **summarise(latencies)}


def summarise(latencies: list[float]) -> dict:
    values = np.asarray(latencies or [float("nan")])
    return {
        "searches": len(latencies),
        "p50_ms": float(np.percentile(values, 50)),
        "p99_ms": float(np.percentile(values, 99)),
        "max_ms": float(values.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--views", type=int, default=2, help="70k-image views in the graph (2: 140k vectors)")
    parser.add_argument("--remove", type=float, default=0.21, help="fraction of ids removed (0.21)")
    parser.add_argument("--seconds-idle", type=float, default=5.0, help="idle baseline length (5 s)")
    parser.add_argument("--cache", default="/tmp/ssl-retrieval-bench", help="embedding cache directory")
    args = parser.parse_args()

    _, vectors = fashion_mnist_embeddings(Path(args.cache), args.views - 1)
    num_vectors, dim = vectors.shape
    ids = random_ids(num_vectors)
    index_type, params = choose_index(num_vectors, dim, 64 * 2**30, "hnsw")
    print(
        f"HNSW {params} over {num_vectors} x {dim} real embeddings; "
        f"FAISS threads {faiss.omp_get_max_threads()}"
    )
    started = time.perf_counter()
    graph = build_index(vectors, ids, index_type, params, progress=True)
    print(f"built in {time.perf_counter() - started:.1f} s")
    removed = ids[np.random.default_rng(0).permutation(num_vectors)[: int(args.remove * num_vectors)]]
    graph.remove(removed, compact=False)
    queries = vectors[np.random.default_rng(1).choice(num_vectors, 2000, replace=False)]
    state = faiss.serialize_index(graph.faiss_index)  # both modes start from this graph

    rows = [
        {
            "mode": "idle",
            "compaction_s": float("nan"),
            **summarise(search_while(graph, queries, None, args.seconds_idle)),
        }
    ]
    for mode in ("under the lock", "off the lock"):
        copy = SearchIndex(faiss.deserialize_index(state), "hnsw", params=params, deleted_ids=removed)
        rows.append(compact_beside_searches(copy, queries, mode))
        print(rows[-1], flush=True)

    print(
        f"\n{num_vectors} x {dim}, {len(removed)} removed ({args.remove:.0%}), "
        "single-query searches in one thread"
    )
    print("| compaction | wall time | searches served meanwhile | p50 | p99 | max |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        wall = "" if np.isnan(row["compaction_s"]) else f"{row['compaction_s']:.1f} s"
        print(
            f"| {row['mode']} | {wall} | {row['searches']} | {row['p50_ms']:.2f} ms | "
            f"{row['p99_ms']:.2f} ms | {row['max_ms']:.1f} ms |"
        )
    idle, locked, free = rows
    print(
        f"longest wait: {locked['max_ms'] / idle['max_ms']:.0f}x idle under the lock, "
        f"{free['max_ms'] / idle['max_ms']:.1f}x off it"
    )


if __name__ == "__main__":
    main()

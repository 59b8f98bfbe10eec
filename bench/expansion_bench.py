"""What alpha query expansion costs a search: one query at a time (as `POST /search` sends them),
one FAISS thread, k = 10, `SearchIndex.search` with `expand` 0 and N, per index type.

    python bench/expansion_bench.py                      # 100k x 128 clustered vectors, every type
    python bench/expansion_bench.py --n 10000 --dim 512 --types flat   # the demo catalogue's shape

Prints the median and p95 latency of each and the ratio, and for IVF types the memory of the
id -> list hash map (heap bytes per vector when `SearchIndex.vectors` first builds it). Quality is
measured elsewhere (`bench/demo_precision.py --expand N`, RESULTS "Query expansion in the service").
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import index  # noqa: E402,F401  (its __init__ sets OMP_WAIT_POLICY before FAISS's OpenMP starts)

# isort: split
import faiss  # noqa: E402

from index.choose import choose_index  # noqa: E402
from index.factory import build_index  # noqa: E402
from index.synthetic import clustered_vectors, random_ids  # noqa: E402
from index.tune import exact_neighbours, sample_queries, tune_search  # noqa: E402


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost",
    )]  # fmt: skip


def heap_bytes() -> int:
    """Bytes the C heap has handed out and not freed (glibc's mallinfo2): unlike the resident size,
    it counts an allocation that reuses freed memory."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def latencies_ms(
    search_index: index.search_index.SearchIndex, queries: np.ndarray, expand: int
) -> np.ndarray:
    search_index.search(queries[:20], 10, expand=expand)  # warm caches and the IVF direct map
    times = []
    for query in queries:
        started = time.perf_counter()
        search_index.search(query[None, :], 10, expand=expand)
        times.append((time.perf_counter() - started) * 1000.0)
    return np.array(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--types", default="flat,ivf,hnsw,ivfpq")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--expand", type=int, default=5)
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(1)
    vectors, _ = clustered_vectors(args.n, args.dim, num_clusters=max(args.n // 100, 10), seed=0)
    ids = random_ids(args.n, seed=0)
    rows = sample_queries(args.n, args.queries, seed=1)
    queries = vectors[rows] + 0.05 * np.random.default_rng(2).standard_normal((rows.size, args.dim)).astype(
        np.float32
    )  # near catalogue images, not copies of them
    truth = exact_neighbours(vectors, ids, queries, 10)
    print(f"{args.n} x {args.dim}, {rows.size} single queries, k=10, expand {args.expand}, one thread")
    print("| type | search params | plain p50 / p95 ms | expanded p50 / p95 ms | p50 ratio |")
    print("|---|---|---:|---:|---:|")
    for index_type in args.types.split(","):
        _, params = choose_index(args.n, args.dim, 16 * 2**30, index_type=index_type)
        built = build_index(vectors, ids, index_type, params, progress=False)
        tuned = tune_search(built, queries, truth, progress=False)
        if tuned.knob is not None:
            built.params[tuned.knob] = tuned.value
        map_bytes = ""
        if index_type in ("ivf", "ivfpq"):  # the id -> list hash map that `vectors` adds
            before = heap_bytes()
            built.vectors(ids[:1])
            map_bytes = f" (direct map: {(heap_bytes() - before) / args.n:.0f} B/vector)"
        plain = latencies_ms(built, queries, 0)
        expanded = latencies_ms(built, queries, args.expand)
        p50, e50 = np.median(plain), np.median(expanded)
        print(
            f"| {index_type} | {built.default_search_params() or '-'} "
            f"| {p50:.3f} / {np.percentile(plain, 95):.3f} "
            f"| {e50:.3f} / {np.percentile(expanded, 95):.3f} | {e50 / p50:.2f}x |{map_bytes}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

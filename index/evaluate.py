"""Measure a published index version: recall@1/10/100 against exact search, queries/s on one
thread and on all threads, bytes per vector.

    python -m index.evaluate INDEX_DIR [--version V] [--embeddings E.npz] [--queries Q.npz]
        [--num-queries 1000]

Exact neighbours come from the embeddings the version was built from (manifest "source", or
--embeddings), restricted to the ids live in the index. Queries are --queries, or vectors sampled
from those embeddings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import faiss
import numpy as np

from index.cli import run_cli
from index.embeddings import load_embeddings
from index.search_index import SearchIndex
from index.store import INDEX_FILE, IndexStore
from index.tune import DEFAULT_NUM_QUERIES, exact_neighbours, recall_at_k, sample_queries, time_search
from index.vectors import VectorError, as_query_matrix, normalise_rows

RECALL_CUTS = (1, 10, 100)


def evaluate_index(
    index: SearchIndex, base_vectors: np.ndarray, base_ids: np.ndarray, queries: np.ndarray
) -> dict[str, float]:
    """Recall@1/10/100 (tuned search params) and queries/s (1 thread, all threads) of `index`."""
    depth = min(max(RECALL_CUTS), base_vectors.shape[0])
    truth = exact_neighbours(base_vectors, base_ids, queries, depth)
    found = index.search(queries, depth)[1]
    result = {f"recall@{cut}": recall_at_k(found, truth, min(cut, depth)) for cut in RECALL_CUTS}
    k = min(10, depth)
    result["qps_1_thread"] = 1.0 / time_search(index, queries, k, threads=1)
    result["qps_all_threads"] = 1.0 / time_search(index, queries, k, threads=faiss.omp_get_max_threads())
    return result


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m index.evaluate",
        description="Recall vs exact search, throughput and size of a published index version.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("index_dir", help="index directory")
    parser.add_argument("--version", help="version to measure (default: the current one)")
    parser.add_argument(
        "--embeddings", help="base embeddings for exact search (default: the manifest's source)"
    )
    parser.add_argument("--queries", help="query embeddings .npz (default: sampled from the base embeddings)")
    parser.add_argument("--num-queries", type=int, default=DEFAULT_NUM_QUERIES, help="queries to use at most")
    args = parser.parse_args(argv)
    if args.num_queries < 1:
        parser.error("--num-queries must be positive")
    store = IndexStore(args.index_dir)
    index = store.load(args.version)
    source = args.embeddings or index.manifest.get("source")
    if not source:
        raise VectorError("the manifest names no source embeddings; pass --embeddings")
    base = load_embeddings(source)
    if base.dim != index.dim:
        raise VectorError(f"embeddings have dimension {base.dim} but the index has {index.dim}")
    live = index.contains(base.ids)
    base_vectors, base_ids = normalise_rows(base.vectors[live].copy()), base.ids[live]
    missing = index.ntotal - int(live.sum())
    if base_ids.size == 0:
        raise VectorError(f"none of the ids in {source} are in the index")
    if args.queries:
        queries = as_query_matrix(
            load_embeddings(args.queries).vectors[: args.num_queries], index.dim, "queries"
        )
    else:
        queries = base_vectors[sample_queries(base_vectors.shape[0], args.num_queries)]
    result = evaluate_index(index, base_vectors, base_ids, queries)
    size = (store.version_dir(index.manifest["version"]) / INDEX_FILE).stat().st_size
    rows = [
        ("version", str(index.manifest["version"])),
        ("type", f"{index.index_type} {index.params}"),
        (
            "vectors",
            f"{index.ntotal} x {index.dim}" + (f" ({missing} not in {Path(source).name})" if missing else ""),
        ),
        ("queries", str(queries.shape[0])),
        *[(f"recall@{cut}", f"{result[f'recall@{cut}']:.4f}") for cut in RECALL_CUTS],
        ("queries/s, 1 thread", f"{result['qps_1_thread']:.0f}"),
        (f"queries/s, {faiss.omp_get_max_threads()} threads", f"{result['qps_all_threads']:.0f}"),
        ("bytes/vector (file)", f"{size / max(1, index.ntotal + index.deleted_count):.1f}"),
    ]
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

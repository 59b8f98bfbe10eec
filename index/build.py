"""Build, tune and publish an index from an embeddings file.

    python -m index.build --embeddings E.npz --out INDEX_DIR [--type auto|flat|ivf|hnsw|ivfpq]
        [--max-memory 4G] [--target-recall 0.95 --k 10] [--encoder PATH] [--no-publish]

`auto` picks the type from N, D and the memory budget (see index/choose.py); the search knob
(nprobe / efSearch) is then tuned to the smallest value reaching the target recall@k against exact
search on held-out queries sampled from the data, and the measured recall and latency go into the
manifest of the published version.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from index.choose import DEFAULT_MAX_MEMORY, choose_index, estimated_bytes, parse_bytes
from index.cli import run_cli
from index.embeddings import Embeddings, load_embeddings
from index.encoder_file import encoder_version
from index.factory import build_index, use_gpu
from index.search_index import INDEX_TYPES, SearchIndex
from index.store import IndexStore
from index.tune import (
    DEFAULT_K,
    DEFAULT_NUM_QUERIES,
    DEFAULT_TARGET_RECALL,
    exact_neighbours,
    sample_queries,
    single_query_latency,
    tune_search,
)
from index.vectors import VectorError, as_id_array, as_query_matrix


def build_tuned_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    class_names: list[str] | None = None,
    index_type: str = "auto",
    max_memory_bytes: int = parse_bytes(DEFAULT_MAX_MEMORY),
    target_recall: float = DEFAULT_TARGET_RECALL,
    k: int = DEFAULT_K,
    num_queries: int = DEFAULT_NUM_QUERIES,
    seed: int = 0,
    progress: bool = True,
) -> SearchIndex:
    """Choose, build and tune an index over float32 NxD vectors (re-normalised here; NaN/inf and
    duplicate ids rejected with VectorError); the tuned knob goes into `index.params` and the
    measurements into `index.manifest`."""
    if np.ndim(vectors) != 2 or len(vectors) == 0:
        raise VectorError(f"expected a non-empty NxD matrix, got shape {np.shape(vectors)}")
    num_vectors, dim = vectors.shape
    vectors = as_query_matrix(vectors, dim, "vectors")  # a normalised float32 copy
    ids = as_id_array(ids, num_vectors)
    chosen, params = choose_index(num_vectors, dim, max_memory_bytes, index_type)
    query_rows = sample_queries(num_vectors, num_queries, seed)
    started = time.perf_counter()
    index = build_index(
        vectors,
        ids,
        chosen,
        params,
        labels=labels,
        class_names=class_names,
        train_exclude=query_rows,
        seed=seed,
        progress=progress,
    )
    build_seconds = time.perf_counter() - started
    queries = vectors[query_rows]
    truth = exact_neighbours(vectors, ids, queries, k)
    tuned = tune_search(index, queries, truth, k, target_recall, progress)
    if tuned.knob is not None:
        index.params[tuned.knob] = tuned.value
    index.manifest.update(
        {
            "build_seconds": round(build_seconds, 3),
            "recall": {
                "k": k,
                "target": target_recall,
                "measured": round(tuned.recall, 4),
                "reached": tuned.reached,
                "queries": int(queries.shape[0]),
                "curve": tuned.curve,
            },
            "latency_ms": {
                "batched_per_query": round(1000 * tuned.seconds_per_query, 4),
                "single_query_median": round(1000 * single_query_latency(index, queries, k), 4),
            },
            "bytes_per_vector": round(
                estimated_bytes(chosen, num_vectors, dim, index.params) / num_vectors, 1
            ),
            "max_memory_bytes": max_memory_bytes,
            "gpu_build": use_gpu(),
        }
    )
    return index


def check_encoder(encoder_path: str, model_version: str) -> None:
    """The encoder copied into a version must be the one that made its vectors."""
    version = encoder_version(encoder_path)
    if version != model_version:
        raise ValueError(
            f"encoder {encoder_path} has version {version!r} "
            f"but the embeddings were made by {model_version!r}"
        )


def summary(index: SearchIndex, version: str | None) -> str:
    manifest = index.manifest
    recall = manifest["recall"]
    latency = manifest["latency_ms"]
    lines = [
        f"type              {index.index_type}",
        f"params            {index.params}",
        f"vectors           {index.ntotal} x {index.dim}",
        f"recall@{recall['k']:<10} {recall['measured']:.4f} (target {recall['target']}"
        f"{'' if recall['reached'] else ', NOT reached'})",
        f"latency           {latency['single_query_median']:.3f} ms/query alone, "
        f"{latency['batched_per_query']:.4f} ms/query batched",
        f"bytes/vector      {manifest['bytes_per_vector']}",
        f"build time        {manifest['build_seconds']:.1f} s",
        f"version           {version if version else '(not published: --no-publish)'}",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m index.build",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--embeddings", required=True, help="embeddings .npz from `python -m training.embed`")
    parser.add_argument("--out", required=True, help="index directory (versions/ and CURRENT live here)")
    parser.add_argument("--type", default="auto", choices=("auto", *INDEX_TYPES), help="index type")
    parser.add_argument("--max-memory", default=DEFAULT_MAX_MEMORY, help="memory budget for the index (auto)")
    parser.add_argument(
        "--target-recall", type=float, default=DEFAULT_TARGET_RECALL, help="recall@k to reach"
    )
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="k of the recall@k target")
    parser.add_argument("--queries", type=int, default=DEFAULT_NUM_QUERIES, help="held-out tuning queries")
    parser.add_argument("--encoder", help="encoder file to copy into the version (must match model_version)")
    parser.add_argument("--no-publish", action="store_true", help="build and report, publish nothing")
    parser.add_argument("--seed", type=int, default=0, help="seed for the training/query samples")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not 0 < args.target_recall <= 1:
        parser.error("--target-recall must be in (0, 1]")
    if args.k < 1 or args.queries < 1:
        parser.error("--k and --queries must be positive")
    try:
        args.max_memory_bytes = parse_bytes(args.max_memory)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    embeddings: Embeddings = load_embeddings(args.embeddings)
    if args.encoder:
        check_encoder(args.encoder, embeddings.model_version)
    index = build_tuned_index(
        embeddings.vectors,
        embeddings.ids,
        labels=embeddings.labels,
        class_names=embeddings.class_names,
        index_type=args.type,
        max_memory_bytes=args.max_memory_bytes,
        target_recall=args.target_recall,
        k=args.k,
        num_queries=args.queries,
        seed=args.seed,
        progress=not args.quiet,
    )
    index.manifest.update({"model_version": embeddings.model_version, "source": str(args.embeddings)})
    version = None
    if not args.no_publish:
        version = IndexStore(args.out).publish(index, encoder_path=args.encoder)
    print(summary(index, version))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

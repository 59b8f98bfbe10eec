"""Weighted kNN classifier of Wu et al. 2018 (InstDisc) over a SearchIndex.

Each query's top-k neighbours (k = 200) vote for their class with weight exp(s_i / tau)
(tau = 0.07, s_i = cosine similarity); class scores are normalised to probabilities
(`index.vote.weighted_vote`, shared with the training monitor). Neighbours without a label are
ignored.

    python -m index.knn --eval --index INDEX_DIR --queries E.npz [--k 200] [--tau 0.07]
prints top-1 / top-5 accuracy of the labelled query embeddings against the current version.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from tqdm import tqdm

from index.cli import run_cli
from index.embeddings import load_embeddings
from index.search_index import PADDING_ID, SearchIndex
from index.store import IndexStore
from index.vectors import VectorError
from index.vote import DEFAULT_K, DEFAULT_TAU, weighted_vote

BATCH = 1024


class KNNClassifier:
    """`KNNClassifier(search_index)` or `KNNClassifier.from_vectors(vectors, labels)`."""

    def __init__(
        self,
        search_index: SearchIndex,
        *,
        k: int = DEFAULT_K,
        tau: float = DEFAULT_TAU,
        num_classes: int | None = None,
        progress: bool = False,
    ) -> None:
        if not search_index.has_labels:
            raise VectorError("the index has no labels: the kNN classifier needs labelled neighbours")
        if k < 1 or tau <= 0:
            raise ValueError(f"k must be >= 1 and tau > 0 (got k={k}, tau={tau})")
        self.index = search_index
        self.k = k
        self.tau = tau
        if num_classes is None:
            names = search_index.class_names
            num_classes = len(names) if names else int(search_index.label_arrays()[1].max()) + 1
        self.num_classes = num_classes
        self.progress = progress

    @classmethod
    def from_vectors(cls, vectors: np.ndarray, labels: np.ndarray, **kwargs: object) -> KNNClassifier:
        """An exact classifier over float32 NxD vectors with int64 N labels (-1 = unlabelled)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        labels = np.asarray(labels, dtype=np.int64)
        index = SearchIndex.empty_flat(vectors.shape[1])
        index.add(vectors, np.arange(vectors.shape[0], dtype=np.int64), labels)
        return cls(index, **kwargs)  # type: ignore[arg-type]

    def predict(self, queries: np.ndarray) -> np.ndarray:
        """float32 QxD queries -> float32 QxC class probabilities (all zero where no neighbour is
        labelled)."""
        queries = np.atleast_2d(queries)
        out = np.zeros((queries.shape[0], self.num_classes), dtype=np.float32)
        batches = range(0, queries.shape[0], BATCH)
        for start in tqdm(batches, desc="kNN", unit="batch", disable=not self.progress):
            scores, ids = self.index.search(queries[start : start + BATCH], self.k)  # BxK
            labels = self.index.labels_for(ids)
            labels[labels >= self.num_classes] = -1  # a label beyond the class list cannot vote
            scores[ids == PADDING_ID] = 0.0  # padding is unlabelled (ignored); avoids -inf arithmetic
            probs = weighted_vote(
                torch.from_numpy(scores), torch.from_numpy(labels), self.num_classes, self.tau
            )
            out[start : start + BATCH] = probs.numpy()
        return out

    def evaluate(self, queries: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Top-1 and top-5 accuracy (fractions) of `predict` against int64 Q labels."""
        labels = np.asarray(labels, dtype=np.int64)
        probs = self.predict(queries)
        if probs.shape[0] != labels.shape[0]:
            raise VectorError(f"{probs.shape[0]} queries but {labels.shape[0]} labels")
        # Stable order on -probs: ties go to the lower class index, as argmax would.
        ranked = np.argsort(-probs, axis=1, kind="stable")
        top1 = float(np.mean(ranked[:, 0] == labels))
        top5 = float(np.mean((ranked[:, : min(5, self.num_classes)] == labels[:, None]).any(axis=1)))
        return {"top1": top1, "top5": top5, "queries": int(labels.shape[0])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m index.knn",
        description="Weighted kNN classification (Wu et al. 2018) of labelled query embeddings.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--eval", action="store_true", required=True, help="evaluate top-1/top-5 accuracy")
    parser.add_argument("--index", required=True, help="index directory")
    parser.add_argument("--version", help="index version (omit for the current one)")
    parser.add_argument("--queries", required=True, help="labelled embeddings .npz (e.g. the test split)")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="neighbours that vote (paper: 200)")
    parser.add_argument(
        "--tau", type=float, default=DEFAULT_TAU, help="temperature of exp(s/tau) (paper: 0.07)"
    )
    args = parser.parse_args(argv)
    if args.k < 1 or args.tau <= 0:
        parser.error("--k must be >= 1 and --tau > 0")
    queries = load_embeddings(args.queries)
    if queries.labels is None or (queries.labels < 0).all():
        raise VectorError(f"{args.queries} has no labels to evaluate against")
    index = IndexStore(args.index).load(args.version)
    if queries.dim != index.dim:
        raise VectorError(f"queries have dimension {queries.dim} but the index has {index.dim}")
    if index.manifest.get("model_version") not in (None, queries.model_version):
        print(
            f"warning: queries from model {queries.model_version}, "
            f"index from {index.manifest['model_version']}",
            file=sys.stderr,
        )
    labelled = queries.labels >= 0
    classifier = KNNClassifier(index, k=args.k, tau=args.tau, progress=True)
    result = classifier.evaluate(queries.vectors[labelled], queries.labels[labelled])
    print(
        f"kNN (k={args.k}, tau={args.tau}) on {result['queries']} queries, "
        f"index {index.manifest.get('version')}"
    )
    print(f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

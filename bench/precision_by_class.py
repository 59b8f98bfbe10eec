"""The demo's precision@10 class by class, and each class's most frequent wrong neighbour.

Same protocol as bench/demo_precision.py (the Fashion-MNIST test split as the catalogue, seeded
training images as queries, cosine top 10), on any encoder file:

    python bench/precision_by_class.py --encoder service/assets/demo-encoder.pt --queries 1000
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from training.data.datasets import load_dataset
from training.encoder import Encoder

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="service/assets/demo-encoder.pt")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    catalogue = load_dataset("fashion-mnist:test", 28)
    queries = load_dataset("fashion-mnist", 28).subset(args.queries, seed=args.seed)
    encoder = Encoder.load(args.encoder)
    scores = (
        torch.from_numpy(encoder.embed(queries.images)) @ torch.from_numpy(encoder.embed(catalogue.images)).T
    )
    found = catalogue.labels[scores.topk(args.k, dim=1).indices]  # QxK labels of the results
    same = (found == queries.labels.unsqueeze(1)).float()  # QxK
    print(f"precision@{args.k} over {args.queries} queries: {same.mean().item():.4f}")
    print(f"| class | queries | precision@{args.k} | most frequent wrong neighbour (share of results) |")
    print("|---|---:|---:|---|")
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        rows = queries.labels == c
        counts = np.bincount(found[rows].flatten().numpy(), minlength=len(FASHION_MNIST_CLASSES))
        counts[c] = 0
        worst = int(counts.argmax())
        share = counts[worst] / max(1, int(rows.sum()) * args.k)
        precision = same[rows].mean().item()
        print(
            f"| {name} | {int(rows.sum())} | {precision:.3f} | {FASHION_MNIST_CLASSES[worst]} ({share:.2f}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

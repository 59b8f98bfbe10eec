"""`make run`'s demo, measured: precision@10 of image search over the demo catalogue.

The demo catalogue is the Fashion-MNIST test split (10k labelled images, `service.demo`). Queries
are 50 seeded images from the training split, so no query is in the catalogue (a catalogue image
would find itself first); precision@10 is the share of the top 10 results (cosine, exact, as the
service's flat index) with the query's class. `--pixels` gives the raw-pixel reference.
`--catalogue train` swaps the splits' roles to those of kNN evaluation: a seeded part of the
training split (`--catalogue-size`) is searched by seeded test images.

    python bench/demo_precision.py --encoder service/assets/demo-encoder.pt
    python bench/demo_precision.py --pixels
    python bench/demo_precision.py --encoder service/assets/demo-encoder.pt --queries 1000 --by-class
    python bench/demo_precision.py --encoder service/assets/demo-encoder.pt --catalogue train \
        --catalogue-size 60000 --queries 10000
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F

from training.data.datasets import FASHION_MNIST_CLASSES, load_dataset
from training.encoder import Encoder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--encoder", help="encoder file (e.g. service/assets/demo-encoder.pt)")
    source.add_argument("--pixels", action="store_true", help="raw pixels as the embedding")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--by-class",
        action="store_true",
        help="also a table: precision per query class and its most frequent wrong neighbour",
    )
    parser.add_argument(
        "--catalogue",
        choices=["demo", "train"],
        default="demo",
        help="demo: the test split, searched by training images (what `make run` serves); "
        "train: part of the training split, searched by test images (kNN evaluation's roles)",
    )
    parser.add_argument(
        "--catalogue-size",
        type=int,
        default=60_000,
        help="training images in the catalogue (--catalogue train)",
    )
    args = parser.parse_args(argv)
    searched, searching = ("fashion-mnist:test", "fashion-mnist")
    if args.catalogue == "train":
        searched, searching = searching, searched
    catalogue = load_dataset(searched, 28)
    if args.catalogue == "train":
        catalogue = catalogue.subset(args.catalogue_size, seed=args.seed)
    queries = load_dataset(searching, 28).subset(args.queries, seed=args.seed)
    if args.pixels:

        def embed(images: torch.Tensor) -> torch.Tensor:
            return F.normalize(images.flatten(1).float(), dim=1)
    else:
        encoder = Encoder.load(args.encoder)

        def embed(images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(encoder.embed(images))

    scores = embed(queries.images) @ embed(catalogue.images).T  # QxN cosine
    top = scores.topk(args.k, dim=1).indices  # QxK
    same = catalogue.labels[top] == queries.labels.unsqueeze(1)
    result = {
        "embedding": "pixels" if args.pixels else args.encoder,
        "catalogue": f"{catalogue.name} ({len(catalogue)})",
        "queries": f"{queries.name} ({len(queries)})",
        f"precision@{args.k}": round(same.float().mean().item(), 4),
    }
    print(json.dumps(result))
    if args.by_class:
        print_by_class(catalogue.labels[top], queries.labels, args.k)
    return 0


def print_by_class(found: torch.Tensor, labels: torch.Tensor, k: int) -> None:
    """found: QxK labels of each query's results; labels: Q."""
    same = (found == labels.unsqueeze(1)).float()  # QxK
    print(f"| class | queries | precision@{k} | most frequent wrong neighbour (share of results) |")
    print("|---|---:|---:|---|")
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        rows = labels == c
        counts = np.bincount(found[rows].flatten().numpy(), minlength=len(FASHION_MNIST_CLASSES))
        counts[c] = 0
        worst = int(counts.argmax())
        share = counts[worst] / max(1, int(rows.sum()) * k)
        precision = same[rows].mean().item()
        print(
            f"| {name} | {int(rows.sum())} | {precision:.3f} | {FASHION_MNIST_CLASSES[worst]} ({share:.2f}) |"
        )


if __name__ == "__main__":
    sys.exit(main())

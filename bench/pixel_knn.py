"""Raw-pixel baseline under the project's kNN protocol: the images themselves, flattened and
L2-normalised, as the embedding (weighted kNN, k=200, tau=0.07, cosine). A learned embedding is
only worth serving if it beats this.

    python bench/pixel_knn.py --data fashion-mnist:test                      # memory: the 60k training split
    python bench/pixel_knn.py --data folder:/tmp/glyphs/test --train-data folder:/tmp/glyphs/train
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from training.data.datasets import load_dataset
from training.knn_monitor import knn_accuracy


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """uint8 NxCxHxW -> NxD: pixels in [0, 1], L2-normalised (cosine between images)."""
    flat = images.flatten(1).float() / 255.0
    return torch.nn.functional.normalize(flat, dim=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="query set: fashion-mnist:test | folder:PATH")
    parser.add_argument("--train-data", help="memory set (default: fashion-mnist for fashion-mnist queries)")
    parser.add_argument("--size", type=int, default=28, help="side the images are resized to (default: 28)")
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--tau", type=float, default=0.07)
    args = parser.parse_args(argv)
    train_data = args.train_data or ("fashion-mnist" if args.data.startswith("fashion-mnist") else None)
    if train_data is None:
        parser.error("--train-data is required for a folder query set")
    queries = load_dataset(args.data, args.size)
    memory = load_dataset(train_data, args.size, in_channels=queries.in_channels)
    top1, top5 = knn_accuracy(
        pixel_features(memory.images),
        memory.labels,
        pixel_features(queries.images),
        queries.labels,
        memory.num_classes,
        args.k,
        args.tau,
    )
    print(json.dumps({"memory": train_data, "queries": args.data, "knn/top1": top1, "knn/top5": top5}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

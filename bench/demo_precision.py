"""`make run`'s demo, measured: precision@10 of image search over the demo catalogue.

The demo catalogue is the Fashion-MNIST test split (10k labelled images, `service.demo`). Queries
are 50 seeded images from the training split, so no query is in the catalogue (a catalogue image
would find itself first); precision@10 is the share of the top 10 results with the query's class.
The results come from the service's own search: a flat `SearchIndex` (exact cosine), ranked with
alpha query expansion over the top `--expand` results as `POST /search` ranks them (default: the
service's `SEARCH_EXPAND`; `--expand 0` for plain nearest neighbours). `--pixels`
gives the raw-pixel reference.
`--catalogue train` swaps the splits' roles to those of kNN evaluation: a seeded part of the
training split (`--catalogue-size`) is searched by seeded test images.

    python bench/demo_precision.py --encoder service/assets/demo-encoder.pt
    python bench/demo_precision.py --pixels
    python bench/demo_precision.py --encoder service/assets/demo-encoder.pt --queries 1000 --by-class
    python bench/demo_precision.py --encoder service/assets/demo-encoder.pt --queries 1000 --expand 0
    python bench/demo_precision.py --encoder E --sets folder:/tmp/glyphs/test folder:/tmp/glyphs/train \
        --queries 1000
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

from index.search_index import SearchIndex
from service.settings import Settings
from training.data.datasets import FASHION_MNIST_CLASSES, load_dataset
from training.encoder import Encoder, read_encoder_record

DEFAULT_EXPAND = Settings.model_fields["SEARCH_EXPAND"].default


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--encoder", help="encoder file (e.g. service/assets/demo-encoder.pt)")
    source.add_argument("--pixels", action="store_true", help="raw pixels as the embedding")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--expand",
        type=int,
        default=DEFAULT_EXPAND,
        help=f"alpha query expansion over the top N results, as POST /search ranks (default: the "
        f"service's SEARCH_EXPAND, {DEFAULT_EXPAND}); 0: plain nearest neighbours",
    )
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
    parser.add_argument(
        "--sets",
        nargs=2,
        metavar=("CATALOGUE", "QUERIES"),
        help="another labelled pair instead of Fashion-MNIST's, e.g. folder:/tmp/glyphs/test "
        "folder:/tmp/glyphs/train (the same protocol: seeded queries search the whole catalogue)",
    )
    args = parser.parse_args(argv)
    searched, searching = ("fashion-mnist:test", "fashion-mnist")
    if args.catalogue == "train":
        searched, searching = searching, searched
    size, channels = 28, 1
    if args.encoder:
        record = read_encoder_record(args.encoder)
        size, channels = record["input_size"], record["in_channels"]
    if args.sets:
        searched, searching = args.sets
    catalogue = load_dataset(searched, size, in_channels=channels)
    if args.catalogue == "train":
        catalogue = catalogue.subset(args.catalogue_size, seed=args.seed)
    queries = load_dataset(searching, size, in_channels=channels).subset(args.queries, seed=args.seed)
    if args.pixels:

        def embed(images: torch.Tensor) -> torch.Tensor:
            return F.normalize(images.flatten(1).float(), dim=1)
    else:
        encoder = Encoder.load(args.encoder)

        def embed(images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(encoder.embed(images))

    catalogue_vectors = embed(catalogue.images).numpy()  # NxD
    index = SearchIndex.empty_flat(catalogue_vectors.shape[1])
    index.add(catalogue_vectors, np.arange(len(catalogue), dtype=np.int64))  # id = catalogue row
    _, rows = index.search(embed(queries.images).numpy(), args.k, expand=args.expand)  # QxK
    top = torch.from_numpy(rows)
    same = catalogue.labels[top] == queries.labels.unsqueeze(1)
    result = {
        "embedding": "pixels" if args.pixels else args.encoder,
        "catalogue": f"{catalogue.name} ({len(catalogue)})",
        "queries": f"{queries.name} ({len(queries)})",
        "expand": args.expand,
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

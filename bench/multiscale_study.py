"""Multi-scale test-time descriptors: does embedding at several sides beat the one side served?

For each side the encoder's network (before its whitening) embeds the catalogue, the queries and a
seeded fit sample resized to that side. A group of sides averages its L2-normalised features per
image (Radenovic et al.'s multi-scale descriptor), renormalises, and PCA-whitens them (power 0.5,
fitted on the fit sample, no labels). Precision@10 is scored as `bench/demo_precision.py` scores it:
seeded queries from QUERIES search the whole CATALOGUE through the service's flat `SearchIndex`,
plain and with alpha query expansion over the top 5.

    python bench/multiscale_study.py service/assets/demo-encoder.pt
    python bench/multiscale_study.py E --sets folder:/tmp/glyphs/test folder:/tmp/glyphs/train
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F

from index.search_index import SearchIndex
from training.data.datasets import ImageDataset, load_dataset
from training.data.images import resize_center_crop
from training.encoder import embedding_features, read_encoder_record, unwhitened_network
from training.models.whitening import Whitening

SIDE_GROUPS = ("28", "42", "56", "70", "42,56", "28,56", "56,70", "42,56,70")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("encoder", help="encoder file")
    parser.add_argument("--sets", nargs=2, metavar=("CATALOGUE", "QUERIES"))
    parser.add_argument("--sides", nargs="+", default=list(SIDE_GROUPS), help="groups, e.g. 56 42,56")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--fit", type=int, default=4096, help="images the whitening is fitted on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    groups = [tuple(int(side) for side in group.split(",")) for group in args.sides]
    record = read_encoder_record(args.encoder)
    network = unwhitened_network(record)
    searched, searching = args.sets or ("fashion-mnist:test", "fashion-mnist")
    native = record.get("train_size", record["input_size"])
    catalogue = load_dataset(searched, native, in_channels=record["in_channels"])
    memory = load_dataset(searching, native, in_channels=record["in_channels"])
    queries = memory.subset(args.queries, seed=args.seed)  # demo_precision's queries
    fit = memory.subset(args.fit, seed=args.seed + 1)
    sets = (catalogue, queries, fit)

    features: dict[int, list[torch.Tensor]] = {}
    for side in sorted({side for group in groups for side in group}):
        features[side] = [
            embedding_features(
                network,
                resize_center_crop(data.images, side),
                record["mean"],
                record["std"],
                torch.device("cpu"),
            )
            for data in sets
        ]
    for group in groups:
        plain, expanded = precision(catalogue, queries, [features[side] for side in group])
        row = {"encoder": args.encoder, "catalogue": catalogue.name, "sides": list(group)}
        print(json.dumps(row | {"precision@10": plain, "expanded@10": expanded}), flush=True)
    return 0


def precision(catalogue: ImageDataset, queries: ImageDataset, per_side: list[list[torch.Tensor]]):
    """(plain, expanded over the top 5) precision@10 of the sides' averaged, whitened features."""
    averaged = [F.normalize(sum(side[i] for side in per_side), dim=1) for i in range(3)]  # NxD each
    whitening = Whitening.fitted(averaged[2], 0.5)
    items, asked = (F.normalize(whitening(x), dim=1).numpy() for x in averaged[:2])
    index = SearchIndex.empty_flat(items.shape[1])
    index.add(items, np.arange(len(items), dtype=np.int64))
    scores = []
    for expand in (0, 5):
        _, rows = index.search(asked, 10, expand=expand)  # Qx10 catalogue rows
        same = catalogue.labels[torch.from_numpy(rows)] == queries.labels.unsqueeze(1)
        scores.append(round(same.float().mean().item(), 4))
    return tuple(scores)


if __name__ == "__main__":
    sys.exit(main())

"""Which vector should be the retrieval embedding? Weighted kNN (k=200, tau=0.07) over several views
of one encoder's backbone, without retraining: the pooled last stage (what the project uses), the
last stage pooled to 2x2 or unpooled, layer3 pooled to 3x3, and layer2+3+4 pooled and concatenated.

    python bench/embedding_views.py ENCODER --data folder:/tmp/glyphs/test \
        --train-data folder:/tmp/glyphs/train
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from training.data.datasets import load_dataset
from training.encoder import Encoder
from training.knn_monitor import knn_accuracy

STAGES = ("layer2", "layer3", "layer4")
VIEWS = {
    "layer4 pooled (used)": lambda m: m["layer4"].mean((2, 3)),
    "layer4 2x2": lambda m: F.adaptive_avg_pool2d(m["layer4"], 2).flatten(1),
    "layer4 unpooled": lambda m: m["layer4"].flatten(1),
    "layer3 3x3": lambda m: F.adaptive_avg_pool2d(m["layer3"], 3).flatten(1),
    "layer2+3+4 pooled": lambda m: torch.cat([F.normalize(m[s].mean((2, 3)), dim=1) for s in STAGES], 1),
}


@torch.no_grad()
def views(encoder: Encoder, images: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
    network = encoder.network.eval()
    maps: dict[str, torch.Tensor] = {}
    for stage in STAGES:
        getattr(network.backbone, stage).register_forward_hook(
            lambda _m, _i, out, stage=stage: maps.__setitem__(stage, out.float())
        )
    mean = torch.tensor(encoder.record["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(encoder.record["std"]).view(1, -1, 1, 1)
    out: dict[str, list[torch.Tensor]] = {name: [] for name in VIEWS}
    for start in range(0, len(images), batch_size):
        network((images[start : start + batch_size].float() / 255 - mean) / std)  # fills `maps`
        for name, view in VIEWS.items():
            out[name].append(F.normalize(view(maps), dim=1))
    return {name: torch.cat(parts) for name, parts in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("encoder", help="encoder file (ResNet backbone)")
    parser.add_argument("--data", required=True, help="query set")
    parser.add_argument("--train-data", required=True, help="memory set")
    args = parser.parse_args(argv)
    encoder = Encoder.load(args.encoder)
    size, channels = encoder.input_size, encoder.in_channels
    queries = load_dataset(args.data, size, in_channels=channels)
    memory = load_dataset(args.train_data, size, in_channels=channels)
    query_views, memory_views = views(encoder, queries.images), views(encoder, memory.images)
    for name in VIEWS:
        top1, _ = knn_accuracy(
            memory_views[name],
            memory.labels,
            query_views[name],
            queries.labels,
            memory.num_classes,
            200,
            0.07,
        )
        print(f"{name:<22} {memory_views[name].shape[1]:>5}-d  kNN top-1 {top1:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())

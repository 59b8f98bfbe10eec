"""An untrained encoder file, for demos, benchmarks and tests before a real model is trained.

Random convolutional features already give a weighted kNN far above chance on Fashion-MNIST, so
the whole pipeline (ingest, search, classify) can be exercised end to end without training.

    python -m service.random_model data/model.pt [--width 0.25] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from training.encoder import make_encoder_record, save_encoder
from training.models import build_embedding_network

FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.286, 0.353


def random_encoder_spec(width: float = 0.25, in_channels: int = 1) -> dict:
    """ResNet-18 with a small (CIFAR-style) stem, no head."""
    return {
        "arch": "resnet18",
        "kwargs": {"in_channels": in_channels, "small_stem": True, "width": width},
        "head": None,
    }


def write_random_encoder(path: str | Path, width: float = 0.25, seed: int = 0, input_size: int = 28) -> Path:
    """A randomly initialised 1-channel encoder for input_size x input_size images, saved at `path`."""
    torch.manual_seed(seed)
    spec = random_encoder_spec(width)
    network = build_embedding_network(spec).eval()  # eval: the probe pass below must not touch BN stats
    with torch.no_grad():
        embed_dim = int(network(torch.zeros(1, 1, input_size, input_size)).shape[1])
    record = make_encoder_record(
        "random", spec, network, embed_dim, input_size, 1, [FASHION_MNIST_MEAN], [FASHION_MNIST_STD],
        metrics={"note": "untrained: random weights"},
    )  # fmt: skip
    save_encoder(path, record)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m service.random_model", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("path", type=Path, help="where to write the encoder file (e.g. data/model.pt)")
    parser.add_argument("--width", type=float, default=0.25, help="ResNet-18 width multiplier (default 0.25)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--input-size", type=int, default=28, help="image side in pixels (default 28)")
    args = parser.parse_args(argv)
    path = write_random_encoder(args.path, args.width, args.seed, args.input_size)
    print(f"wrote an untrained encoder to {path}")


if __name__ == "__main__":
    main()

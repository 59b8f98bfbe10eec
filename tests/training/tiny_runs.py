"""A real training run small enough for a unit test: 96 Fashion-MNIST images, batch 32, ResNet-18 at
width x0.0625, no kNN monitor, TensorBoard or progress bar (shared by the engine and whitening tests)."""

from __future__ import annotations

from pathlib import Path

import torch

from training.cli import build_trainer, parse_config
from training.engine import Trainer

# The unit tests' own networks: ResNet-18 at width x0.125 with the small stem, one channel.
SMALL_RESNET = {"in_channels": 1, "small_stem": True, "width": 0.125}
# A one-step run's network and quiet flags (the grid and scales tests' small-image runs).
TINY_NETWORK = [
    "--arch",
    "resnet18",
    "--width",
    "0.0625",
    "--knn-every",
    "0",
    "--no-tensorboard",
    "--no-progress",
]

TINY_RUN = ["--data", "fashion-mnist", "--subset", "96", "--batch-size", "32", "--epochs", "2"]
TINY_RUN += ["--arch", "resnet18", "--width", "0.0625", "--knn-every", "0"]
TINY_RUN += ["--no-tensorboard", "--no-progress"]


def tiny_trainer(method: str, out: Path, *extra: str) -> Trainer:
    """The trainer `python -m training.<method>` builds for a tiny run (later flags in `extra` win)."""
    config, _ = parse_config(method, [*TINY_RUN, *extra, "--out", str(out)])
    return build_trainer(config, torch.device("cpu"))


def trained_like(network: torch.nn.Module, side: int = 28) -> torch.nn.Module:
    """`network` in eval mode with non-trivial BatchNorm statistics (three batches of noise at
    `side` px), so that folding and pooling are checked on real numbers."""
    torch.manual_seed(0)
    network.train()
    with torch.no_grad():
        for _ in range(3):
            network(torch.randn(16, 1, side, side))
    return network.eval()

"""A real training run small enough for a unit test: 96 Fashion-MNIST images, batch 32, ResNet-18 at
width x0.0625, no kNN monitor, TensorBoard or progress bar (shared by the engine and whitening tests)."""

from __future__ import annotations

from pathlib import Path

import torch

from training.cli import build_trainer, parse_config
from training.engine import Trainer

TINY_RUN = ["--data", "fashion-mnist", "--subset", "96", "--batch-size", "32", "--epochs", "2"]
TINY_RUN += ["--arch", "resnet18", "--width", "0.0625", "--knn-every", "0"]
TINY_RUN += ["--no-tensorboard", "--no-progress"]


def tiny_trainer(method: str, out: Path, *extra: str) -> Trainer:
    """The trainer `python -m training.<method>` builds for a tiny run (later flags in `extra` win)."""
    config, _ = parse_config(method, [*TINY_RUN, *extra, "--out", str(out)])
    return build_trainer(config, torch.device("cpu"))

"""MoCo v1 / v2 / v3: `python -m training.moco --version 2 --data fashion-mnist --arch resnet18 ...`

`--version` picks the method and its paper's defaults (shown by `--version N --help`):
  1  He et al. 2019: linear head, tau 0.07; lr 0.03 per 256, x0.1 at epochs 120 and 160 of 200
  2  Chen et al. 2020: MLP head, tau 0.2, blur augmentation; cosine schedule
  3  Chen, Xie, He 2021: no queue, predictor, momentum schedule; LARS (ResNet) with warm-up
"""

from __future__ import annotations

import argparse
import sys

from service.refresh.mode import CATALOGUE_MODE  # the one upward edge: catalogue mode is on top
from training.cli import train_main
from training.commands import OneLineParser

VERSIONS = {1: "moco-v1", 2: "moco-v2", 3: "moco-v3"}  # each paper's recipe: its class in training/methods


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = OneLineParser(prog="python -m training.moco", add_help=False)
    pre.add_argument("--version", type=int, choices=sorted(VERSIONS), default=2)
    known, _ = pre.parse_known_args(argv)
    name = VERSIONS[known.version]
    return train_main(
        name,
        argv,
        prog=f"python -m training.moco --version {known.version}",
        description=__doc__,
        extra=lambda parser: add_version_argument(parser, known.version),
        mode=CATALOGUE_MODE,
    )


def add_version_argument(parser: argparse.ArgumentParser, version: int) -> None:
    parser.add_argument(
        "--version",
        type=int,
        choices=sorted(VERSIONS),
        default=version,
        help="MoCo version (sets the paper defaults)",
    )


if __name__ == "__main__":
    sys.exit(main())

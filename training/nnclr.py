"""NNCLR (Dwibedi et al. 2021): `python -m training.nnclr --data fashion-mnist --arch resnet18 ...`

SimCLR with each view's nearest neighbour in a support set of past projections as its positive.
"""

from __future__ import annotations

import sys

from service.refresh.mode import CATALOGUE_MODE  # the one upward edge: catalogue mode is on top
from training.cli import train_main


def main(argv: list[str] | None = None) -> int:
    return train_main(
        "nnclr", argv, prog="python -m training.nnclr", description=__doc__, mode=CATALOGUE_MODE
    )


if __name__ == "__main__":
    sys.exit(main())

"""SimCLR (Chen et al. 2020): `python -m training.simclr --data fashion-mnist --arch resnet18 ...`

The paper's schedule: LARS, lr 0.3 per 256, 10 warm-up epochs, then cosine decay (per step).
"""

from __future__ import annotations

import sys

from service.refresh.mode import CATALOGUE_MODE  # the one upward edge: catalogue mode is on top
from training.cli import train_main


def main(argv: list[str] | None = None) -> int:
    return train_main(
        "simclr", argv, prog="python -m training.simclr", description=__doc__, mode=CATALOGUE_MODE
    )


if __name__ == "__main__":
    sys.exit(main())

"""InstDisc (Wu et al. 2018): `python -m training.instdisc --data fashion-mnist --arch resnet18 ...`

The paper's schedule (lemniscate.pytorch): lr 0.03 per 256, x0.1 at epochs 120 and 160 of 200.
"""

from __future__ import annotations

import sys

from service.refresh.mode import CATALOGUE_MODE  # the one upward edge: catalogue mode is on top
from training.cli import train_main


def main(argv: list[str] | None = None) -> int:
    return train_main(
        "instdisc",
        argv,
        prog="python -m training.instdisc",
        description=__doc__,
        mode=CATALOGUE_MODE,
    )


if __name__ == "__main__":
    sys.exit(main())

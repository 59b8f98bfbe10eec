"""Mined-neighbour fine-tuning: `python -m training.neighbours --init runs/simclr/encoder.pt --data D`

Starts from a finished encoder, mines each training image's nearest neighbours in its retrieval
embedding, and fine-tunes with SimCLR's loss where an image's positive is a view of one of its
neighbours (training/methods/neighbours.py). Another round: --init the encoder this run saved.
"""

from __future__ import annotations

import sys

from training.cli import train_main


def main(argv: list[str] | None = None) -> int:
    return train_main("neighbours", argv, prog="python -m training.neighbours", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())

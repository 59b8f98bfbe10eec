"""Mined-neighbour fine-tuning: `python -m training.neighbours --init runs/simclr/encoder.pt --data D`

Starts from a finished encoder, mines each training image's nearest neighbours in its retrieval
embedding, and fine-tunes with SimCLR's loss where an image's positive is a view of one of its
neighbours (training/methods/neighbours.py). Another round: --init the encoder this run saved.

Without --data it refreshes the service's catalogue as the other training commands do:
`python -m training.neighbours` fine-tunes the encoder the service serves (--init defaults to
`current` there) on the catalogue's own neighbours, re-embeds, and publishes a new index version
(quality guard included).
"""

from __future__ import annotations

import sys

from service.refresh.mode import CATALOGUE_MODE  # the one upward edge: catalogue mode is on top
from training.cli import train_main


def main(argv: list[str] | None = None) -> int:
    return train_main(
        "neighbours", argv, prog="python -m training.neighbours", description=__doc__, mode=CATALOGUE_MODE
    )


if __name__ == "__main__":
    sys.exit(main())

"""Fit PCA whitening of an encoder's retrieval embedding on unlabelled images and write the whitened
encoder (training.models.whitening): e.g. for an encoder trained before `--whitening` existed.

    python -m training.whiten --checkpoint service/assets/demo-encoder.pt --data fashion-mnist \
        --out service/assets/demo-encoder.pt

The images' labels are never read. The new file has its own version (the whitening's values are part
of the weights) and is written atomically, so `--out` may be the source file itself.
"""

from __future__ import annotations

import argparse
import sys

from training.commands import HelpFormatter, OneLineParser, run_guarded
from training.data.datasets import load_dataset
from training.encoder import read_encoder_record, save_encoder, with_whitening
from training.models.whitening import DEFAULT_POWER
from training.precision import add_inference_amp_argument

SUBSET = 10_000  # a one-off fit: more images than the engine's fit at every save


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="python -m training.whiten",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="encoder.pt or checkpoint.pt from training")
    parser.add_argument("--data", required=True, help="images to fit on: fashion-mnist | folder:PATH | ...")
    parser.add_argument("--out", required=True, help="the whitened encoder file to write")
    parser.add_argument("--power", type=float, default=DEFAULT_POWER, help="eigenvalues^(-p/2); 1 is full")
    parser.add_argument("--subset", type=int, default=SUBSET, help="fit on a seeded random N images")
    add_inference_amp_argument(parser)
    args = parser.parse_args(argv)
    if not 0 < args.power <= 2:
        parser.error(f"--power must be in (0, 2], got {args.power}")
    if args.subset <= 1:
        parser.error("--subset must be at least 2")
    return args


def run(args: argparse.Namespace) -> int:
    record = read_encoder_record(args.checkpoint)
    data = load_dataset(args.data, record["input_size"], in_channels=record["in_channels"])
    if len(data) > args.subset:
        data = data.subset(args.subset)
    whitened = with_whitening(record, data.images, args.power, args.amp)
    save_encoder(args.out, whitened)
    print(
        f"{args.out}: {whitened['version']}, {whitened['embed_dim']}-d, whitening (power {args.power}) "
        f"fitted on {len(data)} images of {data.name} (was {record['version']})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_guarded(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

"""Fit PCA whitening of an encoder's retrieval embedding on unlabelled images and write the whitened
encoder (training.models.whitening): e.g. for an encoder trained before `--whitening` existed.

    python -m training.whiten --checkpoint service/assets/demo-encoder.pt --data fashion-mnist \
        --out service/assets/demo-encoder.pt

The images' labels are never read. The new file has its own version (the whitening's values are part
of the weights) and is written atomically, so `--out` may be the source file itself.

`--input-size N` makes the encoder embed images resized to N px instead of its training crop, and
fits the whitening there. Random resized crops show a network objects larger than whole images do,
so a larger embedding size matches what it learnt (FixRes, Touvron et al. 2019). On 28 px sets,
twice the crop gained on all three measured (bench/RESULTS.md, "Embedding at twice the training
crop"), for 4x the embedding's arithmetic:

    python -m training.whiten --checkpoint runs/simclr/encoder.pt --data folder:PATH --input-size 56 \
        --out runs/simclr/encoder-56.pt

`--scales 1 0.75` makes it a multi-scale descriptor (Radenovic et al. 2018): each image is also
embedded resized by 0.75 and the two unit features are summed before the whitening, which is
fitted on that sum (bench/RESULTS.md, "Two sizes at once").
"""

from __future__ import annotations

import argparse
import sys

from training.commands import HelpFormatter, OneLineParser, run_guarded
from training.data.datasets import load_dataset
from training.encoder import (
    at_input_size,
    read_encoder_record,
    save_encoder,
    training_size,
    with_embedding_scales,
    with_whitening,
)
from training.models import scales_problem
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
    parser.add_argument(
        "--input-size",
        type=int,
        help="embed images resized to this side instead (e.g. twice the training crop; the whitening is "
        "fitted there); default: the encoder's own input size",
    )
    parser.add_argument(
        "--scales",
        type=float,
        nargs="+",
        help="also embed each image resized by these factors and sum the unit features (1 first, e.g. "
        "1 0.75; 1 alone: one size); default: the encoder's own",
    )
    add_inference_amp_argument(parser)
    args = parser.parse_args(argv)
    if not 0 < args.power <= 2:
        parser.error(f"--power must be in (0, 2], got {args.power}")
    if args.subset <= 1:
        parser.error("--subset must be at least 2")
    if args.input_size is not None and not 8 <= args.input_size <= 1024:
        parser.error(f"--input-size must be from 8 to 1024 px, got {args.input_size}")
    if args.scales is not None and (problem := scales_problem(tuple(args.scales))):
        parser.error(f"--{problem}")
    return args


def run(args: argparse.Namespace) -> int:
    record = read_encoder_record(args.checkpoint)
    source_version = record["version"]
    if args.input_size is not None:
        record = at_input_size(record, args.input_size)
    if args.scales is not None:
        record = with_embedding_scales(record, args.scales)
    data = load_dataset(args.data, record["input_size"], in_channels=record["in_channels"])
    if len(data) > args.subset:
        data = data.subset(args.subset)
    whitened = with_whitening(record, data.images, args.power, args.amp)
    save_encoder(args.out, whitened)
    scales = whitened["network"].get("scales", [1.0])
    print(
        f"{args.out}: {whitened['version']}, {whitened['embed_dim']}-d, whitening (power {args.power}) "
        f"fitted on {len(data)} images of {data.name} at {record['input_size']} px"
        f"{f' x {scales}' if len(scales) > 1 else ''} (trained at {training_size(record)} px; was "
        f"{source_version})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_guarded(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

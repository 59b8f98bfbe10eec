"""Re-pool an existing encoder's retrieval embedding to a GxG grid (same weights; the version and
embed_dim follow), e.g. to serve an encoder trained before `--embedding-grid` existed:

    python bench/regrid_encoder.py service/assets/demo-encoder.pt /tmp/demo-grid2.pt --grid 2
"""

from __future__ import annotations

import argparse
import sys

from training.encoder import EncoderError, read_encoder_record, save_encoder, with_embedding_grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="encoder file (or training checkpoint)")
    parser.add_argument("out", help="where to write the re-pooled encoder file")
    parser.add_argument("--grid", type=int, default=2, help="G: the last stage pooled to GxG (1: global)")
    args = parser.parse_args(argv)
    try:
        record = with_embedding_grid(read_encoder_record(args.source), args.grid)
    except (EncoderError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    save_encoder(args.out, record)
    print(f"{args.out}: {record['version']}, {record['embed_dim']}-d")
    return 0


if __name__ == "__main__":
    sys.exit(main())

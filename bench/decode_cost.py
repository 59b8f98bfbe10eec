"""What decoding a query image costs, by size and format: the figures behind the service's inline
decode threshold (`service.queries.INLINE_DECODE_MAX_PIXELS`: queries at most that large are decoded
on the event loop, larger ones in the thread pool).

    python bench/decode_cost.py [--sizes 28 64 96 128 256 512] [--repeats 200]

Each image is a smooth gradient plus noise (it compresses like a photo, not like a flat test card),
decoded and prepared for a 28 px greyscale encoder exactly as a search does it; median ms.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.queries import INLINE_DECODE_MAX_PIXELS, decode_for_model  # noqa: E402


def median_ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 64, 96, 128, 256, 512])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"inline decode threshold: {INLINE_DECODE_MAX_PIXELS} pixels")
    print("| side, px | format | bytes | decode + model input, ms |")
    print("|---:|---|---:|---:|")
    for side in args.sizes:
        ramp = np.linspace(0, 255, side)
        pixels = np.add.outer(ramp, ramp) / 2 + rng.normal(0, 20, (side, side))  # SxS
        image = Image.fromarray(pixels[..., None].repeat(3, 2).clip(0, 255).astype(np.uint8))
        for fmt in ("PNG", "JPEG"):
            buffer = io.BytesIO()
            image.save(buffer, format=fmt)
            data = buffer.getvalue()
            ms = median_ms(lambda data=data: decode_for_model(data, 10**8, 10**9, 1, 28), args.repeats)
            print(f"| {side} | {fmt} | {len(data)} | {ms:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

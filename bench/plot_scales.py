"""Plot `bench/multiscale_study.py` results: precision@10 of each group of sides, one panel per
image set, a bar for the mean over the set's encoders (seeds) and a dot for each.

    python bench/multiscale_study.py E --sides 56 42 42,56 --queries Q [--sets ...] >> S.jsonl
    python bench/plot_scales.py clothes=S1.jsonl letters=S2.jsonl --out bench/scales.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def set_argument(text: str) -> tuple[str, Path]:
    name, _, path = text.partition("=")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.jsonl, got {text!r}")
    return name, Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sets", nargs="+", type=set_argument, help="NAME=FILE (JSON lines)")
    parser.add_argument("--key", default="expanded@10", choices=("precision@10", "expanded@10"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    figure, axes = plt.subplots(1, len(args.sets), figsize=(3.2 * len(args.sets), 3.6), squeeze=False)
    for axis, (name, path) in zip(axes[0], args.sets, strict=True):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        groups = list(dict.fromkeys("+".join(map(str, row["sides"])) for row in rows))  # first-seen order
        for position, group in enumerate(groups):
            values = [row[args.key] for row in rows if "+".join(map(str, row["sides"])) == group]
            axis.bar(position, sum(values) / len(values), color="C1" if "+" in group else "C0", alpha=0.6)
            axis.scatter([position] * len(values), values, color="black", s=10, zorder=3)
        low = min(row[args.key] for row in rows)
        high = max(row[args.key] for row in rows)
        axis.set_ylim(low - 0.6 * (high - low) - 0.002, high + 0.3 * (high - low) + 0.002)
        axis.set_xticks(range(len(groups)), [f"{g} px" for g in groups])
        encoders = len({row["encoder"] for row in rows})
        axis.set_title(f"{name} ({encoders} encoder{'s' if encoders > 1 else ''})", fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(f"{args.key} (bars: mean, dots: each)")
    figure.suptitle("Embedding at one size or two (the unit features summed, then whitened)")
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

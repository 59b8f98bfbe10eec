"""Precision@10 before and after rounds of `python -m training.neighbours`, one line per image set,
with the control (the same steps with the image's own view) as a cross: bench/neighbour-rounds.png.

    python bench/plot_neighbour_rounds.py bench/neighbour-rounds.tsv --out bench/neighbour-rounds.png

The TSV's rows are bench/RESULTS.md's tables "training.neighbours" and "A third round" (set,
before, round1, round2, ..., control, purity of the first round's neighbours).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench/neighbour-rounds.png"))
    args = parser.parse_args(argv)
    with args.table.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    figure, axis = plt.subplots(figsize=(7, 4.2))
    rounds = [name for name in rows[0] if name.startswith("round")]
    for row in rows:
        values = [float(row[k]) for k in ("before", *rounds)]
        (line,) = axis.plot(
            range(len(values)),
            values,
            marker="o",
            label=f"{row['set']}, neighbours {float(row['purity']):.0%} pure",
        )
        axis.plot(
            [1], [float(row["control"])], marker="x", markersize=9, color=line.get_color(), linestyle=""
        )
    axis.plot(
        [], [], marker="x", color="grey", linestyle="", label="control: the same steps, own view as positive"
    )
    axis.axhline(
        0.85, color="grey", linestyle="--", linewidth=1, label="the demo's goal (Fashion-MNIST), 0.85"
    )
    axis.set_xticks(range(len(rounds) + 1), ["--init encoder", *(f"round {r[5:]}" for r in rounds)])
    axis.set_ylabel("precision@10")
    axis.set_title("Mined-neighbour fine-tuning (python -m training.neighbours)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

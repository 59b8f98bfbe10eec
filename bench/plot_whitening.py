"""Plot `bench/whitening_study.py --json` results: kNN top-1 and precision@10 of each encoder as it
is, centred and whitened at each power, one line per encoder.

    python bench/plot_whitening.py /tmp/w-*.json --out bench/whitening.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="+", type=Path, help="JSON files of bench/whitening_study.py")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    studies = [json.loads(path.read_text()) for path in args.studies]
    figure, (knn, precision) = plt.subplots(1, 2, figsize=(12, 4.5))
    for study in studies:
        labels = [row["embedding"].replace("PCA-whitened, ", "") for row in study["rows"]]
        knn.plot(labels, [row["knn_top1"] for row in study["rows"]], marker="o", label=study["encoder"])
        precision.plot(labels, [row["precision_at_10"] for row in study["rows"]], marker="o")
    knn.set_title("weighted kNN top-1 (k=200, tau=0.07), %")
    precision.set_title("precision@10 (1000 queries)")
    for axis in (knn, precision):
        axis.grid(alpha=0.3)
        axis.tick_params(axis="x", labelrotation=20)
    figure.legend(loc="lower center", ncol=min(3, len(studies)), fontsize=8, frameon=False)
    figure.suptitle("Whitening the retrieval embedding (fitted without labels; adopted: power 0.5)")
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

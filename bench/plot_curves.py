"""Learning curves: weighted-kNN top-1 against wall-clock minutes and epochs, one line per run.

Reads each run's TensorBoard scalars (`epoch/knn/top1`, written by the training kNN monitor,
`--knn-every 1`), whose event wall times give the minutes; prints a table and writes one PNG.

    python bench/plot_curves.py runs/quality/* --out bench/curves.png --title "Fashion-MNIST, 2-core CPU"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

KNN_TAG = "epoch/knn/top1"


def read_curve(run: Path) -> tuple[list[float], list[float], list[float]] | None:
    """(minutes since the run's first logged scalar, epochs, top-1) for one run, or None."""
    tb = run / "tb"
    if not tb.is_dir():
        return None
    events = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags().get("scalars", [])
    if KNN_TAG not in tags:
        return None
    start = min(events.Scalars(tag)[0].wall_time for tag in tags)
    epochs_tag = events.Scalars(KNN_TAG)
    steps_per_epoch = _steps_per_epoch(events, tags)
    minutes = [(e.wall_time - start) / 60 for e in epochs_tag]
    epochs = [e.step / steps_per_epoch for e in epochs_tag]
    return minutes, epochs, [e.value for e in epochs_tag]


def _steps_per_epoch(events: EventAccumulator, tags: list[str]) -> float:
    """Steps of the first epoch: the step of the first per-epoch scalar (`epoch/loss`)."""
    first = events.Scalars("epoch/loss")[0] if "epoch/loss" in tags else events.Scalars(KNN_TAG)[0]
    return max(first.step, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="training output folders (with tb/)")
    parser.add_argument("--out", type=Path, default=Path("curves.png"))
    parser.add_argument("--title", default="weighted kNN top-1 (k=200, tau=0.07)")
    parser.add_argument(
        "--baseline", type=float, action="append", default=[], help="horizontal line, e.g. raw pixels"
    )
    parser.add_argument("--baseline-label", action="append", default=[])
    args = parser.parse_args(argv)
    curves = {run.name: read_curve(run) for run in args.runs if run.is_dir()}
    curves = {name: c for name, c in curves.items() if c is not None}
    if not curves:
        print(
            f"error: no run under {[str(r) for r in args.runs]} has {KNN_TAG} (train with --knn-every 1)",
            file=sys.stderr,
        )
        return 1
    figure, (by_minutes, by_epochs) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    print(f"{'run':<22} {'epochs':>7} {'minutes':>8} {'last top-1':>10} {'best':>6}")
    for name, (minutes, epochs, top1) in sorted(curves.items()):
        by_minutes.plot(minutes, top1, "o-", markersize=3, label=name)
        by_epochs.plot(epochs, top1, "o-", markersize=3, label=name)
        print(f"{name:<22} {epochs[-1]:7.1f} {minutes[-1]:8.1f} {top1[-1]:9.2f}% {max(top1):5.2f}%")
    labels = args.baseline_label + [""] * (len(args.baseline) - len(args.baseline_label))
    for value, label in zip(args.baseline, labels, strict=False):
        by_minutes.axhline(value, color="grey", linestyle="--", linewidth=1)
        by_epochs.axhline(value, color="grey", linestyle="--", linewidth=1, label=label or f"{value:.1f}%")
    by_minutes.set_xlabel("wall-clock minutes")
    by_epochs.set_xlabel("epochs")
    by_minutes.set_ylabel("kNN top-1 (%)")
    for axis in (by_minutes, by_epochs):
        axis.grid(alpha=0.3)
    by_epochs.legend(fontsize=8, loc="lower right")
    figure.suptitle(args.title)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`training.png`: the loss curve and the kNN top-1 per epoch of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_history(state: Any, steps_per_epoch: int, path: Path) -> None:
    """The loss every --log-every steps, its per-epoch mean and the kNN top-1 per epoch, as a PNG.
    `state`: the engine's TrainState (loss_curve, history)."""
    import matplotlib  # deferred: start-up cost, and only rank 0 at the end of a run plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, loss_axis = plt.subplots(figsize=(7, 4))
    if state.loss_curve:
        steps, losses = zip(*state.loss_curve, strict=True)
        loss_axis.plot([s / steps_per_epoch for s in steps], losses, "-", color="tab:blue", alpha=0.5)
    epochs = [row["epoch"] for row in state.history]
    loss_axis.plot(epochs, [row["loss"] for row in state.history], "o-", color="tab:blue", label="epoch mean")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    knn = [(row["epoch"], row["knn/top1"]) for row in state.history if "knn/top1" in row]
    if knn:
        knn_axis = loss_axis.twinx()
        knn_axis.plot(*zip(*knn, strict=True), "s-", color="tab:orange")
        knn_axis.set_ylabel("kNN top-1 (%)", color="tab:orange")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

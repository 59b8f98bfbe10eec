"""Optimiser and learning-rate schedule construction (the engine's per-step schedule lives here).

Learning rate: `--lr` is the base rate for a batch of 256; the rate used is
lr * global_batch / 256 (the linear scaling rule of Goyal et al., used by MoCo, SimCLR and MoCo v3),
linear warm-up over `--warmup-epochs`, then cosine decay to 0 per step (or MoCo v1's / InstDisc's
x0.1 steps at `--lr-steps` epochs with `--lr-schedule step`).

With `--time-budget` the schedule is fitted to the budget: `StepSchedule.refit` re-estimates the
run's total steps from the measured step rate, and warm-up, cosine and step boundaries keep their
fractions of it, so a budgeted run ends annealed instead of being cut mid-warm-up.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from training.config import RunConfig
from training.errors import TrainingError
from training.optim.lars import LARS

LARS_EXCLUDE = "exclude_from_wd_and_lars"  # LARS's group flag: no weight decay, no trust ratio


def is_norm_or_bias(name: str, param: torch.Tensor) -> bool:
    """BN/LN scales and shifts and all biases: the 1-d parameters (SimCLR / MoCo v3 exclude them)."""
    return param.ndim <= 1 or name.endswith(".bias")


def parameter_groups(model: nn.Module, weight_decay: float, exclude_norm_bias: bool) -> list[dict[str, Any]]:
    """Trainable parameters; with `exclude_norm_bias`, a second group without weight decay that LARS
    also leaves unadapted (training/optim/lars.py's group flag)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if exclude_norm_bias and is_norm_or_bias(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, LARS_EXCLUDE: True})
    return groups


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule: base_lr is the rate for a batch of 256."""
    return base_lr * global_batch / 256


def build_optimizer(config: RunConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    exclude = config.wd_exclude_norm_bias
    if exclude == "auto":  # the papers: SimCLR (LARS) and MoCo v3 (LARS/AdamW) exclude; the SGD codes do not
        exclude = "yes" if config.optimizer in ("lars", "adamw") else "no"
    groups = parameter_groups(model, config.weight_decay, exclude == "yes")
    if config.optimizer == "sgd":
        for group in groups:
            group.pop(LARS_EXCLUDE, None)
        return torch.optim.SGD(
            groups, lr=lr, momentum=config.optimizer_momentum, weight_decay=config.weight_decay
        )
    if config.optimizer == "adamw":
        for group in groups:
            group.pop(LARS_EXCLUDE, None)
        return torch.optim.AdamW(
            groups, lr=lr, betas=tuple(config.adam_betas), weight_decay=config.weight_decay
        )
    if config.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=config.optimizer_momentum, weight_decay=config.weight_decay)
    raise TrainingError(f"unknown optimizer {config.optimizer!r}")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, decay_at: list[int]) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up, then cosine to 0 or x0.1 steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "step":
        return 0.1 ** sum(step >= boundary for boundary in decay_at)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class StepSchedule:
    """The lr multiplier and the training progress at each step over `total` steps.

    Without a budget `total` is the planned epochs x steps per epoch. With one, `refit` moves it to
    the steps the remaining time allows (never below the steps done, never above the plan); warm-up
    and decay points keep their fractions of the total.
    """

    def __init__(self, total_steps: int, warmup_steps: int, kind: str, decay_at: list[int]) -> None:
        self.planned = max(1, total_steps)
        self.total = self.planned
        self.kind = kind
        self._warmup_fraction = warmup_steps / self.planned
        self._warmup_done: int | None = None  # a finished warm-up keeps its length through refits
        self._decay_fractions = [boundary / self.planned for boundary in decay_at]

    @property
    def warmup_steps(self) -> int:
        if self._warmup_done is not None:
            return self._warmup_done
        return round(self._warmup_fraction * self.total)

    def factor(self, step: int) -> float:
        decay_at = [round(fraction * self.total) for fraction in self._decay_fractions]
        return lr_factor(step, self.total, self.warmup_steps, self.kind, decay_at)

    def progress(self, steps_done: int) -> float:
        return min(1.0, steps_done / self.total)

    def refit(self, steps_done: int, seconds_per_step: float, seconds_left: float) -> int:
        """Fit the total to the time left at the measured rate; returns the new total."""
        affordable = steps_done + int(max(seconds_left, 0.0) / max(seconds_per_step, 1e-9))
        self.total = max(steps_done, min(self.planned, affordable), 1)
        if self._warmup_done is None and steps_done >= self.warmup_steps:
            self._warmup_done = self.warmup_steps
        return self.total

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "warmup_done": self._warmup_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = int(state.get("total", self.planned))
        self._warmup_done = state.get("warmup_done")

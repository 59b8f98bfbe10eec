"""When a run stops early: a signal (SIGTERM/SIGINT) or the end of `--time-budget`.

The loop asks after every step; the ranks agree (a collective), so all stop after the same step.
`TimeBudget` also measures the step rate the budget-fitted schedule (training/schedule.py) needs.
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Any

import torch
import torch.distributed as torch_dist

from training import distributed as dist

# The first fit comes after the first step, from its time (one-time costs included, so it errs
# short); later fits every REFIT_EVERY steps use the rate measured since that first step.
REFIT_EVERY = 5


class TimeBudget:
    """Seconds left of `--time-budget` and the measured seconds per step (wall clock, so epoch-end
    work such as the kNN monitor and checkpoints is counted in the rate)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.monotonic()
        self._timed_from: tuple[int, float] | None = None

    def seconds_left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)

    def step_done(self, steps_in_this_process: int) -> float | None:
        """Seconds per step when it is time to refit (else None)."""
        now = time.monotonic()
        if steps_in_this_process == 1:
            self._timed_from = (1, now)
            rate = now - self.started
        elif self._timed_from is None or (steps_in_this_process - 1) % REFIT_EVERY:
            return None
        else:
            first_step, first_time = self._timed_from
            rate = (now - first_time) / (steps_in_this_process - first_step)
        if dist.is_distributed():  # every rank must use the same schedule: the slowest rank's rate
            value = torch.tensor([rate], dtype=torch.float64)
            torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
            rate = float(value.item())
        return rate


TIME_BUDGET = "the time budget"


class StopRequested:
    """SIGTERM/SIGINT (or the end of `--time-budget`) set a reason; the loop finishes the step,
    saves and exits cleanly. Under torchrun the ranks agree, so all stop after the same step."""

    def __init__(self, time_budget_s: float | None = None) -> None:
        self.reason: str | None = None
        self._deadline = time.monotonic() + time_budget_s if time_budget_s else None
        self.budget_spent = False  # set by the loop when the fitted schedule has run to its end
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequested:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: no handler, no clean stop
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.reason = signal.Signals(signum).name

    def requested(self) -> bool:
        out_of_time = self._deadline is not None and (self.budget_spent or time.monotonic() > self._deadline)
        if self.reason is None and out_of_time:
            self.reason = TIME_BUDGET
        # 0 = go on, 1 = the time budget, 2 = a signal: all ranks take the maximum, so they agree on
        # whether to stop and on why (a signal anywhere outranks a budget).
        code = 0 if self.reason is None else 1 if self.reason == TIME_BUDGET else 2
        if dist.is_distributed():
            value = torch.tensor([code])
            torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
            agreed = int(value.item())
            if agreed != code:
                self.reason = TIME_BUDGET if agreed == 1 else "a signal on another rank"
            code = agreed
        return code > 0

    @property
    def stopped_by(self) -> str:
        """The summary's `stopped_by`: "time_budget" (the run is complete as asked) or "signal"."""
        return "time_budget" if self.reason == TIME_BUDGET else "signal"

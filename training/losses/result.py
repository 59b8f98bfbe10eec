"""What every contrastive loss returns."""

from __future__ import annotations

from typing import NamedTuple

import torch


class ContrastiveResult(NamedTuple):
    loss: torch.Tensor  # scalar
    logits: torch.Tensor  # NxM scores the loss was computed from (detach before logging)
    labels: torch.Tensor  # N int64 index of the positive in each row

    @torch.no_grad()
    def accuracy(self) -> torch.Tensor:
        """Fraction of rows whose positive scores highest (instance-discrimination accuracy)."""
        return (self.logits.argmax(dim=1) == self.labels).float().mean()

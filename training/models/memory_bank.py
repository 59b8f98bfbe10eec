"""InstDisc's memory bank: one L2-normalised feature per training instance (Wu et al. 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MemoryBank(nn.Module):
    """NxD bank (a buffer, so it travels in checkpoints), initialised with random unit vectors.

    update: v_i <- normalise(momentum * v_i + (1 - momentum) * f_i)  (lemniscate.pytorch, 0.5).
    """

    def __init__(self, size: int, dim: int = 128, momentum: float = 0.5) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"memory bank size must be positive, got {size}")
        self.momentum = momentum
        self.register_buffer("bank", F.normalize(torch.randn(size, dim), dim=1))
        # Which entries hold a real feature (written at least once) rather than the random init.
        self.register_buffer("visited", torch.zeros(size, dtype=torch.bool))

    @property
    def size(self) -> int:
        return self.bank.shape[0]

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """The stored features at `indices` (any shape S): SxD, no gradient."""
        return self.bank[indices].detach()

    @torch.no_grad()
    def fill_unvisited(self, features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Write `features` (BxD, L2-normalised) into the entries at `indices` (B) that still hold
        the random init, and mark them visited: an instance's first feature is its own best
        estimate, a random vector is none. Returns the mask of the entries filled (B, bool)."""
        fresh = ~self.visited[indices]
        if fresh.any():
            self.bank[indices[fresh]] = features.detach()[fresh].to(self.bank.dtype)
            self.visited[indices[fresh]] = True
        return fresh

    @torch.no_grad()
    def update(self, features: torch.Tensor, indices: torch.Tensor) -> None:
        """features: BxD (this step's, L2-normalised); indices: B."""
        mixed = self.bank[indices] * self.momentum + features.detach().to(self.bank.dtype) * (
            1 - self.momentum
        )
        self.bank.index_copy_(0, indices, F.normalize(mixed, dim=1))
        self.visited[indices] = True

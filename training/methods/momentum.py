"""Momentum (EMA) encoders: MoCo's key encoder and MoCo v3's momentum encoder."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def make_momentum_copy(online: nn.Module) -> nn.Module:
    """A frozen deep copy: starts equal to `online`, updated only by `momentum_update`."""
    target = copy.deepcopy(online)
    for param in target.parameters():
        param.requires_grad_(False)
    return target


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """theta_k <- m * theta_k + (1 - m) * theta_q for every parameter (buffers are not averaged)."""
    for param_q, param_k in zip(online.parameters(), target.parameters(), strict=True):
        param_k.mul_(momentum).add_(param_q.detach(), alpha=1.0 - momentum)


def cosine_momentum(base: float, progress: float) -> float:
    """MoCo v3 / BYOL schedule: base at progress 0, rising to 1 on a half-cycle cosine at progress 1."""
    progress = min(max(progress, 0.0), 1.0)
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - base)

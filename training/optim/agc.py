"""Unit-wise adaptive gradient clipping (Brock et al. 2021, NFNets, Sec. 4).

For each unit i (an output row of a weight: a Linear's row, a conv filter) with weight W_i and
gradient G_i:
    if ||G_i|| / max(||W_i||, eps) > clip:   G_i <- clip * max(||W_i||, eps) / ||G_i|| * G_i
Biases and other 0-/1-d parameters are one unit. The paper clips every layer except the final
linear layer (clip 0.01 at its batch sizes, eps 1e-3); pass that layer's names in `skip`
(training.engine finds them: the last trainable Linear).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

PAPER_CLIP = 0.01
PAPER_EPS = 1e-3


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Norm per output unit (dim 0), broadcastable against x; the whole tensor when x.ndim <= 1."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def adaptive_gradient_clip_(
    model: nn.Module, clip: float = PAPER_CLIP, skip: Iterable[str] = (), eps: float = PAPER_EPS
) -> None:
    """Clip the gradients of `model` in place (call after backward, before the optimiser step;
    with AMP, after `scaler.unscale_(optimizer)`)."""
    skipped = set(skip)
    for name, param in model.named_parameters():
        if param.grad is None or name in skipped:
            continue
        max_norm = unitwise_norm(param).clamp_min(eps) * clip
        grad_norm = unitwise_norm(param.grad)
        scale = max_norm / grad_norm.clamp_min(1e-6)
        param.grad.mul_(torch.where(grad_norm > max_norm, scale, torch.ones_like(scale)))

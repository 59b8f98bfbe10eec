"""The contract between a self-supervised method and the shared training engine.

A method owns only what its paper changes: the networks around the backbone (heads, key
encoder, predictor), its buffers (queue, memory bank) and its loss. The engine
(`training/engine.py`) owns data, augmentation, optimiser, schedules, AMP, checkpoints,
the kNN monitor, logging and distribution, identically for every method.

Buffers registered with `register_buffer` (queue, memory bank, queue pointer) travel in
`state_dict()`, so checkpoints and exact resume need nothing method-specific.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class StepOutput:
    """What `Method.forward` returns for one training step."""

    loss: torch.Tensor  # scalar, the quantity to minimise
    # Extra scalars for TensorBoard (floats or 0-d tensors, detached), e.g. {"acc/instance": ...}.
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)


class Method(nn.Module):
    """Base class. Subclasses set `name` and implement `forward` and `embedding_network`."""

    name: str = "method"
    # How many augmented views of each image a step needs (InstDisc 1, the others 2).
    num_views: int = 2

    def forward(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        """One step's loss.

        views: `num_views` float tensors, each NxCxHxW, already augmented and normalised.
        indices: N int64 data-set indices of the images (InstDisc's memory bank uses them).
        """
        raise NotImplementedError

    @torch.no_grad()
    def on_step_end(self, progress: float) -> None:
        """Called after each optimiser step; progress in [0, 1] over the whole run.

        MoCo: momentum update of the key encoder (v3: momentum on a cosine schedule to 1).
        """

    def embedding_network(self) -> nn.Module:
        """The network whose L2-normalised output is the retrieval embedding (BxD)."""
        raise NotImplementedError

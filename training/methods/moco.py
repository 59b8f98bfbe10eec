"""MoCo v1 (He et al. 2019) and v2 (Chen et al. 2020): a momentum key encoder and a FIFO queue of
keys as the negatives; loss = cross-entropy over [q·k+, q·queue] / tau (positive at column 0).

Structure follows facebookresearch/moco `moco/builder.py`. Shuffling BN: across ranks the key
batch is shuffled with `_batch_shuffle_ddp`; on one process the encoders use SplitBatchNorm over
`num_splits` sub-batches and the keys are shuffled locally (the MoCo CIFAR-10 demo).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.config import ConfigError, MethodParams, RunConfig, setting, world_size
from training.distributed import get_world_size, is_distributed
from training.losses.infonce import queue_infonce
from training.methods.base import Method, StepOutput
from training.methods.momentum import make_momentum_copy, momentum_update
from training.methods.queue import enqueue
from training.methods.shuffle_bn import (
    batch_shuffle_ddp,
    batch_shuffle_single,
    batch_unshuffle_ddp,
    batch_unshuffle_single,
)
from training.models import EmbeddingNetwork, build_backbone
from training.models.heads import LinearHead, ProjectionHead


@dataclass(frozen=True)
class MoCoParams(MethodParams):
    """MoCo's own hyper-parameters; defaults are v2's (v1's differ in `MoCoV1.paper_defaults`)."""

    dim: int = setting(128, "key/query dimension", flag="--moco-dim")
    queue_size: int = setting(65536, "queue size K", flag="--moco-k")
    momentum: float = setting(0.999, "key-encoder momentum", flag="--moco-m")
    temperature: float = setting(0.2, "softmax temperature", flag="--moco-t")
    mlp: bool = setting(True, "2-layer MLP head (v2) instead of the linear head (v1)")
    shuffle_bn: bool = setting(True, "shuffling BN: cross-rank shuffle, or SplitBatchNorm on one process")
    num_splits: int = setting(
        8, "SplitBatchNorm sub-batches on one process; must divide the batch (CIFAR demo: 8)"
    )

    def check(self, config: RunConfig) -> None:
        if self.queue_size <= 0 or self.num_splits <= 0 or not 0 <= self.momentum <= 1:
            raise ConfigError("--moco-k and --num-splits must be positive, --moco-m in [0, 1]")
        if self.shuffle_bn and world_size() == 1 and config.batch_size % self.num_splits:
            raise ConfigError(
                f"--batch-size {config.batch_size} does not divide into --num-splits {self.num_splits} "
                "(SplitBatchNorm normalises equal sub-batches)"
            )


class MoCo(Method):
    """MoCo's structure; the papers' values are MoCoV1's and MoCoV2's class data."""

    name = "moco"
    num_views = 2
    Params = MoCoParams
    # Both papers: SGD lr 0.03 per 256, momentum 0.9, wd 1e-4, batch 256, 200 epochs, no warm-up.
    paper_defaults = {
        "optimizer": "sgd", "lr": 0.03, "weight_decay": 1e-4, "optimizer_momentum": 0.9, "batch_size": 256,
        "epochs": 200, "warmup_epochs": 0.0, "lr_schedule": "cosine", "augmentation": "mocov2",
    }  # fmt: skip
    # Small images (what bench/quality.sh ran on Fashion-MNIST): a 4096-key queue, a short warm-up.
    small_image_defaults = {"batch_size": 256, "warmup_epochs": 0.05, "queue_size": 4096}

    def __init__(
        self,
        arch: str = "resnet50",
        backbone_kwargs: dict[str, Any] | None = None,
        dim: int = 128,
        queue_size: int = 65536,
        momentum: float = 0.999,
        temperature: float | None = None,  # None: the paper's (v1 0.07, v2 0.2)
        mlp: bool | None = None,  # None: the paper's (v1 linear, v2 MLP)
        shuffle_bn: bool = True,
        num_splits: int = 8,
    ) -> None:
        super().__init__()
        self.arch, self.backbone_kwargs = arch, dict(backbone_kwargs or {})
        self.queue_size = queue_size
        self.momentum = momentum
        paper = self.paper_values()
        self.temperature = paper["temperature"] if temperature is None else temperature
        self.shuffle_bn = shuffle_bn
        # One process: shuffling BN is emulated by SplitBatchNorm; several: real cross-rank shuffle.
        self.split_bn = shuffle_bn and get_world_size() == 1 and num_splits > 1
        norm_kwargs = {"norm": "split_bn", "num_splits": num_splits} if self.split_bn else {}
        backbone, feature_dim = build_backbone(arch, **self.backbone_kwargs, **norm_kwargs)
        use_mlp = paper["mlp"] if mlp is None else mlp
        if use_mlp:  # v2: fc(feature_dim)-ReLU-fc(dim), no BN
            head: nn.Module = ProjectionHead(feature_dim, feature_dim, dim, num_layers=2, hidden_bn=False)
        else:  # v1: a linear 128-d embedding
            head = LinearHead(feature_dim, dim)
        self.encoder_q = EmbeddingNetwork(backbone, head)
        self.encoder_k = make_momentum_copy(self.encoder_q)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))  # KxC, a key per row
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        momentum_update(self.encoder_q, self.encoder_k, self.momentum)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Enqueue the keys of every rank (rank order), overwriting the oldest; wraps around K."""
        enqueue(self.queue, self.queue_ptr, keys)

    @torch.no_grad()
    def _keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """L2-normalised keys NxC from the key encoder, with shuffling BN."""
        if self.shuffle_bn and is_distributed():
            im_k, idx_unshuffle = batch_shuffle_ddp(im_k)
            return batch_unshuffle_ddp(F.normalize(self.encoder_k(im_k), dim=1), idx_unshuffle)
        if self.split_bn:
            im_k, idx_unshuffle = batch_shuffle_single(im_k)
            return batch_unshuffle_single(F.normalize(self.encoder_k(im_k), dim=1), idx_unshuffle)
        return F.normalize(self.encoder_k(im_k), dim=1)

    def forward(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        im_q, im_k = views
        q = F.normalize(self.encoder_q(im_q), dim=1)  # NxC
        k = self._keys(im_k)  # NxC, no gradient
        result = queue_infonce(q, k, self.queue.clone().detach(), self.temperature)
        self._dequeue_and_enqueue(k)
        return StepOutput(result.loss, {"acc/instance": result.accuracy()})

    @torch.no_grad()
    def on_step_end(self, progress: float) -> None:
        # moco/builder.py updates at the start of the next forward; after the step is the same point.
        self._momentum_update_key_encoder()

    @torch.no_grad()
    def on_weights_loaded(self) -> None:
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())  # the key encoder starts equal

    def embedding_network(self) -> nn.Module:
        """The query backbone (pooled features): the representation MoCo transfers."""
        return EmbeddingNetwork(self.encoder_q.backbone)


class MoCoV1(MoCo):
    """MoCo v1: linear 128-d head, tau 0.07, the InstDisc augmentation."""

    name = "moco-v1"
    # He et al. 2019: tau 0.07, a linear head, the InstDisc augmentation, x0.1 at epochs 120 and 160.
    paper_defaults = MoCo.paper_defaults | {
        "temperature": 0.07, "mlp": False, "augmentation": "instdisc",
        "lr_schedule": "step", "lr_steps": (120, 160),
    }  # fmt: skip


class MoCoV2(MoCo):
    """MoCo v2: 2-layer MLP head (hidden 2048 for R50 = the feature dim), tau 0.2, blur augmentation."""

    name = "moco-v2"
    paper_defaults = MoCo.paper_defaults

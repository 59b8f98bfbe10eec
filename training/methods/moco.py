"""MoCo v1 (He et al. 2019) and v2 (Chen et al. 2020): a momentum key encoder and a FIFO queue of
keys as the negatives; loss = cross-entropy over [q·k+, q·queue] / tau (positive at column 0).

Structure follows facebookresearch/moco `moco/builder.py`. Shuffling BN: across ranks the key
batch is shuffled with `_batch_shuffle_ddp`; on one process the encoders use SplitBatchNorm over
`num_splits` sub-batches and the keys are shuffled locally (the MoCo CIFAR-10 demo).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.distributed import concat_all_gather, get_world_size, is_distributed
from training.losses.infonce import queue_infonce
from training.methods.base import Method, StepOutput
from training.methods.momentum import make_momentum_copy, momentum_update
from training.methods.shuffle_bn import (
    batch_shuffle_ddp,
    batch_shuffle_single,
    batch_unshuffle_ddp,
    batch_unshuffle_single,
)
from training.models import EmbeddingNetwork, build_backbone
from training.models.heads import LinearHead, ProjectionHead


class MoCo(Method):
    """Defaults here are MoCo v2's; `MoCoV1` overrides tau and the head."""

    name = "moco"
    num_views = 2
    default_temperature = 0.2
    default_mlp = True
    # paper recipes (both): SGD lr 0.03 per 256, momentum 0.9, wd 1e-4, batch 256, 200 epochs
    default_augmentation = "mocov2"

    def __init__(
        self,
        arch: str = "resnet50",
        backbone_kwargs: dict[str, Any] | None = None,
        dim: int = 128,
        queue_size: int = 65536,
        momentum: float = 0.999,
        temperature: float | None = None,
        mlp: bool | None = None,
        shuffle_bn: bool = True,
        num_splits: int = 8,
    ) -> None:
        super().__init__()
        self.arch, self.backbone_kwargs = arch, dict(backbone_kwargs or {})
        self.queue_size = queue_size
        self.momentum = momentum
        self.temperature = self.default_temperature if temperature is None else temperature
        self.shuffle_bn = shuffle_bn
        # One process: shuffling BN is emulated by SplitBatchNorm; several: real cross-rank shuffle.
        self.split_bn = shuffle_bn and get_world_size() == 1 and num_splits > 1
        norm_kwargs = {"norm": "split_bn", "num_splits": num_splits} if self.split_bn else {}
        backbone, feature_dim = build_backbone(arch, **self.backbone_kwargs, **norm_kwargs)
        use_mlp = self.default_mlp if mlp is None else mlp
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
        keys = concat_all_gather(keys)  # (N*world)xC
        total = keys.shape[0]
        skipped = max(0, total - self.queue_size)  # more keys than slots: only the newest K survive
        ptr = int(self.queue_ptr)
        positions = (ptr + skipped + torch.arange(total - skipped, device=keys.device)) % self.queue_size
        self.queue.index_copy_(0, positions, keys[skipped:].to(self.queue.dtype))
        self.queue_ptr[0] = (ptr + total) % self.queue_size

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

    def embedding_network(self) -> nn.Module:
        """The query backbone (pooled features): the representation MoCo transfers."""
        return EmbeddingNetwork(self.encoder_q.backbone)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(f"{cls.name} (paper defaults)")
        group.add_argument("--moco-dim", type=int, default=128, help="key/query dimension (paper: 128)")
        group.add_argument("--moco-k", type=int, default=65536, help="queue size K (paper: 65536)")
        group.add_argument("--moco-m", type=float, default=0.999, help="key-encoder momentum (paper: 0.999)")
        group.add_argument(
            "--moco-t",
            type=float,
            default=cls.default_temperature,
            help=f"softmax temperature (paper: {cls.default_temperature})",
        )
        group.add_argument(
            "--mlp",
            action=argparse.BooleanOptionalAction,
            default=cls.default_mlp,
            help=f"2-layer MLP head (v2) instead of the linear head (v1) (default: {cls.default_mlp})",
        )
        group.add_argument(
            "--shuffle-bn",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="shuffling BN: cross-rank shuffle, or SplitBatchNorm on one process (paper: on)",
        )
        group.add_argument(
            "--num-splits",
            type=int,
            default=8,
            help="SplitBatchNorm sub-batches on one process; must divide the batch (CIFAR demo: 8)",
        )
        parser.set_defaults(
            optimizer="sgd",
            lr=0.03,
            weight_decay=1e-4,
            momentum=0.9,
            batch_size=256,
            epochs=200,
            warmup_epochs=0,
            augmentation=cls.default_augmentation,
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace, arch: str, backbone_kwargs: dict, num_samples: int) -> MoCo:
        batch_size = getattr(args, "batch_size", None)
        if args.shuffle_bn and get_world_size() == 1 and batch_size and batch_size % args.num_splits:
            raise ValueError(
                f"--num-splits {args.num_splits} must divide --batch-size {batch_size} "
                "(SplitBatchNorm normalises equal sub-batches)"
            )
        return cls(
            arch,
            backbone_kwargs,
            dim=args.moco_dim,
            queue_size=args.moco_k,
            momentum=args.moco_m,
            temperature=args.moco_t,
            mlp=args.mlp,
            shuffle_bn=args.shuffle_bn,
            num_splits=args.num_splits,
        )


class MoCoV1(MoCo):
    """MoCo v1: linear 128-d head, tau 0.07, the InstDisc augmentation."""

    name = "moco-v1"
    default_temperature = 0.07
    default_mlp = False
    default_augmentation = "instdisc"


class MoCoV2(MoCo):
    """MoCo v2: 2-layer MLP head (hidden 2048 for R50 = the feature dim), tau 0.2, blur augmentation."""

    name = "moco-v2"

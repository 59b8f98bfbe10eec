"""SimCLR (Chen et al. 2020): two views through one encoder and a projection MLP; NT-Xent over the
2N views with the other ranks' views as extra negatives (all-gathered with gradient).

Defaults (paper Sec. 2.3, B.9 and google-research/simclr):
  projection g(h) = W2 ReLU(BN(W1 h)): hidden = feature dim (2048 for R50), out 128.
  tau 0.5 (the paper's CIFAR-10 default, B.9; its ImageNet runs at batch 4096 use 0.1, Table 5).
  LARS, lr 0.3 per 256 (4.8 at 4096), wd 1e-6, batch 4096, 100 epochs, 10 warm-up, global BN.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from training.config import ConfigError, MethodParams, RunConfig, setting
from training.losses.debiased import debiased_nt_xent
from training.losses.ntxent import PairLoss, multi_crop_nt_xent, nt_xent
from training.methods.base import Method, StepOutput
from training.models import EmbeddingNetwork, build_backbone
from training.models.global_bn import collectives_without_sync_bn, convert_global_batchnorm
from training.models.heads import ProjectionHead


@dataclass(frozen=True)
class SimCLRParams(MethodParams):
    dim: int = setting(128, "projection output", flag="--proj-dim")
    hidden_dim: int | None = setting(
        None, "projection hidden width (paper: the feature dim)", flag="--proj-hidden-dim"
    )
    temperature: float = setting(
        0.5, "NT-Xent temperature (the paper's CIFAR-10 default; 0.1 in its batch-4096 ImageNet runs)"
    )
    last_bn: bool = setting(
        False,
        "BN after the last projection layer (paper's g(h) = W2 ReLU(W1 h): off; on in the TF code)",
        flag="--proj-last-bn",
    )
    global_bn: bool = setting(True, "BN statistics over all ranks (SyncBatchNorm under DDP)")
    debias: float = setting(
        0.0,
        "tau+, the share of a batch's other views that show the anchor's class (debiased contrastive "
        "loss, Chuang et al. 2020: 0.1 for 10 classes); 0 = plain NT-Xent",
    )
    hardness: float = setting(
        0.0,
        "beta, weight negatives by exp(beta * s / tau) (hard negatives, Robinson et al. 2021: 1.0 on "
        "CIFAR-10); 0 = every negative alike",
    )

    def check(self, config: RunConfig) -> None:
        if not 0 <= self.debias < 1 or self.hardness < 0:
            raise ConfigError("--debias must be in [0, 1) and --hardness 0 or more")


class SimCLR(Method):
    name = "simclr"
    num_views = 2
    accepts_local_crops = True  # --local-crops: SwAV reports multi-crop on SimCLR too (+2-4 points)
    Params = SimCLRParams
    paper_defaults = {
        "optimizer": "lars", "lr": 0.3, "weight_decay": 1e-6, "optimizer_momentum": 0.9, "batch_size": 4096,
        "epochs": 100, "warmup_epochs": 10.0, "lr_schedule": "cosine", "augmentation": "simclr",
    }  # fmt: skip
    # Images <= 64 px: what the ablation in bench/RESULTS.md ("Small-image recipe") found on both
    # Fashion-MNIST and a glyph set: tau 0.2 (0.5 lost 17 points at batch 256), lr 1.2 per 256
    # (the paper's square-root scaling for small batches), no flips. Crop scale and blur helped
    # one set and hurt the other, so they stay the paper's.
    small_image_defaults = {
        "batch_size": 256, "warmup_epochs": 0.05, "lr": 1.2, "temperature": 0.2,
        "augmentation": "simclr-noflip",
    }  # fmt: skip

    def __init__(
        self,
        arch: str = "resnet50",
        backbone_kwargs: dict[str, Any] | None = None,
        dim: int = 128,
        hidden_dim: int | None = None,
        temperature: float = 0.5,
        last_bn: bool = False,
        global_bn: bool = True,
        gather_negatives: bool = True,
        debias: float = 0.0,
        hardness: float = 0.0,
    ) -> None:
        super().__init__()
        self.arch, self.backbone_kwargs = arch, dict(backbone_kwargs or {})
        self.temperature = temperature
        # Global BN: BN statistics over all ranks. The engine converts to SyncBatchNorm under DDP.
        self.sync_batch_norm = global_bn
        self.gather_negatives = gather_negatives
        self.pair_loss: PairLoss = nt_xent
        if debias or hardness:
            self.pair_loss = functools.partial(debiased_nt_xent, tau_plus=debias, beta=hardness)
        backbone, feature_dim = build_backbone(arch, **self.backbone_kwargs)
        projector = ProjectionHead(
            feature_dim, hidden_dim or feature_dim, dim, 2, hidden_bn=True, last_bn=last_bn
        )
        self.encoder = EmbeddingNetwork(backbone, projector)
        if global_bn and collectives_without_sync_bn():
            convert_global_batchnorm(self)  # gloo/CPU: torch's SyncBatchNorm needs CUDA
            self.sync_batch_norm = False  # already global: nothing left for the engine to convert

    def forward(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        full, local = views[:2], views[2:]
        # one pass over both views, as SimCLR does: BN statistics over all 2N views
        z1, z2 = self.encoder(torch.cat(full, dim=0)).chunk(2, dim=0)  # NxC each
        if not local:
            result = self.pair_loss(z1, z2, self.temperature, self.gather_negatives)
            return StepOutput(result.loss, {"acc/instance": result.accuracy()})
        # multi-crop: the local views share a resolution, so one more pass (SwAV groups by size)
        z_local = self.encoder(torch.cat(local, dim=0)).chunk(len(local), dim=0)  # NxC each
        result = multi_crop_nt_xent(
            [z1, z2], z_local, self.temperature, self.gather_negatives, self.pair_loss
        )
        return StepOutput(result.loss, {"acc/instance": result.accuracy()})

    def embedding_network(self) -> nn.Module:
        """The backbone h (before the projection head), which SimCLR shows transfers better."""
        return EmbeddingNetwork(self.encoder.backbone)

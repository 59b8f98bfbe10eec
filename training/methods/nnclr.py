"""NNCLR (Dwibedi et al. 2021): SimCLR whose positive is a nearest neighbour. Each view's projection
z looks up its nearest neighbour in a support set (a FIFO queue of past projections) and that
neighbour, not the other view, is contrasted with the other view's prediction across the batch.
Symmetric: L(NN(z1), p2) + L(NN(z2), p1), halved. The support set receives the first view's
projections after each step.

Defaults (paper Sec. 4):
  projector 3 layers 2048-BN-ReLU-2048-BN-ReLU-256-BN; predictor 2 layers 4096-BN-ReLU-256. Here
  the hidden widths default to min(paper, 8 x backbone feature dim) so small CPU backbones stay small.
  support set 98,304, tau 0.1, LARS, wd 1e-6, batch 4096, 1000 epochs, 10 warm-up, cosine, BYOL's
  augmentation. Base lr: 0.3 per 256 as SimCLR's (the paper's own value not checked offline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.config import ConfigError, MethodParams, RunConfig, setting
from training.distributed import all_gather_with_grad, get_rank, get_world_size
from training.losses.nnclr import nearest_neighbours, nnclr_loss
from training.losses.result import ContrastiveResult
from training.methods.base import Method, StepOutput
from training.methods.queue import enqueue
from training.methods.simclr import SimCLR
from training.models import EmbeddingNetwork, build_backbone
from training.models.global_bn import collectives_without_sync_bn, convert_global_batchnorm
from training.models.heads import PredictionHead, ProjectionHead

PAPER_PROJECTOR_DIM, PAPER_PREDICTOR_DIM = 2048, 4096


@dataclass(frozen=True)
class NNCLRParams(MethodParams):
    dim: int = setting(256, "projector/predictor output", flag="--proj-dim")
    hidden_dim: int | None = setting(
        None,
        "projector hidden width (paper 2048; none: min(2048, 8 x feature dim))",
        flag="--proj-hidden-dim",
    )
    pred_hidden_dim: int | None = setting(
        None,
        "predictor hidden width (paper 4096; none: min(4096, 8 x feature dim))",
        flag="--pred-hidden-dim",
    )
    support_size: int = setting(98_304, "support set: past projections searched for each view's neighbour")
    temperature: float = setting(0.1, "softmax temperature")

    def check(self, config: RunConfig) -> None:
        if self.support_size <= 0 or self.temperature <= 0:
            raise ConfigError("--support-size and --temperature must be positive")


class NNCLR(Method):
    name = "nnclr"
    num_views = 2
    sync_batch_norm = True  # BN statistics over all ranks, as SimCLR
    Params = NNCLRParams
    paper_defaults = {
        "optimizer": "lars", "lr": 0.3, "weight_decay": 1e-6, "optimizer_momentum": 0.9, "batch_size": 4096,
        "epochs": 1000, "warmup_epochs": 10.0, "lr_schedule": "cosine", "augmentation": "mocov3",
    }  # fmt: skip
    # Images <= 64 px: SimCLR's small-image recipe (bench/RESULTS.md) but the paper's tau, and a
    # support set of 16,384 (about a quarter of a 60k data set, as the paper's 98k is 8% of ImageNet's 1.28M).
    small_image_defaults = {
        **{key: value for key, value in SimCLR.small_image_defaults.items() if key != "temperature"},
        "support_size": 16_384,
    }
    notes = (
        "The base lr (0.3 per 256, LARS) is SimCLR's: the value in the NNCLR paper was not checked "
        "offline. Small images: SimCLR's small-image recipe and a 16,384-entry support set."
    )

    def __init__(
        self,
        arch: str = "resnet50",
        backbone_kwargs: dict[str, Any] | None = None,
        dim: int = 256,
        hidden_dim: int | None = None,
        pred_hidden_dim: int | None = None,
        support_size: int = 98_304,
        temperature: float = 0.1,
    ) -> None:
        super().__init__()
        self.arch, self.backbone_kwargs = arch, dict(backbone_kwargs or {})
        self.temperature = temperature
        backbone, feature_dim = build_backbone(arch, **self.backbone_kwargs)
        hidden = hidden_dim or min(PAPER_PROJECTOR_DIM, 8 * feature_dim)
        projector = ProjectionHead(feature_dim, hidden, dim, 3, hidden_bn=True, last_bn=True)
        self.encoder = EmbeddingNetwork(backbone, projector)
        predictor_hidden = pred_hidden_dim or min(PAPER_PREDICTOR_DIM, 8 * feature_dim)
        self.predictor = PredictionHead(dim, predictor_hidden, dim, num_layers=2, hidden_bn=True)
        # KxC support set, a projection per row; random until the first K images have passed.
        self.register_buffer("support", F.normalize(torch.randn(support_size, dim), dim=1))
        self.register_buffer("support_ptr", torch.zeros(1, dtype=torch.long))
        if collectives_without_sync_bn():
            convert_global_batchnorm(self)  # gloo/CPU: torch's SyncBatchNorm needs CUDA
            self.sync_batch_norm = False

    def contrastive_loss(self, z: torch.Tensor, p_other: torch.Tensor) -> ContrastiveResult:
        """z: NxC projections of one view; p_other: NxC predictions of the other (with gradient)."""
        neighbours = nearest_neighbours(z.detach(), self.support)  # NxC, no gradient
        p_all = F.normalize(p_other, dim=1)
        if get_world_size() > 1:
            p_all = all_gather_with_grad(p_all)  # (N*world)xC
        return nnclr_loss(neighbours, p_all, self.temperature, get_rank())

    def forward(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        z1, z2 = self.encoder(torch.cat(views, dim=0)).chunk(2, dim=0)  # NxC each
        p1, p2 = self.predictor(torch.cat([z1, z2], dim=0)).chunk(2, dim=0)
        z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        first, second = self.contrastive_loss(z1, p2), self.contrastive_loss(z2, p1)
        enqueue(self.support, self.support_ptr, z1.detach())
        accuracy = (first.accuracy() + second.accuracy()) / 2
        return StepOutput((first.loss + second.loss) / 2, {"acc/instance": accuracy})

    def embedding_network(self) -> nn.Module:
        """The backbone (pooled features), before the projector, as in SimCLR."""
        return EmbeddingNetwork(self.encoder.backbone)

"""MoCo v3 (Chen, Xie, He 2021): no queue; keys are the momentum encoder's outputs for the other view
of the same batch (all ranks). base encoder = backbone + projector, plus a predictor on the query
side; momentum encoder = backbone + projector. Symmetric loss ctr(q1, k2) + ctr(q2, k1) with
ctr = CE(q·k_all / tau, labels = arange(N) + N*rank) * 2*tau.

Defaults (paper Sec. 4 and facebookresearch/moco-v3):
  projector 3 layers 4096-BN-ReLU-4096-BN-ReLU-256 with last BN without affine; predictor 2 layers
  4096-BN-ReLU-256. (The official code uses a 2-layer projector for ResNet-50.) Here the hidden
  width defaults to min(4096, 8 x backbone feature dim) so small CPU backbones stay small.
  tau 0.2 (paper; official code: 0.2 for ViT, --moco-t 1.0 in its ResNet-50 recipe).
  momentum 0.99, raised to 1 on a half-cycle cosine over training (--moco-m-cos).
  ResNet recipe: LARS, lr 0.6 per 256 (x batch/256), wd 1e-6, batch 4096, 100 epochs, 10 warm-up.
  ViT recipe: AdamW, lr 1.5e-4 per 256, wd 0.1, 300 epochs, 40 warm-up, frozen patch projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.config import MethodParams, setting
from training.distributed import concat_all_gather, get_rank
from training.losses.infonce import in_batch_infonce
from training.losses.result import ContrastiveResult
from training.methods.base import Method, StepOutput
from training.methods.momentum import cosine_momentum, make_momentum_copy, momentum_update
from training.models import EmbeddingNetwork, build_backbone
from training.models.global_bn import collectives_without_sync_bn, convert_global_batchnorm
from training.models.heads import PredictionHead, ProjectionHead

PAPER_MLP_DIM = 4096


@dataclass(frozen=True)
class MoCoV3Params(MethodParams):
    dim: int = setting(256, "projector/predictor output", flag="--moco-dim")
    mlp_dim: int | None = setting(
        None,
        "hidden width of projector and predictor (paper: 4096; none: min(4096, 8 x feature dim))",
        flag="--moco-mlp-dim",
    )
    projector_layers: int = setting(3, "projector depth (official ResNet code: 2)")
    temperature: float = setting(0.2, "temperature (the official ResNet-50 recipe uses 1.0)", flag="--moco-t")
    momentum: float = setting(0.99, "base momentum", flag="--moco-m")
    momentum_cosine: bool = setting(
        True, "raise the momentum to 1 on a half-cycle cosine over training", flag="--moco-m-cos"
    )


class MoCoV3(Method):
    name = "moco-v3"
    num_views = 2
    sync_batch_norm = True  # the official code converts every BN (heads included) to SyncBN
    Params = MoCoV3Params
    # The ResNet-50 recipe. ViT (--arch vit_small): --optimizer adamw --lr 1.5e-4 --weight-decay 0.1
    # --epochs 300 --warmup-epochs 40.
    paper_defaults = {
        "optimizer": "lars", "lr": 0.6, "weight_decay": 1e-6, "optimizer_momentum": 0.9, "batch_size": 4096,
        "epochs": 100, "warmup_epochs": 10.0, "lr_schedule": "cosine", "augmentation": "mocov3",
    }  # fmt: skip
    small_image_defaults = {"batch_size": 256, "warmup_epochs": 0.05}
    notes = (
        "Defaults are the ResNet-50 recipe (LARS, lr 0.6, wd 1e-6, 100 epochs, 10 warm-up). For a ViT "
        "(--arch vit_small) the paper uses --optimizer adamw --lr 1.5e-4 --weight-decay 0.1 --epochs 300 "
        "--warmup-epochs 40; the patch projection is frozen (its stability trick)."
    )

    def __init__(
        self,
        arch: str = "resnet50",
        backbone_kwargs: dict[str, Any] | None = None,
        dim: int = 256,
        mlp_dim: int | None = None,
        projector_layers: int = 3,
        temperature: float = 0.2,
        momentum: float = 0.99,
        momentum_cosine: bool = True,
    ) -> None:
        super().__init__()
        self.arch, self.backbone_kwargs = arch, dict(backbone_kwargs or {})
        self.temperature = temperature
        self.base_momentum = momentum
        self.momentum_cosine = momentum_cosine
        self.current_momentum = momentum
        backbone, feature_dim = build_backbone(arch, **self.backbone_kwargs)
        hidden = mlp_dim or min(PAPER_MLP_DIM, 8 * feature_dim)
        projector = ProjectionHead(feature_dim, hidden, dim, projector_layers, hidden_bn=True, last_bn=True)
        self.base_encoder = EmbeddingNetwork(backbone, projector)
        self.predictor = PredictionHead(dim, hidden, dim, num_layers=2, hidden_bn=True, last_bn=False)
        self.momentum_encoder = make_momentum_copy(self.base_encoder)
        if collectives_without_sync_bn():
            convert_global_batchnorm(self)  # gloo/CPU: torch's SyncBatchNorm needs CUDA
            self.sync_batch_norm = False  # already global: nothing left for the engine to convert

    @torch.no_grad()
    def _update_momentum_encoder(self, momentum: float) -> None:
        momentum_update(self.base_encoder, self.momentum_encoder, momentum)

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> ContrastiveResult:
        """ctr(q, k): q NxC local queries (with gradient), k NxC local keys (none)."""
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        k_all = concat_all_gather(k)  # (N*world)xC, rank order
        return in_batch_infonce(q, k_all, self.temperature, get_rank())

    def forward(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        x1, x2 = views
        q1 = self.predictor(self.base_encoder(x1))  # NxC
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        first, second = self.contrastive_loss(q1, k2), self.contrastive_loss(q2, k1)
        accuracy = (first.accuracy() + second.accuracy()) / 2
        return StepOutput(
            first.loss + second.loss, {"acc/instance": accuracy, "momentum": self.current_momentum}
        )

    @torch.no_grad()
    def on_step_end(self, progress: float) -> None:
        if self.momentum_cosine:
            self.current_momentum = cosine_momentum(self.base_momentum, progress)
        self._update_momentum_encoder(self.current_momentum)

    @torch.no_grad()
    def on_weights_loaded(self) -> None:
        self.momentum_encoder.load_state_dict(self.base_encoder.state_dict())  # starts equal

    def embedding_network(self) -> nn.Module:
        """The backbone ([CLS] token for a ViT, pooled features for a ResNet), before the projector."""
        return EmbeddingNetwork(self.base_encoder.backbone)

"""Backbones (ResNet, ViT), heads and the spec-driven embedding network the encoder file stores.

Network spec (plain JSON-able dict, stored in the encoder file):
  {"arch": "resnet18", "kwargs": {"in_channels": 1, "small_stem": true, "width": 0.25},
   "head": null | <head spec, see training.models.heads>}
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from training.models.heads import build_head
from training.models.resnet import ARCHS as RESNET_ARCHS
from training.models.resnet import build_resnet
from training.models.vit import PRESETS as VIT_PRESETS
from training.models.vit import build_vit

ARCH_NAMES = sorted(RESNET_ARCHS) + sorted(VIT_PRESETS)


def build_backbone(
    arch: str, in_channels: int = 3, small_stem: bool = False, width: float = 1.0, **kwargs: Any
) -> tuple[nn.Module, int]:
    """(backbone, feature_dim). ResNet kwargs: norm ("bn"|"split_bn"), num_splits.
    ViT kwargs: image_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, freeze_patch_embed
    (small_stem and width do not apply to a ViT)."""
    if arch in RESNET_ARCHS:
        net: nn.Module = build_resnet(arch, in_channels, small_stem, width, **kwargs)
    elif arch in VIT_PRESETS:
        net = build_vit(arch, in_channels, **kwargs)
    else:
        raise ValueError(f"unknown arch {arch!r}: expected one of {ARCH_NAMES}")
    return net, net.feature_dim


class EmbeddingNetwork(nn.Module):
    """backbone (+ optional head): what the encoder file stores and `Encoder` rebuilds."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)  # NxD
        return features if self.head is None else self.head(features)


def network_spec(arch: str, backbone_kwargs: dict[str, Any], head: dict[str, Any] | None = None) -> dict:
    """The spec for `build_embedding_network`. A training-only split BN becomes plain BN: both have
    the same state_dict keys and behave identically in eval mode."""
    kwargs = dict(backbone_kwargs)
    if kwargs.get("norm") == "split_bn":
        kwargs["norm"] = "bn"
        kwargs.pop("num_splits", None)
    return {"arch": arch, "kwargs": kwargs, "head": dict(head) if head else None}


def build_embedding_network(spec: dict[str, Any]) -> nn.Module:
    try:
        backbone, _ = build_backbone(spec["arch"], **spec.get("kwargs", {}))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"invalid network spec {spec!r}: {exc}") from exc
    head = build_head(spec["head"]) if spec.get("head") else None
    return EmbeddingNetwork(backbone, head)

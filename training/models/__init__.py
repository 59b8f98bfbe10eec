"""Backbones (ResNet, ViT), heads and the spec-driven embedding network the encoder file stores.

Network spec (plain JSON-able dict, stored in the encoder file):
  {"arch": "resnet18", "kwargs": {"in_channels": 1, "small_stem": true, "width": 0.25},
   "head": null | <head spec, see training.models.heads>,
   "grid": G (optional, ResNet without head only: the last stage pooled to GxG, not to 1x1),
   "scales": [1.0, s2, ...] (optional, ResNet without head only: the image also embedded resized
       by each factor, the unit features summed; a multi-scale descriptor),
   "whitening": null | {"dim": D, "out_dim": D', "power": p} (optional: PCA whitening of the
       embedding, training.models.whitening; its mean and projection are in the state_dict)}
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.models.heads import build_head
from training.models.resnet import ARCHS as RESNET_ARCHS
from training.models.resnet import build_resnet
from training.models.vit import PRESETS as VIT_PRESETS
from training.models.vit import build_vit
from training.models.whitening import Whitening

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
    """backbone (+ optional head): what the encoder file stores and `Encoder` rebuilds.

    `grid` > 1 (a ResNet without head): the last stage average-pooled to a GxG grid instead of
    1x1, so the vector keeps the coarse layout that global pooling throws away (for small images
    where position is part of the class; bench/RESULTS.md, "Which vector is the retrieval
    embedding"). The weights are the same; only the pooling differs.

    `scales` other than (1.0,) (a ResNet without head): a multi-scale descriptor (Radenovic, Tolias
    & Chum, TPAMI 2018, section 3.3; their scales are 1, 1/sqrt(2) and 1/2). The input is also
    resized by each factor (bilinear), each size is embedded, and the L2-normalised features are
    summed: an object is described at more than one apparent size."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module | None = None,
        grid: int = 1,
        whitening: Whitening | None = None,
        scales: tuple[float, ...] = (1.0,),
    ) -> None:
        super().__init__()
        if grid != 1:
            check_grid(grid, backbone, head)
        self.scales = check_scales(scales, backbone, head)
        self.backbone = backbone
        self.head = head
        self.grid = grid
        if whitening is not None and whitening.dim != self.features_dim:
            raise ValueError(
                f"whitening takes {whitening.dim}-d vectors, the network gives {self.features_dim}"
            )
        self.whitening = whitening  # last: PCA whitening fitted on the training embeddings

    @property
    def features_dim(self) -> int:
        """D before whitening."""
        if self.head is not None:
            return int(self.head.out_dim)
        return int(self.backbone.feature_dim) * self.grid**2

    @property
    def out_dim(self) -> int:
        return self.features_dim if self.whitening is None else self.whitening.out_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """NxD, before whitening: what a whitening is fitted on."""
        if self.scales == (1.0,):
            return self.features_at_one_size(x)
        # the sum of unit vectors: whitening and the embedding normalise it again
        return sum(F.normalize(self.features_at_one_size(rescaled(x, s)), dim=1) for s in self.scales)

    def features_at_one_size(self, x: torch.Tensor) -> torch.Tensor:
        """NxD of the images as they are."""
        if self.grid != 1:
            stage = self.backbone.feature_map(x)  # NxDxHxW
            return torch.flatten(grid_pool(stage, self.grid), 1)  # Nx(D*G*G)
        features = self.backbone(x)  # NxD
        return features if self.head is None else self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        return features if self.whitening is None else self.whitening(features)


@torch.fx.wrap  # one call in an fx graph (BN folding traces the network): its shapes are not symbolic
def grid_pool(stage: torch.Tensor, grid: int) -> torch.Tensor:
    """NxDxHxW -> NxDxGxG: `F.adaptive_avg_pool2d`'s windows, written out. Where G does not divide
    the map (a 7x7 map of a 56 px input: overlapping windows [0, 4) and [3, 7)) ONNX cannot export
    the adaptive pool, and a branch on the shape would warn in every trace; the same arithmetic."""
    height, width = stage.shape[-2:]

    def windows(size: int) -> list[tuple[int, int]]:
        # floor and ceil of non-negative numbers only: a traced shape exports its arithmetic, and
        # ONNX's integer division truncates
        return [((i * size) // grid, ((i + 1) * size + grid - 1) // grid) for i in range(grid)]

    rows = []
    for top, bottom in windows(height):
        cells = [stage[:, :, top:bottom, left:right].mean(dim=(2, 3)) for left, right in windows(width)]
        rows.append(torch.stack(cells, dim=-1))  # NxDxG
    return torch.stack(rows, dim=2)  # NxDxGxG


@torch.fx.wrap  # one call in an fx graph, as grid_pool
def rescaled(images: torch.Tensor, scale: float) -> torch.Tensor:
    """NxCxHxW -> NxCx(H*scale)x(W*scale), sides rounded down, bilinear (a factor, not a size: the
    traced graph then holds no shape arithmetic). scale 1: the images themselves."""
    if scale == 1.0:
        return images
    return F.interpolate(
        images, scale_factor=scale, mode="bilinear", align_corners=False, recompute_scale_factor=False
    )


def scales_problem(scales: tuple[float, ...]) -> str | None:
    """Why these embedding scales cannot be used, or None: 1 first, distinct factors in (0, 2]."""
    if (
        not scales
        or scales[0] != 1.0
        or len(set(scales)) != len(scales)
        or not all(0 < s <= 2 for s in scales)
    ):
        return f"scales must start with 1 and be distinct factors in (0, 2], got {list(scales)}"
    return None


def check_scales(scales: Any, backbone: nn.Module, head: nn.Module | None) -> tuple[float, ...]:
    """The scales as a tuple of floats; ValueError when `scales_problem` finds one or (for more than
    one scale) the embedding is not a convolutional backbone's pooling."""
    scales = tuple(float(s) for s in scales)
    if problem := scales_problem(scales):
        raise ValueError(f"embedding {problem}")
    if len(scales) > 1 and head is not None:
        raise ValueError("a multi-scale embedding pools the backbone; this method's embedding is its head")
    if len(scales) > 1 and not hasattr(backbone, "feature_map"):
        raise ValueError(f"a multi-scale embedding needs a ResNet backbone, not {type(backbone).__name__}")
    return scales


def check_grid(grid: int, backbone: nn.Module, head: nn.Module | None) -> None:
    if grid < 1:
        raise ValueError(f"embedding grid must be >= 1, got {grid}")
    if head is not None:
        raise ValueError("a grid embedding pools the backbone; this method's embedding is its head's output")
    if not hasattr(backbone, "feature_map"):
        raise ValueError(f"a grid embedding needs a convolutional backbone, not {type(backbone).__name__}")


def network_spec(
    arch: str,
    backbone_kwargs: dict[str, Any],
    head: dict[str, Any] | None = None,
    grid: int = 1,
    whitening: dict[str, Any] | None = None,
    scales: tuple[float, ...] = (1.0,),
) -> dict:
    """The spec for `build_embedding_network`. A training-only split BN becomes plain BN: both have
    the same state_dict keys and behave identically in eval mode. `grid`, `scales` and `whitening` are
    written only when used, so older files and their versions stay as they were."""
    kwargs = dict(backbone_kwargs)
    if kwargs.get("norm") == "split_bn":
        kwargs["norm"] = "bn"
        kwargs.pop("num_splits", None)
    spec = {"arch": arch, "kwargs": kwargs, "head": dict(head) if head else None}
    if grid != 1:
        spec["grid"] = int(grid)
    if tuple(scales) != (1.0,):
        spec["scales"] = [float(s) for s in scales]
    if whitening:
        spec["whitening"] = dict(whitening)
    return spec


def build_embedding_network(spec: dict[str, Any]) -> nn.Module:
    try:
        backbone, _ = build_backbone(spec["arch"], **spec.get("kwargs", {}))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"invalid network spec {spec!r}: {exc}") from exc
    head = build_head(spec["head"]) if spec.get("head") else None
    whitening = Whitening(**spec["whitening"]) if spec.get("whitening") else None
    scales = tuple(spec.get("scales", (1.0,)))
    return EmbeddingNetwork(backbone, head, int(spec.get("grid", 1)), whitening, scales)

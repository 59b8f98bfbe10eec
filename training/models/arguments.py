"""Command-line flags for the backbone, shared by every method's entry point."""

from __future__ import annotations

import argparse
from typing import Any

from training.models import ARCH_NAMES
from training.models.vit import PRESETS as VIT_PRESETS

SMALL_STEM_MAX_SIZE = 64  # crops up to this size (CIFAR 32, Fashion-MNIST 28) get the small stem


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backbone")
    group.add_argument(
        "--arch",
        choices=ARCH_NAMES,
        default="resnet50",
        help="backbone (default: resnet50, as in every paper here; resnet18 --width 0.25 for CPU runs)",
    )
    group.add_argument(
        "--width",
        type=float,
        default=1.0,
        help="ResNet channel multiplier: 0.25 gives stages of 16/32/64/128 channels (default: 1.0)",
    )
    group.add_argument(
        "--small-stem",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ResNet 3x3 stride-1 stem without max-pool (CIFAR variant); default: on for crops "
        f"<= {SMALL_STEM_MAX_SIZE} px",
    )
    group.add_argument("--patch-size", type=int, default=16, help="ViT patch size (default: 16)")
    group.add_argument(
        "--vit-dim", type=int, default=None, help="ViT embedding width (default: the preset's)"
    )
    group.add_argument("--vit-depth", type=int, default=None, help="ViT blocks (default: the preset's, 12)")
    group.add_argument(
        "--vit-heads", type=int, default=None, help="ViT attention heads (default: the preset's)"
    )


def backbone_from_args(
    args: argparse.Namespace, in_channels: int, crop_size: int
) -> tuple[str, dict[str, Any]]:
    """(arch, kwargs for `build_backbone`) from the flags above and the data's channels/size."""
    arch = getattr(args, "arch", "resnet50")
    if arch in VIT_PRESETS:
        kwargs: dict[str, Any] = {
            "in_channels": in_channels,
            "image_size": crop_size,
            "patch_size": getattr(args, "patch_size", 16),
        }
        for flag, key in (("vit_dim", "embed_dim"), ("vit_depth", "depth"), ("vit_heads", "num_heads")):
            if getattr(args, flag, None) is not None:
                kwargs[key] = getattr(args, flag)
        return arch, kwargs
    small_stem = getattr(args, "small_stem", None)
    if small_stem is None:
        small_stem = crop_size <= SMALL_STEM_MAX_SIZE
    return arch, {
        "in_channels": in_channels,
        "small_stem": bool(small_stem),
        "width": getattr(args, "width", 1.0),
    }

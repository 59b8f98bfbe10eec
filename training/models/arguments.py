"""The backbone a run's config asks for: (arch, kwargs for `build_backbone`)."""

from __future__ import annotations

from typing import Any

from training.config import RunConfig
from training.models.vit import PRESETS as VIT_PRESETS


def backbone_from_config(config: RunConfig, in_channels: int) -> tuple[str, dict[str, Any]]:
    """(arch, kwargs for `build_backbone`) from the config and the data's channels."""
    if config.arch in VIT_PRESETS:
        kwargs: dict[str, Any] = {
            "in_channels": in_channels,
            "image_size": config.crop_size,
            "patch_size": config.patch_size,
        }
        for value, key in (
            (config.vit_dim, "embed_dim"),
            (config.vit_depth, "depth"),
            (config.vit_heads, "num_heads"),
        ):
            if value is not None:
                kwargs[key] = value
        return config.arch, kwargs
    return config.arch, {"in_channels": in_channels, "small_stem": config.small_stem, "width": config.width}

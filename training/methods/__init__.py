"""One module per paper: each is a `Method` (its model wrapper and loss); the engine is shared.

Each method class declares its paper's settings as data: `Params` (its own hyper-parameters, a
frozen dataclass whose defaults are the paper's), `paper_defaults` (the engine settings the paper
fixes: optimiser, lr, weight decay, batch, epochs, warm-up, schedule, augmentation) and
`small_image_defaults` (the recipe for images <= 64 px). training/cli.py maps them to flags;

    config, _ = parse_config("moco-v2", ["--data", "fashion-mnist", "--arch", "resnet18"])
    method = build_method(config, num_samples=len(dataset), in_channels=dataset.in_channels)
"""

from __future__ import annotations

from typing import Any

from training.config import RunConfig
from training.methods.base import Method, StepOutput
from training.methods.instdisc import InstDisc
from training.methods.moco import MoCoV1, MoCoV2
from training.methods.mocov3 import MoCoV3
from training.methods.neighbours import MinedNeighbours
from training.methods.nnclr import NNCLR
from training.methods.simclr import SimCLR
from training.models.vit import PRESETS as VIT_PRESETS

METHODS: dict[str, type[Method]] = {
    "instdisc": InstDisc,
    "moco-v1": MoCoV1,
    "moco-v2": MoCoV2,
    "moco-v3": MoCoV3,
    "neighbours": MinedNeighbours,
    "nnclr": NNCLR,
    "simclr": SimCLR,
}

__all__ = ["METHODS", "Method", "StepOutput", "build_method", "method_class"]


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: expected one of {sorted(METHODS)}")
    return METHODS[name]


def build_method(config: RunConfig, num_samples: int, in_channels: int) -> Method:
    """The method `config.method` with the config's backbone and hyper-parameters."""
    cls = method_class(config.method)
    arch, backbone_kwargs = backbone_from_config(config, in_channels)
    return cls.from_config(config.params, arch, backbone_kwargs, num_samples)


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

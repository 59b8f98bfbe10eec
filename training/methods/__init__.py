"""One module per paper: each is a `Method` (its model wrapper and loss); the engine is shared.

How an entry point uses this package:

    parser = argparse.ArgumentParser()
    ... engine flags (--optimizer, --lr, --batch-size, --epochs, --augmentation, ...) ...
    add_method_arguments(parser, "moco-v2")   # backbone flags + the method's, sets paper defaults
    args = parser.parse_args()
    method = build_method("moco-v2", args, num_samples=len(dataset),
                          in_channels=dataset.in_channels, crop_size=args.crop_size)

Add one method's arguments per parser: methods share flag names (--moco-t, ...) with
different paper defaults.
"""

from __future__ import annotations

import argparse

from training.methods.base import Method, StepOutput
from training.methods.instdisc import InstDisc
from training.methods.moco import MoCoV1, MoCoV2
from training.methods.mocov3 import MoCoV3
from training.methods.simclr import SimCLR
from training.models.arguments import add_backbone_arguments, backbone_from_args

METHODS: dict[str, type[Method]] = {
    "instdisc": InstDisc,
    "moco-v1": MoCoV1,
    "moco-v2": MoCoV2,
    "moco-v3": MoCoV3,
    "simclr": SimCLR,
}

__all__ = ["METHODS", "Method", "StepOutput", "add_method_arguments", "build_method"]


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: expected one of {sorted(METHODS)}")
    return METHODS[name]


def add_method_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """Backbone flags plus the method's hyper-parameters; `parser.set_defaults` with the paper's
    optimiser, lr, weight decay, batch size, epochs, warm-up and augmentation."""
    add_backbone_arguments(parser)
    method_class(name).add_arguments(parser)


def build_method(
    name: str,
    args: argparse.Namespace,
    num_samples: int,
    in_channels: int | None = None,
    crop_size: int | None = None,
) -> Method:
    """The method `name` configured from parsed flags. in_channels/crop_size default to
    args.in_channels / args.crop_size (3 / 224 when absent)."""
    cls = method_class(name)
    channels = in_channels if in_channels is not None else getattr(args, "in_channels", None) or 3
    size = crop_size if crop_size is not None else getattr(args, "crop_size", None) or 224
    arch, backbone_kwargs = backbone_from_args(args, channels, size)
    return cls.from_args(args, arch, backbone_kwargs, num_samples)

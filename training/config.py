"""One typed, frozen configuration per training run, and the one mapping from settings to flags.

A setting is a dataclass field declared with `setting(default, help)`; its type annotation gives
the flag's type (bool -> --x/--no-x, tuple -> several values, `X | None` -> optional). The engine's
settings are `RunConfig`'s fields; a method's own hyper-parameters are the fields of its `Params`
dataclass (training/methods/), and each method class states its paper's values for both as data
(`paper_defaults`, `small_image_defaults`). `training/cli.py` turns all of it into argparse flags,
reads `--config run.toml`, layers the values and builds the config once:

    engine default < the method's paper < its small-image recipe (images <= 64 px) < file < flags

`RunConfig` checks itself on construction (`ConfigError`, one line), is stored whole in every
checkpoint (`to_dict`) and printed at the start of a run with where each value came from.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.models import ARCH_NAMES, scales_problem

# Where a value came from (printed at start; stored with the config).
DEFAULT, PAPER, SMALL_IMAGE, DATA, FILE, FLAG = "default", "paper", "small-image", "data", "file", "flag"
INIT = "init encoder"  # the network settings of the encoder --init starts from
SERVED_ENCODER = "current"  # `--init current`: the served encoder (a catalogue refresh fills it in)
SMALL_IMAGE_MAX_SIZE = 64  # native image side up to which the small-image recipe applies (CIFAR, MNIST)
SMALL_IMAGE_GRID = 2  # small images' retrieval embedding: the last stage pooled to 2x2 (bench/RESULTS.md)
# Small images are embedded at this multiple of their side (FixRes; bench/RESULTS.md, "Embedding at
# twice the training crop": every 28 px set measured gained)
SMALL_IMAGE_EMBEDDING_SCALE = 2
# ...and also at 3/4 of that side, the two descriptors summed (bench/RESULTS.md, "Two sizes at once")
SMALL_IMAGE_SCALES = (1.0, 0.75)
CONV_ARCHS = ("resnet",)  # prefixes of convolutional backbones (channels_last applies to these)


class ConfigError(ValueError):
    """A setting is invalid or settings contradict each other (the message says which)."""


def setting(
    default: Any, help: str, *, choices: tuple | None = None, flag: str | None = None, group: str = ""
):
    """A field that is also a command-line flag (`--name-with-dashes` unless `flag` names one)."""
    metadata = {"help": help, "choices": choices, "flag": flag, "group": group}
    if isinstance(default, list | dict):
        raise TypeError("use a tuple for sequence defaults (the config is frozen)")
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class MethodParams:
    """A method's own hyper-parameters (subclassed per method, fields declared with `setting`)."""

    def check(self, config: RunConfig) -> None:
        """Reject combinations that cannot run (raise ConfigError)."""


def _default_workers() -> int:
    return min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run is, besides the method's own `params`."""

    method: str = setting("method", "method name (set by the entry point)", group="-")
    params: MethodParams = field(default_factory=MethodParams)
    # data
    data: str = setting(
        "",
        "fashion-mnist | fashion-mnist:test | folder:PATH (recursive) | catalogue[:MONGO_URI]; "
        "not given: refresh from the catalogue (see below)",
        group="data",
    )
    subset: int | None = setting(None, "train on a seeded random N images only", group="data")
    crop_size: int = setting(
        224, "training crop (px); the papers' 224, the native size for images <= 64 px", group="data"
    )
    workers: int = setting(_default_workers(), "image decoding threads", group="data")
    # backbone
    arch: str = setting(
        "resnet50",
        "backbone (every paper here: resnet50; resnet18 --width 0.25 for CPU runs)",
        choices=tuple(ARCH_NAMES),
        group="backbone",
    )
    width: float = setting(
        1.0, "ResNet channel multiplier: 0.25 gives stages of 16/32/64/128 channels", group="backbone"
    )
    small_stem: bool = setting(
        False,
        "ResNet 3x3 stride-1 stem without max-pool (CIFAR variant); on for small images",
        group="backbone",
    )
    embedding_grid: int = setting(
        1,
        "retrieval embedding: the last ResNet stage average-pooled to a GxG grid (G*G*D values); 1 is "
        "the papers' global pool; 2 for small images, whose layout is part of the class "
        "(bench/RESULTS.md: +1.1 points kNN on Fashion-MNIST, +6.7 on glyphs); methods whose "
        "embedding is a head's output (InstDisc) keep 1",
        group="backbone",
    )
    whitening: str = setting(
        "none",
        "retrieval embedding post-processing: pca = L2, centre, PCA-whiten, L2 (Jegou & Chum 2012), "
        "fitted without labels on 4096 (or 4 per dimension) training images' embeddings whenever "
        "the encoder is saved; on for small images (bench/RESULTS.md: SimCLR +3.4 kNN points on "
        "Fashion-MNIST, +6.5 on letters; MoCo v3 +4.8, InstDisc +1.5 / +18); none: the papers'",
        choices=("none", "pca"),
        group="backbone",
    )
    whiten_power: float = setting(
        0.5,
        "whitening strength: eigenvalues^(-p/2); 1 whitens fully, 0.5 (square-rooted) gained in kNN "
        "and precision@10 on both image sets measured",
        group="backbone",
    )
    embedding_size: int | None = setting(
        None,
        "side the saved encoder embeds images at (whitening fit and kNN monitor too); default: the "
        "crop. Random resized crops show objects larger than whole images do, so a larger side matches "
        "what training taught (FixRes, Touvron et al. 2019): twice the crop gained on three 28 px sets "
        "(bench/RESULTS.md, 'Embedding at twice the training crop'), so small images embed at twice "
        "the crop; pooled ResNet embeddings only",
        group="backbone",
    )
    embedding_scales: tuple[float, ...] = setting(
        (1.0,),
        "multi-scale descriptor (Radenovic et al. 2018): the saved encoder also embeds each image "
        "resized by these factors of --embedding-size and sums the unit features; 1 first. Small "
        "images: 1 0.75, which gained on three of four 28 px sets and lost 0.0015 on one "
        "(bench/RESULTS.md, 'Two sizes at once'), for 1.56x the arithmetic; photos: 1 (the papers'); "
        "pooled ResNet embeddings only",
        group="backbone",
    )
    init: str | None = setting(
        None,
        "start from a finished encoder file (e.g. runs/simclr/encoder.pt): its weights and "
        "normalisation; --arch, --width, --small-stem, --crop-size, --embedding-grid, --embedding-size and "
        "--embedding-scales default to its own; "
        "`current` in a catalogue refresh: the encoder the service serves now",
        group="backbone",
    )
    patch_size: int = setting(16, "ViT patch size", group="backbone")
    vit_dim: int | None = setting(None, "ViT embedding width (none: the preset's)", group="backbone")
    vit_depth: int | None = setting(None, "ViT blocks (none: the preset's, 12)", group="backbone")
    vit_heads: int | None = setting(None, "ViT attention heads (none: the preset's)", group="backbone")
    # optimisation
    epochs: int = setting(200, "training epochs", group="optimisation")
    batch_size: int = setting(256, "global batch (all processes together)", group="optimisation")
    lr: float = setting(0.03, "base lr for a batch of 256; used: lr * batch-size / 256", group="optimisation")
    optimizer: str = setting("sgd", "optimiser", choices=("sgd", "lars", "adamw"), group="optimisation")
    optimizer_momentum: float = setting(0.9, "SGD / LARS momentum", flag="--momentum", group="optimisation")
    adam_betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas", group="optimisation")
    weight_decay: float = setting(1e-4, "weight decay", group="optimisation")
    wd_exclude_norm_bias: str = setting(
        "auto",
        "no weight decay (nor LARS adaptation) on norm/bias parameters; auto: yes for lars/adamw "
        "(SimCLR, MoCo v3), no for sgd (the InstDisc and MoCo v1/v2 code)",
        choices=("auto", "yes", "no"),
        group="optimisation",
    )
    warmup_epochs: float = setting(0.0, "linear warm-up before the schedule", group="optimisation")
    lr_schedule: str = setting("cosine", "per-step decay", choices=("cosine", "step"), group="optimisation")
    lr_steps: tuple[float, ...] = setting(
        (), "epochs at which step decay multiplies lr by 0.1", group="optimisation"
    )
    augmentation: str = setting("", "augmentation recipe (training/data/augment.py)", group="optimisation")
    local_crops: int = setting(
        0,
        "multi-crop (SwAV, Caron et al. 2020): this many extra low-resolution views per image, each a "
        "positive of every full-size view; 0: the papers' full-size views only (on 28 px images it "
        "lost at equal compute on both sets measured, bench/RESULTS.md 'Multi-crop')",
        group="optimisation",
    )
    local_crop_size: int | None = setting(
        None, "local views' side in px; none: 3/7 of --crop-size (SwAV's 96 for 224)", group="optimisation"
    )
    local_crop_scale: tuple[float, float] = setting(
        (0.05, 0.4),
        "local views' area fraction of the image (DINO's multi-crop: 0.05-0.4)",
        group="optimisation",
    )
    agc_clip: float | None = setting(
        None, "adaptive gradient clipping lambda (off when not given)", group="optimisation"
    )
    # run
    device: str = setting("auto", "auto: cuda if any", choices=("auto", "cpu", "cuda"), group="run")
    amp: str = setting(
        "auto",
        "mixed precision; auto: bf16 where the device computes it natively (CUDA with bf16, CPUs with "
        "AVX-512 BF16 or AMX), fp32 (none) elsewhere",
        choices=("auto", "none", "bf16", "fp16"),
        group="run",
    )
    channels_last: bool = setting(
        True, "channels-last memory format (convolutional backbones only)", group="run"
    )
    compile: bool = setting(False, "torch.compile the training forward", group="run")
    seed: int = setting(0, "seeds sampling order, initialisation, augmentation", group="run")
    out: Path = setting(Path("runs"), "output folder (default: runs/<method>)", group="run")
    resume: str | None = setting(
        None, "checkpoint path or folder, or `auto` (out/checkpoint.pt)", group="run"
    )
    max_steps: int | None = setting(None, "stop after this many steps (tests, benchmarks)", group="run")
    time_budget: float | None = setting(
        None,
        "seconds for the whole run: warm-up and cosine decay are fitted to it (from the measured step "
        "rate), and it stops cleanly (and saves) when the time is up",
        group="run",
    )
    log_every: int = setting(10, "TensorBoard scalars every N steps", group="run")
    tensorboard: bool = setting(True, "write out/tb", group="run")
    progress: bool = setting(True, "progress bar", group="run")
    device_data_max_mb: int = setting(4096, "keep the data set on the GPU when at most this big", group="run")
    # kNN monitor
    knn_data: str = setting(
        "auto",
        "query set; auto: fashion-mnist:test for fashion-mnist, else a held-out 10%% of the folder",
        group="knn",
    )
    knn_every: int = setting(1, "every E epochs (0: off)", group="knn")
    knn_subset: int | None = setting(None, "at most N memory and N query images", group="knn")
    knn_k: int = setting(200, "neighbours (paper: 200)", group="knn")
    knn_tau: float = setting(0.07, "vote temperature (paper: 0.07)", group="knn")
    # where each value came from (paper / small-image / data / file / flag; absent = engine default)
    sources: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ConfigError(problems[0])
        self.params.check(self)

    def _problems(self):
        for name in (
            "epochs",
            "batch_size",
            "crop_size",
            "log_every",
            "workers",
            "patch_size",
            "embedding_grid",
        ):
            if getattr(self, name) <= 0:
                yield f"--{name.replace('_', '-')} must be positive"
        for name in ("max_steps", "time_budget", "subset", "knn_subset"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                yield f"--{name.replace('_', '-')} must be positive"
        if self.lr <= 0 or self.width <= 0:
            yield "--lr and --width must be positive"
        if self.warmup_epochs < 0 or self.weight_decay < 0 or self.knn_every < 0:
            yield "--warmup-epochs, --weight-decay and --knn-every must be >= 0"
        if not self.augmentation:
            yield "--augmentation is required (this method sets no default)"
        if not 0 < self.whiten_power <= 2:
            yield f"--whiten-power must be in (0, 2], got {self.whiten_power}"
        if self.local_crops < 0 or (self.local_crop_size is not None and self.local_crop_size <= 0):
            yield "--local-crops must be >= 0 and --local-crop-size positive"
        low, high = self.local_crop_scale
        if not 0 < low <= high <= 1:
            yield f"--local-crop-scale needs 0 < low <= high <= 1, got {low} {high}"
        if self.lr_schedule == "step" and not self.lr_steps:
            yield "--lr-schedule step needs --lr-steps (epochs at which to decay)"
        if self.embedding_size is not None and not 8 <= self.embedding_size <= 1024:
            yield f"--embedding-size must be from 8 to 1024 px, got {self.embedding_size}"
        if self.embedding_size not in (None, self.crop_size) and not self.is_convolutional:
            yield f"--embedding-size other than the crop needs a ResNet backbone, not {self.arch}"
        if self.embedding_grid != 1 and not self.is_convolutional:
            yield f"--embedding-grid {self.embedding_grid} needs a ResNet backbone, not {self.arch}"
        if problem := scales_problem(tuple(self.embedding_scales)):
            yield f"--embedding-{problem}"
        elif len(self.embedding_scales) > 1 and not self.is_convolutional:
            yield f"--embedding-scales needs a ResNet backbone, not {self.arch}"
        if self.amp == "fp16" and self.device == "cpu":
            yield "--amp fp16 needs a CUDA device (GradScaler); use --amp bf16 on CPU"
        world = world_size()
        if self.batch_size % world:
            yield f"--batch-size {self.batch_size} is not divisible by {world} processes"

    @property
    def is_convolutional(self) -> bool:
        return self.arch.startswith(CONV_ARCHS)

    @property
    def embedding_side(self) -> int:
        """The side the saved encoder embeds at: --embedding-size, or the crop."""
        return self.embedding_size or self.crop_size

    @property
    def local_size(self) -> int:
        """The local views' side: --local-crop-size, or SwAV's 96/224 of the full crop."""
        return self.local_crop_size or max(1, round(self.crop_size * 3 / 7))

    def source(self, name: str) -> str:
        return dict(self.sources).get(name, DEFAULT)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the engine's settings at top level, the method's under "params"."""
        values = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        values["params"] = {
            f.name: _plain(getattr(self.params, f.name)) for f in dataclasses.fields(self.params)
        }
        values["sources"] = dict(self.sources)
        return values

    def describe(self) -> str:
        """The settings, one group per line, each non-default value tagged with where it came from."""
        lines = []
        for group, names in _groups(type(self)).items():
            lines.append(f"{group}: " + ", ".join(self._shown(name, getattr(self, name)) for name in names))
        params = self.params
        names = [f.name for f in dataclasses.fields(params)]
        if names:
            lines.append(f"{self.method}: " + ", ".join(self._shown(n, getattr(params, n)) for n in names))
        return "\n".join(lines)

    def _shown(self, name: str, value: Any) -> str:
        source = self.source(name)
        return f"{name}={_plain(value)}" + ("" if source == DEFAULT else f" [{source}]")


def world_size() -> int:
    """Processes of this run (torchrun's WORLD_SIZE; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _groups(cls: type) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for f in dataclasses.fields(cls):
        group = f.metadata.get("group")
        if group and group != "-":
            groups.setdefault(group, []).append(f.name)
    return groups


def settings_of(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` that are flags."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata and f.metadata.get("group") != "-"]


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(kind: Any, value: Any, name: str) -> Any:
    """`value` (from a TOML file or a layer of defaults) as the field's type, or ConfigError."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        if value is None:
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        item = args[0]
        if len(args) == 2 and args[1] is not Ellipsis and len(value) != 2:
            raise ConfigError(f"{name} must have 2 values, got {value!r}")
        return tuple(coerce(item, v, name) for v in value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is Path and isinstance(value, str | Path):
        return Path(value)
    if kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"{name} must be {getattr(kind, '__name__', kind)}, got {value!r}")

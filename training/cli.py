"""The common command line of `training.instdisc`, `training.moco` and `training.simclr`.

One generic mapping (training/flags.py) turns the engine's settings (`RunConfig`) and the method's
(`Params`, `paper_defaults`, `small_image_defaults` on its class) into flags, so `--help` shows the
defaults of the paper being reproduced. `parse_config` builds the run's one frozen `RunConfig`:

    engine default < paper < small-image recipe (images <= 64 px) < --config run.toml < flags

and prints it with where each value came from. Bad input ends with one line on stderr: exit 2 for
usage errors (invalid settings included), 1 for runtime errors.

A higher layer can add a way to run (`RunMode`): the entry points pass the catalogue refresh's
(service/refresh/mode.py), which this module never imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from training import distributed as dist
from training.checkpoint import resolve_resume
from training.commands import OneLineParser, run_guarded
from training.config import (
    CONV_ARCHS,
    DATA,
    DEFAULT,
    FILE,
    FLAG,
    INIT,
    PAPER,
    SERVED_ENCODER,
    SMALL_IMAGE,
    SMALL_IMAGE_EMBEDDING_SCALE,
    SMALL_IMAGE_GRID,
    SMALL_IMAGE_MAX_SIZE,
    SMALL_IMAGE_SCALES,
    ConfigError,
    RunConfig,
)
from training.data.augment import NORMALISATION, build_augmentation
from training.data.datasets import DataError, ImageDataset, load_dataset, native_image_size, split_held_out
from training.data.images import resize_center_crop
from training.embed import embed_in_shards
from training.encoder import Encoder, EncoderError, read_encoder_record, training_size
from training.engine import Trainer
from training.flags import add_settings, flag_names, layered, read_config_file
from training.knn_monitor import KnnMonitor
from training.methods import Method, build_method, method_class

__all__ = ["OneLineParser", "RunMode", "build_parser", "build_trainer", "parse_config", "train_main"]


class RunMode(Protocol):
    """Another way to run a training command, added by an entry point from a higher layer."""

    options_type: type  # a dataclass of the mode's own settings (flags via training.flags)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def applies(self, given: Mapping[str, Any]) -> bool:
        """Whether the given settings (flags and file) ask for this mode."""
        ...

    def defaults(self, given: Mapping[str, Any], method: str) -> tuple[dict[str, Any], int | None]:
        """(settings the mode fills unless given, the images' native side if it knows it)."""
        ...

    def run(self, config: RunConfig, options: Any) -> int: ...


def build_parser(
    method: type[Method],
    prog: str,
    description: str,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    mode: RunMode | None = None,
) -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if extra:
        extra(parser)
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="a TOML file of settings (keys: the flag names, e.g. lr = 0.3); flags given too override it",
    )
    paper, small = method.paper_values(), method.small_image_defaults
    source = method.defaults_source
    add_settings(parser, RunConfig, paper, small, source=source)
    if mode is not None:
        mode.add_arguments(parser)
    add_settings(
        parser,
        method.Params,
        paper,
        small,
        title=f"{method.name} ({source} defaults)",
        description=method.notes,
        source=source,
    )
    return parser


def parse_config(
    method_name: str,
    argv: list[str] | None,
    prog: str = "train",
    description: str = "",
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    mode: RunMode | None = None,
) -> tuple[RunConfig, Any]:
    """(the run's config, the mode's options or None); usage errors exit 2 with one line."""
    method = method_class(method_name)
    parser = build_parser(method, prog, description, extra, mode)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if k != "version"}
    try:
        return build_config(method, given, mode)
    except (ConfigError, DataError) as exc:
        parser.error(str(exc))


def build_config(method: type[Method], given: dict[str, Any], mode: RunMode | None) -> tuple[RunConfig, Any]:
    """Layer the defaults under what was given (file, then flags) and build the config once."""
    names = flag_names(RunConfig, method.Params, *([mode.options_type] if mode is not None else []))
    from_file = read_config_file(given.pop("config"), names) if "config" in given else {}
    explicit = [(FILE, from_file), (FLAG, given)]
    merged = {**from_file, **given}
    options = None
    filled: dict[str, Any] = {}
    native: int | None = None
    if mode is not None:
        option_names = {f.name for f in dataclasses.fields(mode.options_type)}
        mode_given = {k: v for k, v in merged.items() if k in option_names}
        explicit = [
            (source, {k: v for k, v in values.items() if k not in option_names})
            for source, values in explicit
        ]
        if mode.applies(merged):
            _, option_values, _ = layered([(FLAG, mode_given)], RunConfig, mode.options_type)
            options = mode.options_type(**option_values)
            filled, native = mode.defaults(merged, method.name)
    if merged.get("init") == SERVED_ENCODER:
        if "init" not in filled:
            raise ConfigError(
                f"--init {SERVED_ENCODER} is the encoder the service serves: only a catalogue refresh "
                "(no --data) has one; give --init FILE"
            )
        merged["init"] = filled["init"]  # the mode's resolved file replaces the word
        explicit = [(source, {k: v for k, v in values.items() if k != "init"}) for source, values in explicit]
    data = merged.get("data", filled.get("data"))
    if not data:
        raise ConfigError("--data is required (fashion-mnist | fashion-mnist:test | folder:PATH)")
    if native is None:
        native = native_image_size(data)
    layers: list[tuple[str, Mapping[str, Any]]] = [
        (DEFAULT, {"method": method.name, "out": Path("runs") / method.name}),
        (method.defaults_source, method.paper_values()),
    ]
    small_images = native is not None and native <= SMALL_IMAGE_MAX_SIZE
    if small_images:
        layers.append((DATA, {"crop_size": native}))
        small = {"small_stem": True, **method.small_image_defaults}
        arch = merged.get("arch", filled.get("arch", method.paper_values().get("arch", RunConfig.arch)))
        if not method.embedding_is_head and str(arch).startswith(CONV_ARCHS):
            small.setdefault("embedding_grid", SMALL_IMAGE_GRID)
            small.setdefault("embedding_scales", SMALL_IMAGE_SCALES)
        small.setdefault("whitening", "pca")  # measured for SimCLR, MoCo v3 and InstDisc's head
        layers.append((SMALL_IMAGE, small))
    layers.append(("catalogue", filled))
    if init := merged.get("init", filled.get("init")):
        layers.append((INIT, init_encoder_settings(init)))
    layers += explicit
    engine, params, sources = layered(layers, RunConfig, method.Params)
    resolved_arch = str(engine.get("arch", RunConfig.arch))  # --init's or a flag's included
    pooled_resnet = not method.embedding_is_head and resolved_arch.startswith(CONV_ARCHS)
    if small_images and pooled_resnet and engine.get("embedding_size") is None:
        engine["embedding_size"] = SMALL_IMAGE_EMBEDDING_SCALE * engine["crop_size"]  # the resolved crop
        sources["embedding_size"] = SMALL_IMAGE
    scale_paper_milestones(engine, sources, method.paper_values().get("epochs"))
    if method.embedding_is_head and engine.get("embedding_grid", 1) != 1:
        raise ConfigError(
            f"--embedding-grid applies to a pooled backbone; {method.name}'s embedding is its head"
        )
    if method.embedding_is_head and len(engine.get("embedding_scales", (1.0,))) > 1:
        raise ConfigError(
            f"--embedding-scales applies to a pooled backbone; {method.name}'s embedding is its head"
        )
    if engine.get("local_crops", 0) and not method.accepts_local_crops:
        raise ConfigError(f"--local-crops: {method.name} has no multi-crop loss (simclr has)")
    config = RunConfig(**engine, params=method.Params(**params), sources=tuple(sorted(sources.items())))
    return config, options


def init_encoder_settings(path: str) -> dict[str, Any]:
    """The network settings of the encoder that `--init` starts from (they default to its own)."""
    try:
        record = read_encoder_record(path)
    except EncoderError as exc:
        raise ConfigError(f"--init: {exc}") from None
    network = record["network"]
    kwargs = network.get("kwargs", {})
    settings = {"arch": network["arch"], "crop_size": training_size(record)}  # not its embedding size
    settings["embedding_grid"] = network.get("grid", 1)
    settings["embedding_scales"] = tuple(network.get("scales", (1.0,)))
    if "train_size" in record:  # it embeds at another size than it trained at: so does the new one
        settings["embedding_size"] = record["input_size"]
    flags = {"width": "width", "small_stem": "small_stem", "patch_size": "patch_size"}
    flags |= {"embed_dim": "vit_dim", "depth": "vit_depth", "num_heads": "vit_heads"}  # a ViT's
    settings |= {flag: kwargs[key] for key, flag in flags.items() if key in kwargs}
    return settings


def scale_paper_milestones(engine: dict[str, Any], sources: dict[str, str], paper_epochs: int | None) -> None:
    """The paper's step-decay epochs are points of its run (InstDisc: 120 and 160 of 200 epochs): a
    run of another length decays at the same fractions (a 100-epoch run would otherwise never
    anneal). Milestones given by flag or file are taken as they are."""
    if sources.get("lr_steps") != PAPER or not paper_epochs or engine["epochs"] == paper_epochs:
        return
    engine["lr_steps"] = tuple(round(e * engine["epochs"] / paper_epochs, 3) for e in engine["lr_steps"])
    sources["lr_steps"] = f"{PAPER}, scaled to {engine['epochs']} epochs"


def train_main(
    method_name: str,
    argv: list[str] | None,
    prog: str,
    description: str,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    mode: RunMode | None = None,
) -> int:
    """Parse, check and train (or run `mode` when the command line asks for it); the return value
    is the process exit code."""
    config, options = parse_config(method_name, argv, prog, description, extra, mode)
    if dist.is_main_process():
        print(f"settings ([source] where not the engine's default):\n{config.describe()}", flush=True)
    if options is not None:
        return run_guarded(lambda: mode.run(config, options))
    return run_guarded(lambda: train(config))


def train(config: RunConfig) -> int:
    resolve_resume(config.resume, config.out)  # a missing checkpoint fails before any data loads
    device = dist.init_distributed(config.device)
    trainer = build_trainer(config, device)
    summary = trainer.fit()
    if dist.is_main_process():
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()}
        print(f"done: {shown}; outputs in {config.out}")
    return 0


def knn_sets(config: RunConfig, train_set: ImageDataset) -> tuple[ImageDataset, KnnMonitor | None]:
    """(data to train on, kNN monitor or None). See `--knn-data`."""
    if not config.knn_every:
        return train_set, None
    if config.knn_data != "auto":
        queries = load_dataset(
            config.knn_data, config.crop_size, in_channels=train_set.in_channels, progress=config.progress
        )
        memory = train_set
    elif config.data.startswith("fashion-mnist"):
        queries, memory = load_dataset("fashion-mnist:test", config.crop_size), train_set
    elif train_set.is_labelled:
        train_set, queries = split_held_out(train_set)
        memory = train_set
    else:
        warnings.warn(f"{train_set.name} has no sub-folder labels: the kNN monitor is off", stacklevel=1)
        return train_set, None
    labelled = memory.labels >= 0
    memory = memory.select(labelled.nonzero().squeeze(1), name=f"{memory.name}:labelled")
    if queries.class_names != memory.class_names:
        raise DataError(f"kNN query classes {queries.class_names} differ from the training classes")
    if config.knn_subset:
        memory, queries = memory.subset(config.knn_subset), queries.subset(config.knn_subset)
    return train_set, KnnMonitor(
        memory,
        queries,
        k=config.knn_k,
        tau=config.knn_tau,
        progress=config.progress,
        input_size=config.embedding_side,
    )


def normalisation(data: str, images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std: Fashion-MNIST's own, ImageNet's (the papers') for other RGB data,
    and measured on (up to 10k of) the images themselves for other greyscale data."""
    in_channels = images.shape[1]
    key = "fashion-mnist" if data.startswith("fashion-mnist") else "imagenet"
    mean, std = NORMALISATION[key]
    if len(mean) == in_channels:
        return list(mean), list(std)
    sample = images[:10_000].float().div(255.0).transpose(0, 1).reshape(in_channels, -1)  # Cx(N*H*W)
    return sample.mean(1).tolist(), sample.std(1).clamp_min(1e-3).tolist()


def initial_embeddings(
    config: RunConfig, record: dict[str, Any], data: ImageDataset, device: torch.device
) -> torch.Tensor:
    """NxD: the --init encoder's retrieval embeddings of the training images (whitened where it
    is), each rank embedding its shard (training.embed's), every rank getting all of them."""
    encoder = Encoder(record, device, amp=config.amp)
    return embed_in_shards(  # at the size the encoder embeds at (`at_input_size`), as it retrieves
        lambda batch: torch.from_numpy(encoder.embed(resize_center_crop(batch, encoder.input_size))),
        data.images,
        desc="embedding with --init",
        progress=config.progress,
    )


def build_trainer(config: RunConfig, device: torch.device) -> Trainer:
    """Data, kNN monitor, method, augmentation and engine for the parsed command line."""
    torch.manual_seed(config.seed)  # model initialisation: identical on every rank
    initial = read_encoder_record(config.init) if config.init else None
    train_set = load_dataset(
        config.data,
        config.crop_size,
        config.subset,
        seed=config.seed,
        in_channels=initial["in_channels"] if initial else None,
        workers=config.workers,
        progress=config.progress,
    )
    train_set, knn = knn_sets(config, train_set)
    mean, std = normalisation(config.data, train_set.images)
    method = build_method(config, len(train_set), train_set.in_channels)
    if initial is not None:
        mean, std = initial["mean"], initial["std"]  # the network learnt on inputs normalised so
        method.start_from_encoder(initial)
        if method.needs_initial_embeddings and resolve_resume(config.resume, config.out) is None:
            # (a resumed run has what the method made of them in its checkpoint: its buffers)
            embeddings = initial_embeddings(config, initial, train_set, device)
            line = method.use_initial_embeddings(embeddings, train_set.labels, train_set.images)
            if dist.is_main_process():
                print(line, flush=True)
    augment = build_augmentation(config.augmentation, config.crop_size, train_set.in_channels, mean, std)
    local_augment = None
    if config.local_crops:
        local_augment = build_augmentation(
            config.augmentation, config.local_size, train_set.in_channels, mean, std, config.local_crop_scale
        )
    torch.manual_seed(config.seed + 1 + dist.get_rank())  # augmentation randomness: different per rank
    return Trainer(
        config, method, augment, train_set, mean, std, method.encoder_spec(), knn, device, local_augment
    )

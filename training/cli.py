"""The common command line of `training.instdisc`, `training.moco` and `training.simclr`.

The engine's flags are defined here; each method then adds its own hyper-parameters and sets the
paper's defaults for optimiser, lr, weight decay, batch size, epochs, warm-up and augmentation
(`add_arguments(parser)`), so `--help` shows the defaults of the paper being reproduced.
Bad input ends with one line on stderr: exit 2 for usage errors, 1 for runtime errors.

A higher layer can add a way to run (`RunMode`): the entry points pass the catalogue refresh's
(service/refresh/mode.py), which this module never imports.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from training import distributed as dist
from training.checkpoint import resolve_resume
from training.commands import HelpFormatter, OneLineParser, run_guarded
from training.data.augment import NORMALISATION, build_augmentation
from training.data.datasets import DataError, ImageDataset, load_dataset, split_held_out
from training.engine import Trainer
from training.knn_monitor import KnnMonitor
from training.methods import add_method_arguments, build_method

__all__ = ["OneLineParser", "RunMode", "build_parser", "build_trainer", "resolve_defaults", "train_main"]


class RunMode(Protocol):
    """Another way to run a training command, added by an entry point from a higher layer."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def applies(self, args: argparse.Namespace) -> bool:
        """Whether the parsed command line asks for this mode."""
        ...

    def resolve(self, args: argparse.Namespace) -> None:
        """Fill the mode's defaults (before the generic ones)."""
        ...

    def run(self, args: argparse.Namespace) -> int: ...


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's flags; the backbone's (--arch, --width, --small-stem, ...) come with the method's."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        default=None,
        help="fashion-mnist | fashion-mnist:test | folder:PATH (recursive) | catalogue[:MONGO_URI]; "
        "not given: refresh from the catalogue (see below)",
    )
    data.add_argument("--subset", type=int, default=None, help="train on a seeded random N images only")
    data.add_argument(
        "--crop-size",
        type=int,
        default=None,
        help="training crop (px); default: 28 for fashion-mnist (native), 224 otherwise (the papers)",
    )
    data.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding threads"
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=200, help="training epochs")
    optim.add_argument("--batch-size", type=int, default=256, help="global batch (all processes together)")
    optim.add_argument(
        "--lr", type=float, default=0.03, help="base lr for a batch of 256; used: lr * batch-size / 256"
    )
    optim.add_argument("--optimizer", default="sgd", choices=["sgd", "lars", "adamw"], help="optimiser")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD / LARS momentum")
    optim.add_argument("--adam-betas", type=float, nargs=2, default=[0.9, 0.999], help="AdamW betas")
    optim.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay")
    optim.add_argument(
        "--wd-exclude-norm-bias",
        default="auto",
        choices=["auto", "yes", "no"],
        help="no weight decay (nor LARS adaptation) on norm/bias parameters; auto: yes for lars/adamw "
        "(SimCLR, MoCo v3), no for sgd (the InstDisc and MoCo v1/v2 code)",
    )
    optim.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up before the schedule")
    optim.add_argument("--lr-schedule", default="cosine", choices=["cosine", "step"], help="per-step decay")
    optim.add_argument(
        "--lr-steps",
        type=float,
        nargs="*",
        default=[],
        help="epochs at which step decay multiplies lr by 0.1",
    )
    optim.add_argument("--augmentation", default=None, help="augmentation recipe (training/data/augment.py)")
    optim.add_argument(
        "--agc-clip", type=float, default=None, help="adaptive gradient clipping lambda (off when not given)"
    )

    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if any")
    run.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="mixed precision")
    run.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    run.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    run.add_argument("--seed", type=int, default=0, help="seeds sampling order, initialisation, augmentation")
    run.add_argument("--out", type=Path, default=None, help="output folder; default: runs/<method>")
    run.add_argument(
        "--resume", default=None, help="checkpoint path or folder, or `auto` (out/checkpoint.pt)"
    )
    run.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many steps (tests, benchmarks)"
    )
    run.add_argument(
        "--time-budget", type=float, default=None, help="stop cleanly (and save) after this many seconds"
    )
    run.add_argument("--log-every", type=int, default=10, help="TensorBoard scalars every N steps")
    run.add_argument(
        "--tensorboard", action=argparse.BooleanOptionalAction, default=True, help="write out/tb"
    )
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    run.add_argument(
        "--device-data-max-mb",
        type=int,
        default=4096,
        help="keep the data set on the GPU when at most this big",
    )

    knn = parser.add_argument_group("kNN monitor (weighted kNN, Wu et al. 2018)")
    knn.add_argument(
        "--knn-data",
        default="auto",
        help="query set; auto: fashion-mnist:test for fashion-mnist, else a held-out 10%% of the folder",
    )
    knn.add_argument("--knn-every", type=int, default=1, help="every E epochs (0: off)")
    knn.add_argument("--knn-subset", type=int, default=None, help="at most N memory and N query images")
    knn.add_argument("--knn-k", type=int, default=200, help="neighbours (paper: 200)")
    knn.add_argument("--knn-tau", type=float, default=0.07, help="vote temperature (paper: 0.07)")


def build_parser(
    method_name: str,
    prog: str,
    description: str,
    paper_defaults: dict[str, Any] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    mode: RunMode | None = None,
) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=description, formatter_class=HelpFormatter)
    if extra:
        extra(parser)
    add_engine_arguments(parser)
    if mode is not None:
        mode.add_arguments(parser)
    add_method_arguments(parser, method_name)  # backbone flags, the paper's hyper-parameters and defaults
    parser.set_defaults(**(paper_defaults or {}))
    return parser


def resolve_defaults(
    args: argparse.Namespace, parser: argparse.ArgumentParser, mode: RunMode | None = None
) -> None:
    """Fill the data-dependent defaults and reject incompatible flags (usage errors, exit 2)."""
    args.mode = mode if mode is not None and mode.applies(args) else None
    if args.mode is not None:
        args.mode.resolve(args)
    if args.data is None:
        parser.error("--data is required (fashion-mnist | fashion-mnist:test | folder:PATH)")
    if args.crop_size is None:
        args.crop_size = 28 if args.data.startswith("fashion-mnist") else 224
    if args.out is None:
        args.out = Path("runs") / args.method
    if args.augmentation is None:
        parser.error("--augmentation is required (this method sets no default)")
    for name in ("epochs", "batch_size", "crop_size", "log_every"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.max_steps is not None and args.max_steps <= 0:
        parser.error("--max-steps must be positive")
    if args.time_budget is not None and args.time_budget <= 0:
        parser.error("--time-budget must be positive")
    if args.subset is not None and args.subset <= 0:
        parser.error("--subset must be positive")
    if args.lr_schedule == "step" and not args.lr_steps:
        parser.error("--lr-schedule step needs --lr-steps (epochs at which to decay)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} is not divisible by {world} processes")
    splits = getattr(args, "num_splits", None)
    if getattr(args, "shuffle_bn", False) and world == 1 and splits and args.batch_size % splits:
        parser.error(
            f"--batch-size {args.batch_size} does not divide into --num-splits {splits} (shuffling-BN splits)"
        )


def train_main(
    method_name: str,
    argv: list[str] | None,
    prog: str,
    description: str,
    paper_defaults: dict[str, Any] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    mode: RunMode | None = None,
) -> int:
    """Parse, check and train (or run `mode` when the command line asks for it); the return value
    is the process exit code."""
    parser = build_parser(method_name, prog, description, paper_defaults, extra, mode)
    args = parser.parse_args(argv)
    args.method = method_name
    resolve_defaults(args, parser, mode)
    return run_guarded(lambda: train(args))


def train(args: argparse.Namespace) -> int:
    if args.mode is not None:
        return args.mode.run(args)
    resolve_resume(args.resume, Path(args.out))  # a missing checkpoint fails before any data loads
    device = dist.init_distributed(args.device)
    trainer = build_trainer(args, device)
    summary = trainer.fit()
    if dist.is_main_process():
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()}
        print(f"done: {shown}; outputs in {args.out}")
    return 0


def knn_sets(args: argparse.Namespace, train_set: ImageDataset) -> tuple[ImageDataset, KnnMonitor | None]:
    """(data to train on, kNN monitor or None). See `--knn-data`."""
    if not args.knn_every:
        return train_set, None
    if args.knn_data != "auto":
        queries = load_dataset(args.knn_data, args.crop_size, in_channels=train_set.in_channels)
        memory = train_set
    elif args.data.startswith("fashion-mnist"):
        queries, memory = load_dataset("fashion-mnist:test", args.crop_size), train_set
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
    if args.knn_subset:
        memory, queries = memory.subset(args.knn_subset), queries.subset(args.knn_subset)
    return train_set, KnnMonitor(memory, queries, k=args.knn_k, tau=args.knn_tau)


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


def build_trainer(args: argparse.Namespace, device: torch.device) -> Trainer:
    """Data, kNN monitor, method, augmentation and engine for the parsed command line."""
    torch.manual_seed(args.seed)  # model initialisation: identical on every rank
    train_set = load_dataset(args.data, args.crop_size, args.subset, seed=args.seed, workers=args.workers)
    train_set, knn = knn_sets(args, train_set)
    args.in_channels = train_set.in_channels
    args.num_samples = len(train_set)
    mean, std = normalisation(args.data, train_set.images)
    method = build_method(args.method, args, len(train_set), train_set.in_channels, args.crop_size)
    augment = build_augmentation(args.augmentation, args.crop_size, train_set.in_channels, mean, std)
    torch.manual_seed(args.seed + 1 + dist.get_rank())  # augmentation randomness: different per rank
    return Trainer(args, method, augment, train_set, mean, std, method.encoder_spec(), knn, device)

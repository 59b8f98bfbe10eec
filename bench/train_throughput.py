"""Images/s of the full training step vs the bare step, and multi-process scaling.

full: what `Trainer.train_step` does each step: sample indices, gather the uint8 images, move them
      to the device, augment every view there, forward, backward, optimiser step, on_step_end.
bare: the same model, optimiser and batch on pre-made augmented tensors: forward, backward, step.
The goal is full >= 0.9 x bare (the data path costs under 10%).

    python bench/train_throughput.py                                 # CPU defaults: tiny ResNet-18
    python bench/train_throughput.py --device cuda --amp bf16 --arch resnet18 --width 1 --batch-size 256
    python bench/train_throughput.py --nproc 2                       # scaling 1 -> 2 processes (torchrun)

Flags after the bench's own are training flags (`python -m training.moco --help`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training import distributed as dist  # noqa: E402
from training.cli import build_trainer, parse_config  # noqa: E402
from training.data.datasets import epoch_indices  # noqa: E402
from training.engine import Trainer  # noqa: E402

CPU_DEFAULTS = ["--arch", "resnet18", "--width", "0.25", "--batch-size", "64", "--subset", "4096"]
RESULT_TAG = "THROUGHPUT_JSON "
ROUNDS = 3


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def time_steps(step, count: int, device: torch.device) -> float:
    synchronise(device)
    started = time.perf_counter()
    for i in range(count):
        step(i)
    synchronise(device)
    return time.perf_counter() - started


def measure(trainer: Trainer, steps: int, warmup: int) -> dict[str, float]:
    """Global images/s of the full and the bare step (every rank runs both)."""
    device, method = trainer.device, trainer.method
    batches = epoch_indices(len(trainer.dataset), 0, 0, trainer.rank, trainer.world, trainer.local_batch)
    batches = batches.repeat(1 + (steps + warmup) // len(batches), 1)

    def full(i: int) -> None:
        trainer.train_step(batches[i])

    fixed = batches[0]
    images = trainer.images[fixed.to(trainer.images.device)].to(device)
    views = trainer.views(images)
    if trainer.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    fixed = fixed.to(device)

    def bare(i: int) -> None:
        with torch.autocast(device.type, dtype=trainer.amp_dtype, enabled=trainer.amp_dtype is not None):
            output = trainer.forward(views, fixed)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.scaler.scale(output.loss).backward()
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
        method.on_step_end(0.5)

    time_steps(full, warmup, device)
    time_steps(bare, warmup, device)
    # Alternate the two in rounds and keep each one's best: other load on the machine then
    # affects both alike instead of whichever happened to run second.
    full_seconds = bare_seconds = float("inf")
    for _ in range(ROUNDS):
        full_seconds = min(full_seconds, time_steps(full, steps, device))
        bare_seconds = min(bare_seconds, time_steps(bare, steps, device))
    images_per_step = trainer.config.batch_size
    return {
        "full_images_per_s": steps * images_per_step / full_seconds,
        "bare_images_per_s": steps * images_per_step / bare_seconds,
        "processes": trainer.world,
        "global_batch": images_per_step,
    }


def worker(bench: argparse.Namespace, training_argv: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        config, _ = parse_config(
            bench.method,
            training_argv + ["--out", out, "--knn-every", "0", "--no-tensorboard", "--no-progress"],
        )
        device = dist.init_distributed(config.device)
        trainer = build_trainer(config, device)
        result = measure(trainer, bench.steps, bench.warmup)
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result["ratio"] = result["full_images_per_s"] / result["bare_images_per_s"]
    return result


def launch(nproc: int, bench: argparse.Namespace, training_argv: list[str]) -> dict[str, float]:
    """Run the worker under torchrun with `nproc` processes; the global batch grows with nproc."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += [__file__, "--worker", "--method", bench.method, "--steps", str(bench.steps)]
    command += ["--warmup", str(bench.warmup), "--", *training_argv]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise SystemExit(f"torchrun with {nproc} processes failed:\n{done.stderr[-3000:]}")


def with_global_batch(training_argv: list[str], nproc: int) -> list[str]:
    """Weak scaling: each process keeps the single-process batch."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--batch-size", type=int, default=None)
    known, rest = parser.parse_known_args(training_argv)
    return [*rest, "--batch-size", str((known.batch_size or 64) * nproc)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", default="moco-v2", help="instdisc | moco-v1 | moco-v2 | moco-v3 | simclr")
    parser.add_argument("--steps", type=int, default=20, help=f"timed steps per round ({ROUNDS} rounds)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--nproc", type=int, default=1, help="also measure N processes under torchrun")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    bench, training_argv = parser.parse_known_args()
    training_argv = [a for a in training_argv if a != "--"]
    if not any(a.startswith("--arch") for a in training_argv):
        training_argv = CPU_DEFAULTS + training_argv
    if not any(a.startswith("--data") for a in training_argv):
        training_argv = ["--data", "fashion-mnist", *training_argv]
    if bench.worker:
        result = worker(bench, training_argv)
        if dist.is_main_process():
            print(RESULT_TAG + json.dumps(result), flush=True)
        dist.cleanup()
        return
    single = worker(bench, training_argv)
    print(f"method {bench.method} on {single['device']}, global batch {single['global_batch']}")
    print(f"  full step  {single['full_images_per_s']:10.1f} images/s")
    print(f"  bare step  {single['bare_images_per_s']:10.1f} images/s")
    verdict = "meets" if single["ratio"] >= 0.9 else "misses"
    print(f"  full / bare = {single['ratio']:.3f} ({verdict} the goal of >= 0.90)")
    if bench.nproc > 1:
        batch = next(
            (int(v) for k, v in zip(training_argv, training_argv[1:], strict=False) if k == "--batch-size"),
            64,
        )
        one = launch(1, bench, with_global_batch(training_argv, 1))
        many = launch(bench.nproc, bench, with_global_batch(training_argv, bench.nproc))
        scaling = many["full_images_per_s"] / one["full_images_per_s"]
        print(f"scaling (torchrun, {batch} images per process per step):")
        print(f"  1 process    {one['full_images_per_s']:10.1f} images/s (full step)")
        print(
            f"  {bench.nproc} processes  {many['full_images_per_s']:10.1f} images/s (full step): "
            f"x{scaling:.2f} = {scaling / bench.nproc:.0%} of linear"
        )


if __name__ == "__main__":
    main()

"""Training checkpoints: atomic writes, `--resume auto`, and the RNG states that exact resume needs.

A checkpoint is one `torch.save`d dict (see `Trainer.checkpoint_state` in training/engine.py):
model, optimiser, scheduler, scaler, RNG states, epoch, step within the epoch, config, metrics
and the "encoder" record of training/encoder.py, so `Encoder.load(checkpoint)` works on it too.
"""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint is missing or unusable (the message says why)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temporary file, fsync, rename: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def save_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def resolve_resume(resume: str | None, out_dir: Path) -> Path | None:
    """`auto` -> `out_dir/checkpoint.pt` if it exists (else start fresh); a path must exist."""
    if not resume:
        return None
    if resume == "auto":
        candidate = out_dir / CHECKPOINT_NAME
        return candidate if candidate.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {resume}")
    return path


CHECKPOINT_FORMAT = "ssl-retrieval/checkpoint/v1"
# Settings that must match for a resumed run to continue the same sample order and model.
RESUME_MUST_MATCH = ("method", "data", "subset", "arch", "width", "crop_size", "batch_size", "seed")


@dataclass
class TrainState:
    """Where a run is, beyond its weights and optimiser (a checkpoint restores it)."""

    epoch: int = 0  # the epoch in progress (or the next one, when step_in_epoch == 0)
    step_in_epoch: int = 0  # steps of `epoch` already done
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) every --log-every

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> TrainState:
        return cls(
            saved["epoch"],
            saved["step_in_epoch"],
            saved["global_step"],
            list(saved.get("history", [])),
            [tuple(point) for point in saved.get("loss_curve", [])],
        )


def check_resumable(saved: dict[str, Any], path: Path, config: dict[str, Any], world: int) -> None:
    """A checkpoint continues this run only with the same data order, model and process count."""
    trained = saved.get("config", {})
    for key in RESUME_MUST_MATCH:
        if key in trained and trained[key] != config[key]:
            raise CheckpointError(
                f"--resume: {path} was trained with {key}={trained[key]!r}, this run has {config[key]!r}"
            )
    if saved.get("world_size", 1) != world:
        raise CheckpointError(
            f"--resume: {path} was written by {saved.get('world_size')} processes, not {world}"
        )


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"{path} is not a readable checkpoint: {exc}") from exc
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise CheckpointError(f"{path} is not a training checkpoint (no model/epoch entries)")
    return state


def capture_rng_states() -> dict[str, Any]:
    """Python, NumPy, torch CPU and every CUDA device's generator (augmentation draws from these)."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])

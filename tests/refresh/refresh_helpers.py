"""Shared by the refresh tests: the catalogue they run on and the refresh command as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from index.store import CRASH_ENV as INDEX_CRASH_ENV
from service.refresh.stages import CRASH_ENV as REFRESH_CRASH_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]
CATALOGUE_SIZE = 300
# The smallest refresh that still exercises every stage: a tiny MoCo v2 for three steps on 2 cores.
TINY_REFRESH = (
    "--arch", "resnet18", "--width", "0.125", "--batch-size", "32", "--epochs", "1", "--max-steps", "3",
    "--moco-k", "128", "--knn-every", "0", "--no-progress", "--no-tensorboard", "--workers", "1",
)  # fmt: skip
REFRESH_TIMEOUT_S = 240


@dataclass
class CatalogueDb:
    uri: str
    db_name: str
    ids: list[int]  # in Fashion-MNIST test-split order 0..CATALOGUE_SIZE-1
    labels: list[str]
    images: list[bytes]  # PNG bytes as uploaded


def refresh_env(data_dir: Path, catalogue: CatalogueDb, **extra: str) -> dict[str, str]:
    crash_hooks = (REFRESH_CRASH_ENV, INDEX_CRASH_ENV)
    env = {key: value for key, value in os.environ.items() if key not in crash_hooks}
    env.update(
        MONGO_URI=catalogue.uri, MONGO_DB=catalogue.db_name, DATA_DIR=str(data_dir), OMP_NUM_THREADS="1"
    )
    env.update(extra)
    return env


def run_refresh(
    data_dir: Path,
    catalogue: CatalogueDb,
    *args: str,
    env: dict[str, str] | None = None,
    command: tuple[str, ...] = ("training.moco", *TINY_REFRESH),
) -> subprocess.CompletedProcess:
    """`python -m training.moco` (or `command`: module, then flags) in catalogue mode (no --data),
    as an operator would run it."""
    return subprocess.run(
        [sys.executable, "-m", *command, *args],
        cwd=REPO_ROOT,
        env=refresh_env(data_dir, catalogue, **(env or {})),
        capture_output=True,
        text=True,
        timeout=REFRESH_TIMEOUT_S,
    )

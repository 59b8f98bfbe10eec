"""Fixtures for the index tests: small clustered data sets, an embeddings file, an encoder file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from index.embeddings import Embeddings, save_embeddings
from index.synthetic import clustered_vectors, random_ids
from training.encoder import ENCODER_FORMAT

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_VERSION = "test-0123456789ab"


def _run_module(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture()
def run_module():
    """`run_module("index.build", "--out", d, env={...})`: run `python -m` from the repository root
    with one OpenMP thread, capturing output."""
    return _run_module


@pytest.fixture()
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture()
def model_version() -> str:
    return MODEL_VERSION


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """FAISS's OpenMP threads spin-wait; on a shared 2-core machine that turns seconds into minutes.
    Correctness tests do not need them (the thread count is per calling thread in libgomp)."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(previous)


@pytest.fixture(scope="session")
def small_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors 3000x32, ids, labels in 0..9)."""
    vectors, labels = clustered_vectors(3000, 32, num_clusters=10, spread=1.0, seed=7)
    return vectors, random_ids(3000, seed=7), labels


@pytest.fixture()
def embeddings_file(tmp_path: Path, small_data) -> Path:
    vectors, ids, labels = small_data
    path = tmp_path / "emb.npz"
    names = [f"class-{i}" for i in range(10)]
    save_embeddings(path, Embeddings(vectors, ids, MODEL_VERSION, labels, names))
    return path


def write_encoder_file(path: Path, version: str) -> Path:
    """A minimal file in the encoder format (the index only reads its format and version)."""
    torch.save({"format": ENCODER_FORMAT, "version": version, "embed_dim": 32, "state_dict": {}}, path)
    return path


@pytest.fixture()
def make_encoder():
    """`make_encoder(path, version)` writes a minimal encoder file."""
    return write_encoder_file


@pytest.fixture()
def encoder_file(tmp_path: Path) -> Path:
    return write_encoder_file(tmp_path / "encoder.pt", MODEL_VERSION)

"""Two gloo ranks on the CPU under torchrun: exact resume, and embedding shards gathered in order."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from index.embeddings import load_embeddings

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
# 96 images, global batch 32: 16 per rank, 3 steps per epoch; shuffling BN across the 2 ranks.
TRAIN = [
    "--data", "fashion-mnist", "--version", "2", "--arch", "resnet18", "--width", "0.0625",
    "--subset", "96", "--batch-size", "32",
    "--moco-k", "64", "--epochs", "2", "--knn-every", "0", "--no-tensorboard", "--no-progress",
    "--device", "cpu",
]  # fmt: skip


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_two_rank_resume_continues_exactly_and_embed_matches_one_rank(tmp_path):
    torchrun(2, "-m", "training.moco", *TRAIN, "--max-steps", "4", "--out", str(tmp_path / "straight"))
    torchrun(2, "-m", "training.moco", *TRAIN, "--max-steps", "2", "--out", str(tmp_path / "split"))
    halfway = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert (halfway["epoch"], halfway["step_in_epoch"], halfway["world_size"]) == (0, 2, 2)
    assert len(halfway["rng"]) == 2 and not torch.equal(
        halfway["rng"][0]["torch"], halfway["rng"][1]["torch"]
    )
    resumed = torchrun(
        2,
        "-m",
        "training.moco",
        *TRAIN,
        "--max-steps",
        "4",
        "--resume",
        "auto",
        "--out",
        str(tmp_path / "split"),
    )
    assert "resumed from" in resumed.stdout + resumed.stderr
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert straight["global_step"] == split["global_step"] == 4
    assert straight["model"].keys() == split["model"].keys()
    for key in straight["model"]:  # weights, BN statistics, key encoder, queue and its pointer
        assert torch.equal(straight["model"][key], split["model"][key]), key

    # Embedding: 301 rows over 2 ranks (151 + 150, the last shard padded) == one process.
    encoder = str(tmp_path / "straight" / "encoder.pt")
    common = [
        "--checkpoint",
        encoder,
        "--data",
        "fashion-mnist:test",
        "--subset",
        "301",
        "--batch-size",
        "64",
    ]
    torchrun(2, "-m", "training.embed", *common, "--out", str(tmp_path / "two.npz"))
    single = subprocess.run(
        [sys.executable, "-m", "training.embed", *common, "--out", str(tmp_path / "one.npz")],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    one, two = load_embeddings(tmp_path / "one.npz"), load_embeddings(tmp_path / "two.npz")
    assert one.vectors.shape == two.vectors.shape == (301, one.dim)
    assert np.array_equal(one.ids, two.ids) and np.array_equal(one.labels, two.labels)
    assert np.allclose(one.vectors, two.vectors, atol=1e-5)


def test_two_rank_neighbour_fine_tuning_mines_the_same_table_as_one_process(tmp_path):
    """training.neighbours under torchrun: the ranks mine from the --init encoder (and filter by
    the pixels' agreement) the table one process mines, train on it and save the encoder."""
    common = ["--data", "fashion-mnist", "--arch", "resnet18", "--width", "0.0625", "--subset", "96"]
    common += [
        "--batch-size",
        "32",
        "--knn-every",
        "0",
        "--no-tensorboard",
        "--no-progress",
        "--device",
        "cpu",
    ]
    torchrun(1, "-m", "training.simclr", *common, "--max-steps", "1", "--out", str(tmp_path / "init"))
    init = ["--init", str(tmp_path / "init" / "encoder.pt"), "--max-steps", "2", "--agree-pixels", "20"]
    data_args = [a for a in common if a not in ("--arch", "resnet18", "--width", "0.0625")]
    torchrun(1, "-m", "training.neighbours", *data_args, *init, "--out", str(tmp_path / "one"))
    torchrun(2, "-m", "training.neighbours", *data_args, *init, "--out", str(tmp_path / "two"))
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["model"]
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["model"]
    assert torch.equal(one["neighbours"], two["neighbours"]) and torch.equal(one["drawable"], two["drawable"])
    assert not (two["neighbours"] == torch.arange(96).view(-1, 1)).any()  # mined: never the image itself
    assert 0 < two["drawable"].float().mean() < 1  # the pixels' agreement filtered, alike on both ranks
    assert (tmp_path / "two" / "encoder.pt").exists()

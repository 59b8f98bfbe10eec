"""`training.embed` and the weighted-kNN accuracy shared by the monitor and `training.evaluate`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from index.embeddings import load_embeddings
from training.data.datasets import load_dataset
from training.embed import embed_in_shards
from training.encoder import Encoder, make_encoder_record, save_encoder
from training.knn_monitor import knn_accuracy
from training.models import build_embedding_network, network_spec

REPO = Path(__file__).resolve().parents[2]


def tiny_encoder_file(path: Path, in_channels: int = 1, size: int = 28) -> Path:
    torch.manual_seed(0)
    spec = network_spec("resnet18", {"in_channels": in_channels, "small_stem": True, "width": 0.0625})
    network = build_embedding_network(spec)
    record = make_encoder_record(
        "tiny", spec, network, 32, size, in_channels, [0.286] * in_channels, [0.353] * in_channels
    )
    save_encoder(path, record)
    return path


def run_module(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # busy shared cores: one thread is many times faster
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )


def test_embed_in_shards_single_process_is_the_plain_embedding():
    images = torch.randint(0, 255, (37, 1, 4, 4), dtype=torch.uint8)
    embed = lambda batch: batch.float().flatten(1)  # noqa: E731 - identity features: rows must line up
    out = embed_in_shards(embed, images, batch_size=8)
    assert torch.equal(out, images.float().flatten(1))


def test_knn_accuracy_matches_a_direct_weighted_vote():
    generator = torch.Generator().manual_seed(0)
    memory = torch.nn.functional.normalize(torch.randn(50, 8, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(20, 8, generator=generator), dim=1)
    memory_labels = torch.randint(0, 4, (50,), generator=generator)
    query_labels = torch.randint(0, 4, (20,), generator=generator)
    k, tau = 10, 0.07
    hits1 = hits5 = 0
    for q, label in zip(queries, query_labels, strict=True):  # w_c = sum_{i in N_k} exp(s_i / tau) 1(c_i = c)
        sims = memory @ q
        top = sims.argsort(descending=True)[:k]
        weights = torch.zeros(4, dtype=torch.float64)
        for i in top:
            weights[memory_labels[i]] += torch.exp(sims[i].double() / tau)
        ranked = weights.argsort(descending=True)
        hits1 += int(ranked[0] == label)
        hits5 += int(label in ranked[:5])
    top1, top5 = knn_accuracy(memory, memory_labels, queries, query_labels, 4, k=k, tau=tau, chunk=7)
    assert top1 == pytest.approx(100 * hits1 / 20) and top5 == pytest.approx(100 * hits5 / 20) == 100.0


def test_embed_cli_writes_vectors_ids_labels_and_version(tmp_path):
    encoder_path = tiny_encoder_file(tmp_path / "encoder.pt")
    out = tmp_path / "emb.npz"
    result = run_module("training.embed", "--checkpoint", str(encoder_path), "--data", "fashion-mnist:test")
    assert result.returncode == 2 and "--out" in result.stderr  # required flag: usage error
    result = run_module(
        "training.embed", "--checkpoint", str(encoder_path), "--data", "fashion-mnist:test",
        "--subset", "300", "--batch-size", "64", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    emb = load_embeddings(out)
    data = load_dataset("fashion-mnist:test", 28).subset(300)
    encoder = Encoder.load(encoder_path, amp="auto")  # the command's default: bf16 where native
    assert emb.vectors.shape == (300, 32) and emb.model_version == encoder.version
    assert np.array_equal(emb.ids, data.ids.numpy()) and np.array_equal(emb.labels, data.labels.numpy())
    assert emb.class_names == data.class_names
    assert np.allclose(emb.vectors, encoder.embed(data.images), atol=1e-6)
    assert np.allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, atol=1e-5)


def test_embed_cli_converts_rgb_folders_for_a_grey_encoder_and_reports_bad_input(tmp_path):
    from PIL import Image

    encoder_path = tiny_encoder_file(tmp_path / "encoder.pt")
    (tmp_path / "imgs" / "shoes").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (30 + i, 40), (i * 40, 100, 200)).save(tmp_path / "imgs" / "shoes" / f"{i}.png")
    out = tmp_path / "folder.npz"
    ok = run_module(
        "training.embed",
        "--checkpoint",
        str(encoder_path),
        "--data",
        f"folder:{tmp_path / 'imgs'}",
        "--out",
        str(out),
    )
    assert ok.returncode == 0, ok.stderr
    assert load_embeddings(out).vectors.shape == (3, 32) and load_embeddings(out).class_names == ["shoes"]
    missing = run_module(
        "training.embed",
        "--checkpoint",
        str(tmp_path / "nope.pt"),
        "--data",
        "fashion-mnist",
        "--out",
        str(out),
    )
    empty = run_module(
        "training.embed",
        "--checkpoint",
        str(encoder_path),
        "--data",
        f"folder:{tmp_path / 'imgs' / 'shoes' / 'x'}",
        "--out",
        str(tmp_path / "e.npz"),
    )
    for result, message in ((missing, "encoder checkpoint not found"), (empty, "not a directory")):
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip()[7:]}"]
        assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "e.npz").exists()


def test_evaluate_cli_reports_the_weighted_knn_of_the_encoder(tmp_path):
    import json

    encoder_path = tiny_encoder_file(tmp_path / "encoder.pt")
    out = tmp_path / "eval.json"
    result = run_module(
        "training.evaluate", "--checkpoint", str(encoder_path), "--data", "fashion-mnist:test",
        "--subset", "400", "--linear", "--linear-epochs", "3", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "weighted kNN (k=200, tau=0.07)" in result.stdout and "linear probe" in result.stdout
    report = json.loads(out.read_text())
    encoder = Encoder.load(encoder_path, amp="auto")  # the command's default: bf16 where native
    memory = load_dataset("fashion-mnist", 28).subset(400)
    queries = load_dataset("fashion-mnist:test", 28).subset(400)
    expected = knn_accuracy(
        torch.from_numpy(encoder.embed(memory.images)), memory.labels,
        torch.from_numpy(encoder.embed(queries.images)), queries.labels, 10,
    )  # fmt: skip
    assert (report["knn/top1"], report["knn/top5"]) == pytest.approx(expected, abs=1e-6)
    assert 0 <= report["linear/top1"] <= report["linear/top5"] <= 100
    assert report["memory_size"] == report["query_size"] == 400

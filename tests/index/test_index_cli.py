"""The CLIs end to end, and their answer to bad input: one line on stderr, exit 1 (2 for usage),
nothing published, the current version untouched."""

from __future__ import annotations

import numpy as np
import pytest

from index.embeddings import Embeddings, save_embeddings
from index.store import IndexStore


@pytest.fixture()
def published(tmp_path, embeddings_file, encoder_file, run_module):
    out = tmp_path / "idx"
    result = run_module(
        "index.build", "--embeddings", embeddings_file, "--out", out, "--encoder", encoder_file, "--quiet"
    )
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def assert_one_line_error(result, exit_code: int, pattern: str) -> None:
    assert result.returncode == exit_code, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert pattern in lines[-1], lines
    if exit_code == 1:
        assert len(lines) == 1 and lines[0].startswith("error: "), lines


def test_build_evaluate_knn_end_to_end(published, embeddings_file, run_module, model_version):
    out, summary = published
    store = IndexStore(out)
    version = store.current_version()
    assert version and version in summary and "type              flat" in summary
    manifest = store.read_manifest()
    assert manifest["model_version"] == model_version and manifest["encoder_version"] == model_version
    assert manifest["recall"]["measured"] >= 0.95 and manifest["source"] == str(embeddings_file)
    assert manifest["latency_ms"]["single_query_median"] > 0

    evaluation = run_module("index.evaluate", out)
    assert evaluation.returncode == 0, evaluation.stderr
    assert "recall@10" in evaluation.stdout and "queries/s, 1 thread" in evaluation.stdout
    # Flat is exact: recall is 1 at every depth.
    assert all(f"recall@{k:<3}" in evaluation.stdout for k in (1, 10, 100))
    assert evaluation.stdout.count("1.0000") == 3

    knn = run_module("index.knn", "--eval", "--index", out, "--queries", embeddings_file)
    assert knn.returncode == 0, knn.stderr
    top1 = float(knn.stdout.split("top-1 ")[1].split("%")[0])
    assert 50.0 < top1 <= 100.0  # 10 well-separated clusters


def test_no_publish_publishes_nothing(tmp_path, embeddings_file, run_module):
    out = tmp_path / "idx"
    result = run_module(
        "index.build", "--embeddings", embeddings_file, "--out", out, "--no-publish", "--quiet"
    )
    assert result.returncode == 0 and "not published" in result.stdout
    assert IndexStore(out).versions() == []


def _bad_embeddings(tmp_path, kind: str):
    path = tmp_path / f"{kind}.npz"
    vectors = np.random.default_rng(0).standard_normal((20, 32)).astype(np.float32)
    ids = np.arange(20, dtype=np.int64)
    if kind == "nan":
        vectors[3, 4] = np.nan
    elif kind == "inf":
        vectors[5, 0] = np.inf
    elif kind == "duplicate":
        ids[7] = ids[8]
    elif kind == "empty-matrix":
        vectors, ids = vectors[:0], ids[:0]
    if kind == "empty-file":
        path.write_bytes(b"")
    else:
        np.savez(path, vectors=vectors, ids=ids, model_version=np.array("m"))
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("nan", "NaN or infinity"),
        ("inf", "NaN or infinity"),
        ("duplicate", "duplicate ids"),
        ("empty-matrix", "non-empty"),
        ("empty-file", "not a valid embeddings file"),
        ("missing", "not found"),
    ],
)
def test_bad_embeddings_publish_nothing(tmp_path, published, run_module, kind, message):
    out, _ = published
    store = IndexStore(out)
    before = (store.current_version(), store.versions())
    path = tmp_path / "missing.npz" if kind == "missing" else _bad_embeddings(tmp_path, kind)
    result = run_module("index.build", "--embeddings", path, "--out", out, "--quiet")
    assert_one_line_error(result, 1, message)
    assert (store.current_version(), store.versions()) == before
    assert store.load().ntotal == 3000


def test_encoder_of_another_model_is_refused(tmp_path, published, embeddings_file, run_module, make_encoder):
    out, _ = published
    store = IndexStore(out)
    before = (store.current_version(), store.versions())
    other = make_encoder(tmp_path / "other.pt", "moco-v2-ffffffffffff")
    result = run_module("index.build", "--embeddings", embeddings_file, "--out", out, "--encoder", other)
    assert_one_line_error(result, 1, "moco-v2-ffffffffffff")
    assert (store.current_version(), store.versions()) == before


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--embeddings", "e.npz", "--out", "d", "--type", "lsh"],
        ["--embeddings", "e.npz", "--out", "d", "--max-memory", "lots"],
        ["--embeddings", "e.npz", "--out", "d", "--target-recall", "1.5"],
    ],
)
def test_usage_errors_exit_2(run_module, args):
    result = run_module("index.build", *args)
    assert result.returncode == 2 and "usage:" in result.stderr and "Traceback" not in result.stderr


def test_queries_of_wrong_dimension(tmp_path, published, run_module):
    out, _ = published
    path = tmp_path / "q16.npz"
    rng = np.random.default_rng(1)
    save_embeddings(path, Embeddings(rng.standard_normal((5, 16)), np.arange(5), "m", np.zeros(5, np.int64)))
    result = run_module("index.knn", "--eval", "--index", out, "--queries", path)
    assert_one_line_error(result, 1, "dimension 16")
    result = run_module("index.evaluate", out, "--queries", path)
    assert_one_line_error(result, 1, "dimension")


def test_missing_or_corrupt_versions(tmp_path, published, embeddings_file, run_module):
    out, _ = published
    store = IndexStore(out)
    version = store.current_version()
    result = run_module("index.evaluate", tmp_path / "nowhere")
    assert_one_line_error(result, 1, "no index published")
    (out / "CURRENT").write_text("20990101T000000000000Z-abcdef\n")
    result = run_module("index.knn", "--eval", "--index", out, "--queries", embeddings_file)
    assert_one_line_error(result, 1, "does not exist")
    store.set_current(version)
    (store.version_dir(version) / "index.faiss").write_bytes(b"\0" * 64)
    result = run_module("index.evaluate", out)
    assert_one_line_error(result, 1, "corrupt index.faiss")

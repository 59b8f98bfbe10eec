"""Shared version storage: N processes publishing to one store never corrupt it or lose a publish
(directory store under its lock; synced stores over a shared directory and over S3 via moto's
server), and S3Storage's compare-and-set and visibility rules against a real HTTP S3 endpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from index.search_index import SearchIndex
from index.storage import FileSystemStorage, S3Storage
from index.store import CurrentMovedError, IndexStore
from index.synced_store import SyncedIndexStore, open_store

ROOT = Path(__file__).resolve().parents[2]
WRITER = Path(__file__).parent / "store_writer.py"
BUCKET = "index-store"  # created by the s3_endpoint fixture (tests/conftest.py)
WORKERS, PUBLISHES = 3, 4


def _credentials() -> dict:
    return {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}


def _s3(endpoint: str, prefix: str) -> S3Storage:
    import boto3

    return S3Storage(BUCKET, prefix, client=boto3.client("s3", endpoint_url=endpoint, **_credentials()))


def _run_writers(cache_dirs: list[Path], storage_url: str | None, env: dict[str, str]) -> int:
    """Run the writers (they start publishing together, at a barrier); returns their lost races."""
    barrier = cache_dirs[0].parent / f"barrier-{time.monotonic_ns()}"
    barrier.mkdir()
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                str(WRITER),
                str(cache),
                str(worker),
                str(PUBLISHES),
                str(barrier),
                str(WORKERS),
                *([storage_url] if storage_url else []),
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for worker, cache in enumerate(cache_dirs)
    ]
    lost = 0
    for process in processes:
        output, error = process.communicate(timeout=300)
        assert process.returncode == 0, error[-2000:]
        lost += int(output.split()[-1])
    print(f"{WORKERS} writers x {PUBLISHES} publishes: {lost} lost races retried")
    return lost


def _assert_linear_and_complete(store: IndexStore) -> None:
    """Every publish made current extends the previous CURRENT: the chain back from CURRENT holds
    every successful publish, and the final index holds every writer's every vector."""
    chain, version = [], store.current_version()
    while version is not None:
        manifest = store.read_manifest(version)
        chain.append(version)
        version = manifest.get("parent_version")
    assert len(chain) == WORKERS * PUBLISHES, chain
    final = store.load()
    expected = {w * 1000 + s for w in range(WORKERS) for s in range(PUBLISHES)}
    assert set(final.ids().tolist()) == expected
    for version in chain:  # every version on the chain is complete and loadable
        assert store.load(version).ntotal == store.read_manifest(version)["ntotal"]


def test_concurrent_publishers_on_one_directory_store(tmp_path: Path) -> None:
    _run_writers([tmp_path / "store"] * WORKERS, None, {})
    _assert_linear_and_complete(IndexStore(tmp_path / "store"))


def test_concurrent_publishers_through_a_shared_directory_storage(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    _run_writers([tmp_path / f"cache-{w}" for w in range(WORKERS)], f"file://{shared}", {})
    _assert_linear_and_complete(SyncedIndexStore(tmp_path / "reader", FileSystemStorage(shared)))
    assert IndexStore(shared).load().ntotal == WORKERS * PUBLISHES  # same layout as a directory store


def test_concurrent_publishers_through_s3(tmp_path: Path, s3_endpoint: str) -> None:
    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    _run_writers([tmp_path / f"machine-{w}" for w in range(WORKERS)], f"s3://{BUCKET}/race", env)
    _assert_linear_and_complete(SyncedIndexStore(tmp_path / "reader", _s3(s3_endpoint, "race")))


def test_s3_compare_and_set_and_complete_versions_only(
    tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")):
        monkeypatch.setenv(name, value)  # boto3's default chain, as a deployment would configure it
    storage = _s3(s3_endpoint, "unit")
    assert storage.read_current() is None and storage.versions() == []
    assert storage.compare_and_set_current(None, "v1")
    assert not storage.compare_and_set_current(None, "v2")  # someone published first
    assert not storage.compare_and_set_current("v0", "v2")
    assert storage.compare_and_set_current("v1", "v2") and storage.read_current() == "v2"

    # A version without its manifest (an upload cut short) is not listed and cannot be fetched.
    partial = "20261201T000000000000Z-aaaaaa"
    storage.client.put_object(Bucket=BUCKET, Key=f"unit/versions/{partial}/index.faiss", Body=b"x")
    assert storage.versions() == []

    store = SyncedIndexStore(tmp_path / "a", storage)
    index = SearchIndex.empty_flat(4)
    index.add(np.eye(4, dtype="float32"), np.arange(1, 5, dtype=np.int64))
    with pytest.raises(CurrentMovedError):
        store.publish(index, expected_current="not-the-current-one")
    assert storage.read_current() == "v2"  # a refused publish leaves CURRENT alone
    version = store.publish(index, expected_current="v2")
    assert storage.read_current() == version
    assert len(storage.versions()) == 2  # the refused one was uploaded, never made current (prune's job)

    # Another machine (an empty cache) reads the manifest without downloading, then loads it.
    other = open_store(tmp_path / "b", f"s3://{BUCKET}/unit", endpoint_url=s3_endpoint)
    assert other.read_manifest()["ntotal"] == 4 and not (tmp_path / "b" / "versions" / version).exists()
    assert other.load().contains([1, 4]).all()
    storage.delete_version(version)
    assert version not in storage.versions()

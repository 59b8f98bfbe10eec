"""Atomic publishing: a process killed after any publish step leaves a current, loadable version;
plus versions, pruning, manifests and load errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from index.factory import build_index
from index.store import CRASH_ENV, CRASH_EXIT_CODE, PUBLISH_STEPS, TMP_PREFIX, IndexStore, IndexStoreError

# Publishes one more vector on top of the current version, in a child process.
CHILD = """
import sys, numpy as np
from index.store import IndexStore
store = IndexStore(sys.argv[1])
index = store.load()
index.add(np.ones((1, index.dim), np.float32), np.array([424242]))
store.publish(index)
"""


@pytest.fixture()
def store_with_version(tmp_path, small_data, encoder_file):
    vectors, ids, labels = small_data
    index = build_index(vectors[:500], ids[:500], "flat", {}, labels=labels[:500], progress=False)
    store = IndexStore(tmp_path / "idx")
    version = store.publish(index, encoder_path=encoder_file)
    return store, version


@pytest.mark.parametrize("step", PUBLISH_STEPS)
def test_crash_at_any_step_leaves_a_loadable_current_version(store_with_version, step, repo_root):
    store, old = store_with_version
    env = {**os.environ, CRASH_ENV: step, "OMP_NUM_THREADS": "1"}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(store.root)],
        cwd=repo_root,
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert child.returncode == CRASH_EXIT_CODE, child.stderr
    current = store.current_version()
    loaded = store.load()
    if PUBLISH_STEPS.index(step) < PUBLISH_STEPS.index("current_replaced"):
        assert current == old and loaded.ntotal == 500 and 424242 not in loaded
    else:  # killed after the atomic replace: the new version is complete and current
        assert current != old and loaded.ntotal == 501 and 424242 in loaded
    assert loaded.encoder_path is not None and loaded.encoder_path.is_file()
    # Leftovers of the killed publish are not versions, and get cleaned.
    assert all(not v.startswith(TMP_PREFIX) for v in store.versions())
    store.clean_stale(older_than_s=0)
    assert not list(store.versions_dir.glob(f"{TMP_PREFIX}*")) and not list(store.root.glob("CURRENT.tmp*"))
    assert store.load().ntotal == loaded.ntotal


def test_publish_steps_run_in_order(store_with_version):
    store, _ = store_with_version
    seen: list[str] = []
    store.publish(store.load(), on_step=seen.append)
    assert seen == list(PUBLISH_STEPS)


def test_manifest_and_files(store_with_version, encoder_file, model_version):
    store, version = store_with_version
    directory = store.version_dir(version)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["version"] == version and manifest["ntotal"] == 500 and manifest["dim"] == 32
    assert manifest["index_type"] == "flat" and manifest["metric"] == "inner_product"
    assert manifest["encoder_version"] == model_version
    assert (directory / "encoder.pt").read_bytes() == encoder_file.read_bytes()
    assert np.load(directory / "labels.npy").shape == (500, 2)
    # Republishing a loaded index keeps the encoder and records its parent.
    second = store.publish(store.load())
    assert store.read_manifest(second)["parent_version"] == version
    assert (store.version_dir(second) / "encoder.pt").is_file()


def test_versions_sort_by_time_and_prune_keeps_newest_and_current(store_with_version):
    store, first = store_with_version
    index = store.load()
    made = [first] + [store.publish(index) for _ in range(4)]
    assert store.versions() == made  # names sort in creation order
    store.set_current(made[0])  # roll back to the oldest
    deleted = store.prune(keep=2)
    assert sorted(deleted) == made[1:3]
    assert store.versions() == [made[0], *made[3:]]
    assert store.load().manifest["version"] == made[0]


def test_make_current_false_publishes_without_switching(store_with_version):
    store, first = store_with_version
    other = store.publish(store.load(), make_current=False)
    assert store.current_version() == first and other in store.versions()


def test_load_errors_are_index_store_errors(tmp_path, store_with_version):
    with pytest.raises(IndexStoreError, match="no index published"):
        IndexStore(tmp_path / "empty").load()
    store, version = store_with_version
    (store.root / "CURRENT").write_text("20990101T000000000000Z-abcdef\n")
    with pytest.raises(IndexStoreError, match="does not exist"):
        store.load()
    store.set_current(version)
    (store.version_dir(version) / "index.faiss").write_bytes(b"not a faiss index")
    with pytest.raises(IndexStoreError, match="corrupt"):
        store.load()
    (store.version_dir(version) / "manifest.json").write_text("{oops")
    with pytest.raises(IndexStoreError, match="corrupt manifest.json"):
        store.load()
    shutil.rmtree(store.version_dir(version))
    with pytest.raises(IndexStoreError):
        store.load(version)
    with pytest.raises(IndexStoreError, match="not a valid version name"):
        store.load("../../etc")


def test_publish_with_expected_current_refuses_when_current_moved(tmp_path):
    """The service republishes its adds only if nobody (a refresh) switched CURRENT meanwhile."""
    from index.search_index import SearchIndex
    from index.store import CurrentMovedError

    store = IndexStore(tmp_path)
    first = store.publish(SearchIndex.empty_flat(8))
    second = store.publish(SearchIndex.empty_flat(8))  # e.g. a refresh
    with pytest.raises(CurrentMovedError):
        store.publish(SearchIndex.empty_flat(8), expected_current=first)
    assert store.current_version() == second
    third = store.publish(SearchIndex.empty_flat(8), expected_current=second)
    assert store.current_version() == third

"""Stable ids: they survive add/remove/persist/load for every index type, and a removed id never
comes back from search (HNSW's deleted set and rebuild included)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from index import search_index
from index.factory import build_index
from index.search_index import DuplicateIdError, SearchIndex
from index.store import IndexStore
from index.synthetic import clustered_vectors, random_ids
from index.vectors import VectorError

PARAMS = {
    "flat": {},
    "ivf": {"nlist": 16, "nprobe": 16},
    # No OPQ rotation: its training is slow and irrelevant to id handling (test_index_auto covers it).
    "ivfpq": {"nlist": 16, "nprobe": 16, "pq_m": 8, "pq_nbits": 8, "opq": False},
    "hnsw": {"M": 16, "efConstruction": 40, "efSearch": 64},
}


def returned_ids(index: SearchIndex, queries: np.ndarray, k: int) -> set[int]:
    ids = index.search(queries, k)[1]
    return set(ids[ids >= 0].tolist())


@pytest.mark.parametrize("index_type", list(PARAMS))
def test_ids_survive_add_remove_persist_load(tmp_path, small_data, index_type):
    vectors, ids, labels = small_data
    index = build_index(vectors, ids, index_type, PARAMS[index_type], labels=labels, progress=False)
    assert index.ntotal == len(ids)
    np.testing.assert_array_equal(index.ids(), np.sort(ids))

    removed = ids[:200]
    assert index.remove(removed) == 200
    assert index.remove(removed[:10]) == 0  # already gone
    extra_vectors, _ = clustered_vectors(50, 32, num_clusters=10, spread=1.0, seed=99)
    extra_ids = random_ids(50, seed=99)
    index.add(extra_vectors, extra_ids, labels=np.full(50, 3))
    expected = np.sort(np.concatenate([ids[200:], extra_ids]))
    np.testing.assert_array_equal(index.ids(), expected)

    store = IndexStore(tmp_path / "idx")
    version = store.publish(index)
    loaded = store.load()
    assert loaded.manifest["version"] == version and loaded.index_type == index_type
    np.testing.assert_array_equal(loaded.ids(), expected)
    assert loaded.contains(removed).sum() == 0 and loaded.contains(extra_ids).all()
    np.testing.assert_array_equal(loaded.labels_for(extra_ids), np.full(50, 3))
    np.testing.assert_array_equal(loaded.labels_for(ids[200:210]), labels[200:210])
    assert (loaded.labels_for(removed) == -1).all()

    # Each added vector finds itself (exhaustive nprobe / generous efSearch); removed ids never appear,
    # not even when asking for every vector in the index.
    top1 = loaded.search(extra_vectors, 1)[1][:, 0]
    if index_type != "ivfpq":  # PQ codes are lossy: a near neighbour may outscore the vector itself
        np.testing.assert_array_equal(top1, extra_ids)
    assert not returned_ids(loaded, vectors[:200], 100) & set(removed.tolist())
    everything = loaded.search(vectors[:3], loaded.ntotal + 5)[1]
    assert not set(everything.ravel().tolist()) & set(removed.tolist())
    assert (everything[:, -5:] == -1).all()  # padding beyond ntotal

    # A memory-mapped load can still be mutated (copied into memory first) and republished.
    loaded.remove(extra_ids[:5])
    store.publish(loaded)
    again = store.load()
    assert again.ntotal == len(expected) - 5 and not again.contains(extra_ids[:5]).any()


@pytest.mark.parametrize("index_type", list(PARAMS))
def test_duplicate_ids_are_rejected_and_nothing_is_added(small_data, index_type):
    vectors, ids, _ = small_data
    index = build_index(vectors, ids, index_type, PARAMS[index_type], progress=False)
    with pytest.raises(DuplicateIdError, match="already in the index"):
        index.add(vectors[:2], np.array([ids[5], 123], dtype=np.int64))
    assert index.ntotal == len(ids) and not index.contains([123]).any()
    with pytest.raises(VectorError, match="duplicate ids"):
        index.add(vectors[:2], np.array([7, 7]))
    with pytest.raises(VectorError, match="dimension"):
        index.add(np.ones((1, 16), np.float32), np.array([8]))
    with pytest.raises(VectorError, match="NaN"):
        index.add(np.full((1, 32), np.nan, np.float32), np.array([9]))
    assert index.ntotal == len(ids)


def test_hnsw_deleted_set_keeps_k_results_and_rebuilds(tmp_path, small_data):
    vectors, ids, _ = small_data
    index = build_index(vectors, ids, "hnsw", PARAMS["hnsw"], progress=False)
    query = vectors[:1]
    before = index.search(query, 20)[1][0]
    index.remove(before[:10])  # the 10 nearest neighbours of the query
    assert index.deleted_count == 10
    after = index.search(query, 20)[1][0]
    assert (after >= 0).all(), "over-fetching keeps k results despite deleted vectors"
    assert not set(after.tolist()) & set(before[:10].tolist())
    np.testing.assert_array_equal(after[:10], before[10:])  # the next ones move up

    # Persisted with the version and still filtered after loading.
    store = IndexStore(tmp_path / "idx")
    store.publish(index)
    loaded = store.load()
    assert loaded.deleted_count == 10 and loaded.manifest["deleted_count"] == 10
    assert not set(loaded.search(query, 20)[1][0].tolist()) & set(before[:10].tolist())

    # Re-adding a deleted id with a new vector: search finds the new vector under that id, never the old one.
    revived = int(before[0])
    loaded.add(-vectors[:1], np.array([revived]))
    assert loaded.search(-vectors[:1], 1)[1][0, 0] == revived
    assert revived not in loaded.search(query, 20)[1][0].tolist()

    # Crossing the rebuild fraction compacts the graph: no deleted vectors remain stored.
    many = loaded.ids()[: int(0.25 * loaded.ntotal)]
    loaded.remove(many)
    assert loaded.deleted_count == 0 and loaded.faiss_index.ntotal == loaded.ntotal
    assert not returned_ids(loaded, vectors[:50], 50) & set(many.tolist())


def test_empty_flat_index_pads_results():
    index = SearchIndex.empty_flat(8)
    scores, ids = index.search(np.ones((2, 8), np.float32), 3)
    assert (ids == -1).all() and np.isneginf(scores).all()
    index.add(np.eye(8, dtype=np.float32)[:2], np.array([10, 20]))
    scores, ids = index.search(np.eye(8, dtype=np.float32)[:1], 3)
    np.testing.assert_array_equal(ids[0], [10, 20, -1])
    np.testing.assert_allclose(scores[0, :2], [1.0, 0.0], atol=1e-6)


def test_hnsw_compaction_runs_beside_searches_and_mutations(small_data, monkeypatch):
    """The graph is rebuilt without the index's lock: a search, an add and removes made while it
    builds all go through, and the swapped graph holds exactly what they left."""
    vectors, ids, _ = small_data
    monkeypatch.setattr(search_index, "COMPACT_CHUNK", 1000)
    index = build_index(vectors, ids, "hnsw", PARAMS["hnsw"], progress=False)
    removed_before = ids[:800]  # past the 20% rebuild fraction of 3000
    assert index.remove(removed_before, compact=False) == 800
    assert index.needs_compaction and index.deleted_count == 800

    fresh = np.random.default_rng(3).standard_normal((5, 32)).astype(np.float32)
    fresh_ids = np.arange(5, dtype=np.int64) + 10**12
    removed_during = ids[800:810]
    progress: list[tuple[int, int]] = []
    failures: list[BaseException] = []

    def mutate() -> None:
        try:
            assert not set(index.search(vectors[:4], 10)[1].ravel().tolist()) & set(removed_before.tolist())
            index.add(fresh, fresh_ids)
            index.remove(removed_during, compact=False)
            index.remove(fresh_ids[:1], compact=False)  # added and removed while the graph builds
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            failures.append(exc)

    def during_build(done: int, total: int) -> None:
        progress.append((done, total))
        if len(progress) == 1:  # between chunks of the build: nothing may wait for it
            worker = threading.Thread(target=mutate)
            worker.start()
            worker.join(timeout=60)
            assert not worker.is_alive(), "a search or mutation waited for the compaction"

    assert index.compact(progress=during_build)
    assert not failures, failures
    assert progress == [(1000, 2200), (2000, 2200), (2200, 2200)]
    assert index.deleted_count == len(removed_during)  # still in the new graph, still filtered
    assert index.ntotal == 3000 - 810 + 4
    assert index.faiss_index.ntotal == index.ntotal + index.deleted_count
    gone = set(removed_before.tolist()) | set(removed_during.tolist()) | {int(fresh_ids[0])}
    assert not returned_ids(index, vectors[::10], 60) & gone
    np.testing.assert_array_equal(index.search(fresh[1:], 1)[1][:, 0], fresh_ids[1:])


def test_hnsw_compaction_stops_or_yields_to_a_rebuild(small_data, monkeypatch):
    vectors, ids, _ = small_data
    monkeypatch.setattr(search_index, "COMPACT_CHUNK", 1000)
    index = build_index(vectors, ids, "hnsw", PARAMS["hnsw"], progress=False)
    index.remove(ids[:800], compact=False)
    graph = index.faiss_index

    stop = threading.Event()
    assert not index.compact(stop=stop, progress=lambda done, total: stop.set())
    assert index.faiss_index is graph and index.deleted_count == 800  # untouched

    # A deleted id re-added while the graph builds forces an immediate rebuild under the lock;
    # the background one then stands down instead of swapping in a graph without the new vector.
    revived = int(ids[0])

    def readd(done: int, total: int) -> None:
        if done == 1000:
            worker = threading.Thread(target=index.add, args=(-vectors[:1], np.array([revived])))
            worker.start()
            worker.join(timeout=60)
            assert not worker.is_alive()

    assert not index.compact(progress=readd)
    assert index.deleted_count == 0 and index.faiss_index.ntotal == index.ntotal == 3000 - 800 + 1
    assert index.search(-vectors[:1], 1)[1][0, 0] == revived

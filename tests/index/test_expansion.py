"""Alpha query expansion: the formula against a direct loop, `SearchIndex.search(expand=...)` against
brute force on every index type, `SearchIndex.vectors`, and the refusals."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from index.expansion import MAX_EXPANSION, alpha_expanded
from index.factory import build_index
from index.search_index import SearchIndex
from index.store import IndexStore
from index.vectors import VectorError

PARAMS = {
    "flat": {},
    "ivf": {"nlist": 16, "nprobe": 16},  # every list probed: exact
    "ivfpq": {"nlist": 16, "nprobe": 16, "pq_m": 8, "pq_nbits": 8, "opq": False},
    "hnsw": {"M": 16, "efConstruction": 80, "efSearch": 256},
}


def unit(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def brute_force_expanded(
    catalogue: np.ndarray, ids: np.ndarray, queries: np.ndarray, n: int, k: int, alpha: float = 3.0
) -> tuple[np.ndarray, np.ndarray]:
    """(scores to the query, ids): the top k by the expanded query and the query's top n, ranked by
    the larger of the two similarities, one query at a time, in float64."""
    catalogue, queries = catalogue.astype(np.float64), unit(queries.astype(np.float64))
    all_scores, all_ids = [], []
    for query in queries:
        similarities = catalogue @ query
        top = np.argsort(-similarities)[:n]
        expanded = query.copy()
        for row in top:
            expanded += max(similarities[row], 0.0) ** alpha * catalogue[row]
        to_expanded = catalogue @ (expanded / np.linalg.norm(expanded))
        candidates = np.union1d(np.argsort(-to_expanded)[:k], top)  # CombMAX over both result lists
        fused = np.maximum(similarities[candidates], to_expanded[candidates])
        ranked = candidates[np.argsort(-fused, kind="stable")][:k]
        all_scores.append(similarities[ranked])
        all_ids.append(ids[ranked])
    return np.array(all_scores), np.array(all_ids)


def test_alpha_expanded_matches_a_direct_loop():
    rng = np.random.default_rng(0)
    queries = unit(rng.standard_normal((4, 16))).astype(np.float32)  # QxD
    vectors = rng.standard_normal((4, 3, 16)).astype(np.float32)  # QxnxD
    scores = rng.uniform(-0.5, 1.0, (4, 3)).astype(np.float32)  # Qxn, some negative
    valid = np.array([[True, True, True], [True, False, False], [False, False, False], [True, True, False]])
    vectors[~valid] = np.nan  # padding's reconstruction: must not leak into the sum
    got = alpha_expanded(queries, scores, vectors, valid, alpha=3.0)
    for q in range(4):
        expected = queries[q].astype(np.float64)
        for j in range(3):
            if valid[q, j] and scores[q, j] > 0:
                expected = expected + float(scores[q, j]) ** 3 * vectors[q, j]
        np.testing.assert_allclose(got[q], expected / np.linalg.norm(expected), atol=1e-5)
    np.testing.assert_allclose(got[2], queries[2], atol=1e-6)  # no valid result: the query itself


@pytest.mark.parametrize("index_type", list(PARAMS))
def test_expanded_search_matches_brute_force(small_data, index_type):
    vectors, ids, _ = small_data
    index = build_index(vectors, ids, index_type, PARAMS[index_type], progress=False)
    queries = vectors[:40] + 0.3 * np.random.default_rng(1).standard_normal((40, 32)).astype(np.float32)
    scores, found = index.search(queries, 10, expand=5)
    assert found.shape == scores.shape == (40, 10) and (found >= 0).all()
    plain_scores, plain = index.search(queries, 10)
    if index_type == "ivfpq":  # lossy codes: the scores are those of the decoded vectors
        decoded = index.vectors(found.ravel()).reshape(40, 10, 32)
        np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", unit(queries), decoded), atol=1e-4)
        assert (found != plain).any()  # expansion changed some ranking
        return
    expected_scores, expected = brute_force_expanded(unit(vectors), ids, queries, n=5, k=10)
    agree = (found == expected).mean()
    assert agree > (0.97 if index_type == "hnsw" else 0.995), agree  # ties aside, the same ranking
    np.testing.assert_allclose(scores[found == expected], expected_scores[found == expected], atol=1e-5)
    assert (found != plain).any() and not np.array_equal(np.sort(scores, axis=1)[:, ::-1], plain_scores)


def test_an_exact_copy_of_the_query_stays_first():
    """Five images around a direction 25 degrees from the query, one at its centre: the expanded
    query leans towards them, so its own nearest is the centre; the fusion keeps the copy first."""
    angle = np.deg2rad(25)
    centre = np.array([np.cos(angle), np.sin(angle), 0.0, 0.0])
    around = [centre + 0.05 * np.array([0.0, 0.0, np.cos(t), np.sin(t)]) for t in np.linspace(0, 6, 4)]
    catalogue = unit(np.array([[1.0, 0.0, 0.0, 0.0], centre, *around])).astype(np.float32)
    index = SearchIndex.empty_flat(4)
    index.add(catalogue, np.arange(10, 16))
    similarities = catalogue @ catalogue[0]
    top = np.argsort(-similarities)[:5]  # the copy itself and four around the centre
    expanded = alpha_expanded(
        catalogue[:1], similarities[None, top], catalogue[None, top], np.ones((1, 5), bool)
    )
    assert np.argmax(catalogue @ expanded[0]) == 1  # the plain expanded search puts the centre first
    scores, found = index.search(catalogue[:1], 3, expand=5)
    assert found[0, 0] == 10 and scores[0, 0] == pytest.approx(1.0, abs=1e-6)
    assert found[0, 1] == 11


def test_a_larger_fetch_extends_a_plain_ranking_but_may_reorder_an_expanded_one(small_data):
    """Why the service's over-fetch rounds skip earlier results by id, not by position: a larger k
    brings candidates whose similarity to the query itself ranks them above earlier ones."""
    vectors, ids, _ = small_data
    index = build_index(vectors, ids, "flat", {}, progress=False)
    queries = vectors[:200] + 0.3 * np.random.default_rng(1).standard_normal((200, 32)).astype(np.float32)
    np.testing.assert_array_equal(index.search(queries, 10)[1], index.search(queries, 40)[1][:, :10])
    small, large = index.search(queries, 10, expand=5)[1], index.search(queries, 40, expand=5)[1]
    moved = (small != large[:, :10]).any(axis=1)
    assert moved.any()
    for row in np.flatnonzero(moved):  # the small fetch's results are all still in the large one
        assert set(small[row]) <= set(large[row])


def test_expand_zero_is_the_plain_search_and_one_hit_catalogue_works(small_data):
    vectors, ids, _ = small_data
    index = build_index(vectors, ids, "flat", {}, progress=False)
    for got, want in zip(index.search(vectors[:5], 7, expand=0), index.search(vectors[:5], 7), strict=True):
        np.testing.assert_array_equal(got, want)
    single = SearchIndex.empty_flat(4)
    single.add(np.eye(4, dtype=np.float32)[:1], np.array([42]))
    scores, found = single.search(np.array([[1.0, 1.0, 0.0, 0.0]], np.float32), 3, expand=5)
    np.testing.assert_array_equal(found[0], [42, -1, -1])
    np.testing.assert_allclose(scores[0, 0], np.sqrt(0.5), atol=1e-6)
    assert np.isneginf(scores[0, 1:]).all()
    empty = SearchIndex.empty_flat(4)
    assert (empty.search(np.ones((1, 4), np.float32), 2, expand=5)[1] == -1).all()


def test_deleted_hnsw_vectors_neither_expand_nor_appear(small_data):
    vectors, ids, _ = small_data
    index = build_index(vectors, ids, "hnsw", PARAMS["hnsw"], progress=False)
    removed = index.search(vectors[:1], 30)[1][0][1:]  # the query image's 29 nearest others
    index.remove(removed, compact=False)
    assert index.deleted_count == 29
    scores, found = index.search(vectors[:1], 30, expand=5)
    assert not set(found[0].tolist()) & set(removed.tolist()) and (found >= 0).all()
    live = np.isin(ids, removed, invert=True)
    _, expected = brute_force_expanded(unit(vectors[live]), ids[live], vectors[:1], 5, 30)
    assert (found == expected).mean() > 0.9


@pytest.mark.parametrize("index_type", ["ivf", "ivfpq"])
def test_ivf_vectors_by_id_survive_add_remove_and_a_published_copy(tmp_path, small_data, index_type):
    vectors, ids, _ = small_data
    index = build_index(vectors, ids, index_type, PARAMS[index_type], progress=False)
    tolerance = 1e-6 if index_type == "ivf" else 0.35  # 8 bytes of PQ for 32 floats
    assert np.abs(index.vectors(ids[[5, 0, 2999]]) - unit(vectors[[5, 0, 2999]])).max() < tolerance
    index.remove(ids[:10])  # through the direct map made by `vectors`
    index.add(vectors[:2], np.array([7, 8]))
    assert np.abs(index.vectors([8]) - unit(vectors[1:2])).max() < tolerance
    with pytest.raises(VectorError, match="not in the index"):
        index.vectors(ids[:1])
    store = IndexStore(tmp_path / "idx")
    store.publish(index)
    loaded = store.load()  # memory-mapped
    assert np.abs(loaded.vectors([7]) - unit(vectors[:1])).max() < tolerance
    loaded.remove(np.array([7]))  # copied into memory first, then removed through its own map
    assert loaded.ntotal == index.ntotal - 1 and 7 not in loaded
    assert np.abs(loaded.vectors([8]) - unit(vectors[1:2])).max() < tolerance


def test_vector_reads_are_prepared_on_a_loaded_ivf_before_any_search(tmp_path, small_data):
    vectors, ids, _ = small_data
    IndexStore(tmp_path / "idx").publish(build_index(vectors, ids, "ivf", PARAMS["ivf"], progress=False))
    loaded = IndexStore(tmp_path / "idx").load()  # memory-mapped, no direct map yet
    ivf = faiss.extract_index_ivf(loaded.faiss_index)
    assert ivf.direct_map.type == faiss.DirectMap.NoMap
    loaded.prepare_vector_reads()
    assert ivf.direct_map.type == faiss.DirectMap.Hashtable
    assert np.abs(loaded.vectors(ids[[3]]) - unit(vectors[[3]])).max() < 1e-6


@pytest.mark.parametrize(
    ("expand", "alpha"),
    [(-1, 3.0), (MAX_EXPANSION + 1, 3.0), (2.5, 3.0), (True, 3.0), (5, -1.0), (5, np.nan)],
)
def test_bad_expansion_is_refused(expand, alpha):
    index = SearchIndex.empty_flat(4)
    with pytest.raises(VectorError, match="expand|alpha"):
        index.search(np.ones((1, 4), np.float32), 3, expand=expand, alpha=alpha)

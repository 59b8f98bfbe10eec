"""Searches running in threads while ids are removed and added: no search that starts after a
removal has returned may see a removed id, and no thread sees a torn index."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from index.factory import build_index


@pytest.mark.parametrize(("index_type", "params"), [("flat", {}), ("hnsw", {"M": 16, "efConstruction": 40})])
def test_concurrent_search_and_mutation(small_data, index_type, params):
    vectors, ids, _ = small_data
    index = build_index(vectors, ids, index_type, {**params, "efSearch": 64}, progress=False)
    batches = np.array_split(ids[:600], 12)  # removed one batch at a time
    removed_upto = [0]  # number of batches whose remove() has returned
    stop = threading.Event()
    violations: list[str] = []
    searches = [0]

    def searcher(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            done = removed_upto[0]
            found = index.search(vectors[rng.integers(0, len(vectors), 4)], 30)[1]
            gone = np.concatenate(batches[:done]) if done else np.empty(0, np.int64)
            if np.isin(found, gone).any():
                violations.append(f"removed id returned after {done} batches")
            searches[0] += 1

    threads = [threading.Thread(target=searcher, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    try:
        for number, batch in enumerate(batches, start=1):
            assert index.remove(batch) == len(batch)
            removed_upto[0] = number
            fresh = np.random.default_rng(number).standard_normal((5, 32)).astype(np.float32)
            index.add(fresh, np.arange(5, dtype=np.int64) + 10_000 * number)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not violations, violations[:3]
    assert searches[0] > 0
    assert index.ntotal == len(ids) - 600 + 5 * len(batches)

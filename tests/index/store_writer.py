"""One publisher process for tests/index/test_storage.py: load CURRENT, add its own vectors,
publish only if CURRENT did not move (retrying when it did), `count` times.

    python tests/index/store_writer.py CACHE_DIR WORKER COUNT BARRIER_DIR WORKERS [STORAGE_URL]

Every writer announces itself in BARRIER_DIR and starts when all WORKERS have, so the publishes
overlap; it prints the number of races it lost (publishes refused because CURRENT moved).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from index.search_index import SearchIndex
from index.store import CurrentMovedError, IndexStoreError
from index.synced_store import open_store

DIM = 8


def wait_for_everyone(barrier: Path, worker: int, workers: int) -> None:
    (barrier / str(worker)).touch()
    deadline = time.monotonic() + 120
    while len(list(barrier.iterdir())) < workers:  # a start line shared by processes
        if time.monotonic() > deadline:
            raise SystemExit("the other writers never started")
        time.sleep(0.01)


def main(root: str, worker: int, count: int, barrier: Path, workers: int, storage_url: str | None) -> None:
    store = open_store(root, storage_url, endpoint_url=None)
    rng = np.random.default_rng(worker)
    lost = 0
    wait_for_everyone(barrier, worker, workers)
    for step in range(count):
        image_id = worker * 1000 + step
        while True:
            try:
                index = store.load()
                base = index.manifest["version"]
            except IndexStoreError:
                index, base = SearchIndex.empty_flat(DIM), None
            index.add(rng.standard_normal((1, DIM)).astype("float32"), np.array([image_id], dtype=np.int64))
            try:
                store.publish(index, expected_current=base, extra_manifest={"writer": worker})
                break
            except CurrentMovedError:
                lost += 1  # someone published first: reload theirs and add again
    print(lost)


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], int(args[1]), int(args[2]), Path(args[3]), int(args[4]), args[5] if len(args) > 5 else None)

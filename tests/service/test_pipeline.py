"""service.pipeline: bounded read-ahead, batches written in order, and an error mid-way leaves only
whole batches behind (stored and indexed), nothing of the batches after it."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pymongo import MongoClient
from service_helpers import fashion_mnist_pngs, service_settings, with_engine

from service.catalogue import INDEXED, ImageMetadata, Limits
from service.db import Database
from service.engine import Engine, Loaded
from service.pipeline import BatchResult, Source, batched, run_pipeline

BATCH, DEPTH = 8, 2


class Log:
    """Which batches were read (prepared) and which written, in the order it happened."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.read: set[int] = set()
        self.written: list[int] = []
        self.read_ahead: list[int] = []  # batches read but not yet written, seen at each write

    def source(self, batch: int, data: bytes, label: str, fail: bool = False) -> Source:
        def read() -> bytes:
            with self.lock:
                self.read.add(batch)
            if fail:
                raise RuntimeError("the source broke")  # not a bad image: stops the pipeline
            return data

        return Source(f"b{batch}-{len(data)}.png", read, ImageMetadata(label, ("pipeline",), "test"))

    def wrote(self, result: BatchResult) -> None:
        with self.lock:
            batch = len(self.written)
            self.written.append(batch)
            self.read_ahead.append(len(self.read - set(self.written)))


def run(settings, sources: list[Source], log: Log) -> int:
    """Run the pipeline over `sources`; returns the loaded index's size afterwards."""

    async def body(engine: Engine, db: Database, loaded: Loaded, limits: Limits) -> int:
        with ThreadPoolExecutor(2) as workers:
            try:
                await run_pipeline(
                    engine, db, loaded, batched(sources, BATCH), limits, workers, DEPTH, log.wrote
                )
            finally:
                size = loaded.index.ntotal
        return size

    return with_engine(settings, body)


@pytest.fixture
def settings(data_dir: Path, mongo_uri: str, mongo_db_name: str):
    return service_settings(data_dir, mongo_uri, mongo_db_name)


def test_batches_are_written_in_order_with_bounded_read_ahead(settings) -> None:
    images = fashion_mnist_pngs(0, 5 * BATCH)
    log = Log()
    sources = [log.source(i // BATCH, data, label) for i, (data, label) in enumerate(images)]

    assert run(settings, sources, log) == 5 * BATCH
    assert log.written == [0, 1, 2, 3, 4]
    # While batch n is written at most `DEPTH` later batches have been read (plus n itself).
    assert max(log.read_ahead) <= DEPTH
    with MongoClient(settings.MONGO_URI) as mongo:
        records = list(mongo[settings.MONGO_DB].images.find({}, {"status": 1, "label": 1}))
    assert len(records) == 5 * BATCH and {r["status"] for r in records} == {INDEXED}
    assert sorted(r["label"] for r in records) == sorted(label for _, label in images)


def test_an_error_mid_way_leaves_whole_batches_and_nothing_after(settings) -> None:
    images = fashion_mnist_pngs(100, 5 * BATCH)
    log = Log()
    broken = 2 * BATCH + 3  # in the third batch
    sources = [log.source(i // BATCH, data, label, i == broken) for i, (data, label) in enumerate(images)]

    with pytest.raises(RuntimeError, match="the source broke"):
        run(settings, sources, log)

    assert log.written == [0, 1]
    with MongoClient(settings.MONGO_URI) as mongo:
        db = mongo[settings.MONGO_DB]
        records = list(db.images.find({}, {"status": 1}))
        assert len(records) == 2 * BATCH and {r["status"] for r in records} == {INDEXED}
        assert db["content.files"].count_documents({}) == 2 * BATCH  # no bytes of later batches
        assert db["thumbnails.files"].count_documents({}) == 2 * BATCH

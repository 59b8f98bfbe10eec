"""The write order with vectors embedded first (`indexing.store_and_index`): each record is written
once, with its vector, and never updated; a crash between the records and the index is repaired
by reconcile from the stored vectors (no embedding); a delete that lands between the records and
the index add does not leave its id in the index."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from pymongo import MongoClient
from service_helpers import fashion_mnist_pngs, service_settings, with_engine

from service.catalogue import (
    INDEXED,
    VECTOR,
    Embedded,
    ImageMetadata,
    Limits,
    PreparedImage,
    decode_vector,
    delete_image,
    prepare_image,
    store_prepared_many,
)
from service.db import Database
from service.engine import Engine, Loaded
from service.indexing import store_and_index
from service.pipeline import Source, batched, run_pipeline
from service.reconcile import reconcile


@pytest.fixture
def settings(data_dir: Path, mongo_uri: str, mongo_db_name: str):
    return service_settings(data_dir, mongo_uri, mongo_db_name)


def prepared_with_vectors(
    start: int, count: int, limits: Limits, dim: int, seed: int
) -> tuple[list[PreparedImage], np.ndarray]:
    """Validated Fashion-MNIST uploads and random unit vectors for them (NxD), unlike anything the
    encoder computes: finding them in the index proves where they came from."""
    prepared = [
        prepare_image(data, f"{i}.png", limits)
        for i, (data, _) in enumerate(fashion_mnist_pngs(start, count))
    ]
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return prepared, rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_ingest_writes_each_record_once_with_its_vector(settings) -> None:
    images = fashion_mnist_pngs(0, 24)

    async def body(engine: Engine, db: Database, loaded: Loaded, limits: Limits) -> tuple[list[dict], int]:
        sources = [
            Source(f"{i}.png", lambda d=data: d, ImageMetadata(label))
            for i, (data, label) in enumerate(images)
        ]
        events: list[dict] = []
        async with await db.images.watch() as stream:
            with ThreadPoolExecutor(2) as workers:
                await run_pipeline(engine, db, loaded, batched(sources, 8), limits, workers)
            await db.images.insert_one({"_id": -1, "sha256": "end"})  # a marker after every write
            while (event := await stream.next())["documentKey"]["_id"] != -1:
                events.append(event)
        assert loaded.index.ntotal == len(images)
        return events, loaded.index.dim

    events, dim = with_engine(settings, body)
    assert [e["operationType"] for e in events] == ["insert"] * len(images)  # no update, no replace
    with MongoClient(settings.MONGO_URI) as mongo:
        records = list(mongo[settings.MONGO_DB].images.find({"_id": {"$gt": 0}}))
    assert {r["status"] for r in records} == {INDEXED}
    assert all(decode_vector(r[VECTOR], dim) is not None for r in records)


def test_a_crash_before_the_index_add_is_repaired_from_the_stored_vectors(settings) -> None:
    async def body(engine: Engine, db: Database, loaded: Loaded, limits: Limits) -> None:
        prepared, vectors = prepared_with_vectors(40, 12, limits, loaded.index.dim, seed=1)
        embedded = Embedded(vectors, loaded.model_version, loaded.version)
        # The records are written, then the process "dies" before the index add.
        stored = await store_prepared_many(db, prepared, [ImageMetadata()] * len(prepared), embedded)
        ids = [item.id for item in stored]
        assert not loaded.index.contains(np.asarray(ids)).any()

        report = await reconcile(engine, db)
        assert report is not None and report.added == len(ids)
        assert loaded.index.contains(np.asarray(ids)).all()
        # The index holds the stored vectors themselves, not the encoder's embedding of the bytes.
        scores, found = loaded.index.search(vectors, 1)
        assert found[:, 0].tolist() == ids and np.allclose(scores[:, 0], 1.0, atol=1e-4)

    with_engine(settings, body)


def test_a_delete_between_the_records_and_the_index_add_leaves_no_id(settings) -> None:
    async def body(engine: Engine, db: Database, loaded: Loaded, limits: Limits) -> None:
        prepared, vectors = prepared_with_vectors(60, 6, limits, loaded.index.dim, seed=2)
        real_add = engine.add
        victims: list[int] = []

        async def add_after_a_delete(loaded_: Loaded, rows: np.ndarray, ids: list[int]) -> list[int]:
            # DELETE /images/{id} lands here: the record goes, then its (not yet present) index id.
            victims.append(ids[2])
            assert await delete_image(db, ids[2]) is not None
            assert await engine.remove([ids[2]]) == 0
            return await real_add(loaded_, rows, ids)

        engine.add = add_after_a_delete  # type: ignore[method-assign]
        stored, indexed = await store_and_index(
            engine, db, loaded, prepared, [ImageMetadata()] * len(prepared), vectors
        )
        ids = [item.id for item in stored]
        assert victims == [ids[2]]
        assert indexed == set(ids) - {ids[2]}
        present = loaded.index.contains(np.asarray(ids)).tolist()
        assert present == [i != ids[2] for i in ids]

    with_engine(settings, body)


def test_an_upload_that_loses_the_race_for_its_bytes_returns_the_winner(settings) -> None:
    async def body(engine: Engine, db: Database, loaded: Loaded, limits: Limits) -> None:
        prepared, vectors = prepared_with_vectors(80, 3, limits, loaded.index.dim, seed=3)
        contested = prepared[1].decoded.sha256
        real_allocate = db.allocate_ids
        ours: list[int] = []

        async def allocate_after_a_rival(count: int) -> list[int]:
            # Another replica stores the same bytes after our lookup of the hashes found nothing.
            await db.images.insert_one({"_id": 10**9, "sha256": contested, "filename": "rival.png"})
            ours.extend(await real_allocate(count))
            return ours

        db.allocate_ids = allocate_after_a_rival  # type: ignore[method-assign]
        stored, indexed = await store_and_index(
            engine, db, loaded, prepared, [ImageMetadata()] * len(prepared), vectors
        )
        assert [item.created for item in stored] == [True, False, True]
        assert stored[1].id == 10**9 and stored[1].record["filename"] == "rival.png"
        assert indexed == {stored[0].id, 10**9, stored[2].id}  # the rival's record is indexed too
        assert loaded.index.contains(np.asarray([item.id for item in stored])).all()
        # The loser's bytes and thumbnail are gone; the winner got the vector with its mark.
        for bucket in ("content", "thumbnails"):
            assert await db.db[f"{bucket}.files"].count_documents({"_id": ours[1]}) == 0
            assert await db.db[f"{bucket}.chunks"].count_documents({"files_id": ours[1]}) == 0
        rival = await db.images.find_one({"_id": 10**9})
        assert rival["status"] == INDEXED and decode_vector(rival[VECTOR], loaded.index.dim) is not None

    with_engine(settings, body)

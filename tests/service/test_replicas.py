"""Two service processes on one database and one index store, kept consistent by change streams,
with one publisher elected by the lease: real processes, real HTTP, real signals (kill -9)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from encoder_files import install_encoder
from pymongo import MongoClient
from replica_processes import Replica, ReplicaSet, require_change_streams
from service_helpers import fashion_mnist_pngs, upload, wait_until

from index.store import IndexStore
from service.catalogue import (
    ImageMetadata,
    Limits,
    decode_vector,
    mark_indexed,
    prepare_image,
    store_prepared,
)
from service.db import Database
from service.imaging import decode_image, model_input
from training.inference import load_deploy_encoder

LEASE_S = 2.0
LONG_GRACE_S = 120  # "the writer's vector always comes in time", whatever the machine's load


@pytest.fixture
def replicas(tmp_path: Path, encoder_file: Path, mongo_uri: str, mongo_db_name: str) -> Iterator[ReplicaSet]:
    require_change_streams(mongo_uri)
    install_encoder(encoder_file, tmp_path / "model.pt")
    group = ReplicaSet(mongo_uri, mongo_db_name, tmp_path)
    try:
        yield group
    except BaseException:
        for replica in group.running:
            print(f"--- log of replica {replica.name}:\n{replica.log_tail()}")
        raise
    finally:
        group.stop_all()


def _pngs(start: int, count: int) -> list[bytes]:
    return [data for data, _ in fashion_mnist_pngs(start, count)]


def test_writes_on_one_replica_reach_the_other_and_publishing_fails_over(replicas: ReplicaSet) -> None:
    a = replicas.start("a")
    wait_until(lambda: a.replication()["role"] == "publisher", timeout_s=30, what="a to take the lease")
    b = replicas.start("b", REPLICA_VECTOR_GRACE_SECONDS=LONG_GRACE_S)
    assert b.replication()["role"] == "follower"
    wait_until(lambda: b.replication()["watcher"]["state"] == "following", timeout_s=30, what="b's stream")

    # Upload on A: B finds it by searching with the same image. B added the vector A stored with
    # each record: it read no bytes and embedded nothing.
    images = _pngs(0, 4)
    ids = upload(a.client, [(png, f"{i}.png") for i, png in enumerate(images)])["ids"]
    for image_id, png in zip(ids, images, strict=True):
        wait_until(lambda i=image_id, p=png: b.top_id(p) == i, timeout_s=30, what=f"{image_id} on b")
    watcher = b.replication()["watcher"]
    assert watcher["added"] >= len(ids) and watcher["apply_lag"]["events"] >= len(ids)
    assert watcher["added_from_vector"] == watcher["added"] and watcher["embedded"] == 0, watcher
    assert watcher["grace_expired"] == 0 and watcher["deferred"] == 0, watcher
    assert watcher["apply_lag"]["p50_ms"] <= watcher["apply_lag"]["max_ms"]

    # Delete on B: gone from A's results.
    assert b.client.delete(f"/images/{ids[0]}").status_code == 200
    wait_until(lambda: a.top_id(images[0]) != ids[0], timeout_s=30, what="the delete to reach a")

    # kill -9 the publisher: B takes the lease within the lease time (+ its polling interval).
    store = IndexStore(replicas.data_dir / "index")
    term_before = a.replication()["lease"]["term"]
    killed_at = time.monotonic()
    a.kill()
    wait_until(lambda: b.replication()["role"] == "publisher", timeout_s=30, interval_s=0.05, what="failover")
    failover_s = time.monotonic() - killed_at
    assert failover_s <= LEASE_S * 1.1 + 1.0, f"failover took {failover_s:.2f} s with a {LEASE_S} s lease"
    lease = b.replication()["lease"]
    assert lease["holder"] == "b" and lease["term"] > term_before

    # A later change is published by B (its version carries B's name and a change-stream token).
    new_png = _pngs(10, 1)[0]
    new_id = upload(b.client, [(new_png, "new.png")])["ids"][0]

    def published_by_b() -> bool:
        manifest = store.read_manifest()
        return manifest.get("publisher") == "b" and bool(store.load().contains([new_id])[0])

    wait_until(published_by_b, timeout_s=30, what="b to publish the new image")
    manifest = store.read_manifest()
    assert manifest["lease_term"] == lease["term"] and manifest["change_stream_token"] is not None
    assert not store.load().contains([ids[0]])[0]  # the delete made on B is in B's version too

    # Publishes never interleaved: every version's parent is the version published just before it.
    versions = store.versions()
    parents = [store.read_manifest(v).get("parent_version") for v in versions]
    assert parents[1:] == versions[:-1], list(zip(versions, parents, strict=True))
    publishers = {store.read_manifest(v).get("publisher") for v in versions[1:]}
    assert publishers <= {"a", "b"}


def test_a_restarted_replica_catches_up_from_its_resume_token(replicas: ReplicaSet) -> None:
    store = IndexStore(replicas.data_dir / "index")
    a = replicas.start("a")
    images = _pngs(20, 3)
    ids = upload(a.client, [(png, f"{i}.png") for i, png in enumerate(images)])["ids"]

    def published_with_token() -> str | None:
        manifest = store.read_manifest()
        complete = manifest.get("change_stream_token") and store.load().contains(ids).all()
        return manifest["version"] if complete else None

    version = wait_until(published_with_token, timeout_s=30, what="a to publish with a token")
    a.kill()  # kill -9: nothing is published on the way out

    # While A is down, B (which will not publish: long debounce) adds one image and deletes another.
    b = replicas.start("b", PUBLISH_DEBOUNCE_SECONDS=600)
    late_png = _pngs(30, 1)[0]
    late_id = upload(b.client, [(late_png, "late.png")])["ids"][0]
    assert b.client.delete(f"/images/{ids[0]}").status_code == 200
    assert store.current_version() == version  # nothing new was published

    # A restarts on the same version and replays what it missed from that version's token.
    a = replicas.start("a")
    state = a.replication()
    assert state["watcher"]["resumed_from_version"] == version, state
    wait_until(lambda: a.top_id(late_png) == late_id, timeout_s=30, what="a to catch up the upload")
    wait_until(lambda: a.top_id(images[0]) != ids[0], timeout_s=30, what="a to catch up the delete")
    assert a.top_id(images[1]) == ids[1]
    assert a.replication()["watcher"]["fallback_reconciles"] == 0


# --------------------------------------------------------------------- stored vectors


def _records(replicas: ReplicaSet, ids: list[int]) -> dict[int, dict]:
    client: MongoClient = MongoClient(replicas.mongo_uri)
    try:
        return {d["_id"]: d for d in client[replicas.db_name].images.find({"_id": {"$in": ids}})}
    finally:
        client.close()


def _store_as_a_dead_writer(replicas: ReplicaSet, png: bytes, name: str, foreign_dim: int = 0) -> int:
    """What a replica that dies right after storing leaves: bytes and a pending record, no vector
    (or, with `foreign_dim`, the record marked indexed by a model no replica runs)."""

    async def store() -> int:
        db = Database.connect(replicas.mongo_uri, replicas.db_name, timeout_ms=5000)
        try:
            limits = Limits(max_bytes=1 << 20, max_pixels=1 << 20, thumbnail_size=32)
            stored = await store_prepared(db, prepare_image(png, name, limits), ImageMetadata())
            if foreign_dim:
                vector = np.random.default_rng(0).standard_normal((1, foreign_dim)).astype(np.float32)  # 1xD
                await mark_indexed(db, [stored.id], "another-model", "elsewhere", vector)
            return stored.id
        finally:
            await db.close()

    return asyncio.run(store())


def _best(replica: Replica, png: bytes) -> tuple[int | None, float]:
    reply = replica.client.post("/search", files={"file": ("q.png", png, "image/png")}, data={"k": "1"})
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    return (results[0]["id"], results[0]["score"]) if results else (None, 0.0)


def test_records_carry_their_vector_and_it_never_leaves_the_service(
    replicas: ReplicaSet, encoder_file: Path
) -> None:
    a = replicas.start("a")
    images = _pngs(40, 3)
    reply = upload(a.client, [(png, f"{i}.png") for i, png in enumerate(images)])
    ids = reply["ids"]
    assert all(item["status"] == "indexed" for item in reply["items"]), reply

    # The stored vector is the encoder's embedding of the image, tagged by the encoder's version.
    encoder = load_deploy_encoder(replicas.data_dir / "model.pt")
    inputs = [model_input(decode_image(png, 1 << 20, 1 << 20).image, 1, 28) for png in images]
    expected = encoder.embed(torch.stack(inputs))  # NxD
    records = _records(replicas, ids)
    for row, image_id in enumerate(ids):
        record = records[image_id]
        assert record["status"] == "indexed" and record["model_version"] == encoder.version
        stored = decode_vector(record["vector"], expected.shape[1])
        assert stored is not None
        np.testing.assert_allclose(stored, expected[row], atol=1e-4)

    # Nowhere in a public response: records, listings, uploads of known bytes, searches.
    answers = [
        a.client.get(f"/images/{ids[0]}"),
        a.client.get("/images", params={"limit": 10}),
        a.client.post("/images", files=[("files", ("again.png", images[0], "image/png"))]),
        a.client.post("/search", json={"id": ids[0], "k": 3}),
        a.client.post("/search", files={"file": ("q.png", images[1], "image/png")}, data={"k": "3"}),
    ]
    for answer in answers:
        assert answer.status_code in (200, 201), answer.text
        assert "vector" not in answer.text, answer.text

    # Search by id starts from the stored vector: the record itself comes first, at similarity 1.
    results = a.client.post("/search", json={"id": ids[2], "k": 1}).json()["results"]
    assert results[0]["id"] == ids[2] and results[0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_a_follower_embeds_itself_when_the_writers_vector_does_not_come(replicas: ReplicaSet) -> None:
    a = replicas.start("a", REPLICA_VECTOR_GRACE_SECONDS=LONG_GRACE_S)
    wait_until(lambda: a.replication()["role"] == "publisher", timeout_s=30, what="a to take the lease")
    b = replicas.start("b", REPLICA_VECTOR_GRACE_SECONDS=0.5)
    wait_until(lambda: b.replication()["watcher"]["state"] == "following", timeout_s=30, what="b's stream")

    # The writer died after storing: B waits out its grace, then embeds the stored bytes and stores
    # the vector; A (a long grace) adds that vector instead of embedding too.
    orphan_png = _pngs(50, 1)[0]
    orphan = _store_as_a_dead_writer(replicas, orphan_png, "orphan.png")
    wait_until(lambda: b.top_id(orphan_png) == orphan, timeout_s=60, what="b to embed the orphan")
    wait_until(lambda: a.top_id(orphan_png) == orphan, timeout_s=60, what="a to add b's vector")
    b_watcher, a_watcher = b.replication()["watcher"], a.replication()["watcher"]
    assert b_watcher["grace_expired"] >= 1 and b_watcher["embedded"] >= 1, b_watcher
    assert a_watcher["added_from_vector"] >= 1 and a_watcher["embedded"] == 0, a_watcher
    assert a_watcher["deferred"] == 0, a_watcher  # B's vector resolved A's wait
    assert _records(replicas, [orphan])[orphan]["status"] == "indexed"

    # A vector from another model is never added: both replicas embed the bytes (similarity 1 to
    # the image itself, which a foreign vector would not give).
    foreign_png = _pngs(51, 1)[0]
    dim = IndexStore(replicas.data_dir / "index").load().dim
    foreign = _store_as_a_dead_writer(replicas, foreign_png, "foreign.png", foreign_dim=dim)
    for replica in (a, b):

        def found(r: Replica = replica) -> tuple[int | None, float] | None:
            best = _best(r, foreign_png)
            return best if best[0] == foreign else None

        best = wait_until(found, timeout_s=60, what=f"{replica.name} to index the foreign record")
        assert best[1] == pytest.approx(1.0, abs=1e-3), best


def test_a_version_published_while_an_insert_waits_replays_that_insert(replicas: ReplicaSet) -> None:
    """The token a version carries never skips an insert still waiting for its vector: a process
    resuming the stream there sees it again."""
    store = IndexStore(replicas.data_dir / "index")
    a = replicas.start("a", REPLICA_VECTOR_GRACE_SECONDS=600)
    first = upload(a.client, [(_pngs(60, 1)[0], "first.png")])["ids"][0]

    def published_with(image_id: int) -> dict | None:
        manifest = store.read_manifest()
        complete = manifest.get("change_stream_token") and store.load().contains([image_id])[0]
        return manifest if complete else None

    wait_until(lambda: published_with(first), timeout_s=30, what="a to publish with a token")
    waiting = _store_as_a_dead_writer(replicas, _pngs(61, 1)[0], "waiting.png")
    wait_until(lambda: a.replication()["watcher"]["deferred"] == 1, timeout_s=30, what="a to defer it")
    later = upload(a.client, [(_pngs(62, 1)[0], "later.png")])["ids"][0]
    manifest = wait_until(lambda: published_with(later), timeout_s=30, what="a to publish the later one")
    assert not store.load().contains([waiting])[0]

    client: MongoClient = MongoClient(replicas.mongo_uri)
    try:
        images = client[replicas.db_name].images
        replayed: list[tuple[str, int]] = []
        with images.watch(resume_after=manifest["change_stream_token"], max_await_time_ms=200) as stream:
            deadline = time.monotonic() + 30
            while ("insert", later) not in replayed and time.monotonic() < deadline:
                event = stream.try_next()
                if event is not None:
                    replayed.append((event["operationType"], event["documentKey"]["_id"]))
    finally:
        client.close()
    assert ("insert", waiting) in replayed, replayed

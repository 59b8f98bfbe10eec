"""Two service processes on one database and one index store, kept consistent by change streams,
with one publisher elected by the lease: real processes, real HTTP, real signals (kill -9)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from replica_processes import ReplicaSet, require_change_streams
from service_helpers import fashion_mnist_pngs, upload, wait_until

from index.store import IndexStore

LEASE_S = 2.0


@pytest.fixture
def replicas(tmp_path: Path, encoder_file: Path, mongo_uri: str, mongo_db_name: str) -> Iterator[ReplicaSet]:
    require_change_streams(mongo_uri)
    shutil.copyfile(encoder_file, tmp_path / "model.pt")
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
    b = replicas.start("b")
    assert b.replication()["role"] == "follower"
    wait_until(lambda: b.replication()["watcher"]["state"] == "following", timeout_s=30, what="b's stream")

    # Upload on A: B finds it by searching with the same image (B embedded it from the event).
    images = _pngs(0, 4)
    ids = upload(a.client, [(png, f"{i}.png") for i, png in enumerate(images)])["ids"]
    for image_id, png in zip(ids, images, strict=True):
        wait_until(lambda i=image_id, p=png: b.top_id(p) == i, timeout_s=30, what=f"{image_id} on b")
    watcher = b.replication()["watcher"]
    assert watcher["added"] >= len(ids) and watcher["apply_lag"]["events"] >= len(ids)
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

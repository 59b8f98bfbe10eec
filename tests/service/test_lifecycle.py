"""Index life cycle and resilience: reload under load, polling, reconcile after a crash, database
restart, the embedded database, publish on shutdown."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import pytest
from gridfs import GridFSBucket
from pymongo import MongoClient
from service_helpers import (
    fashion_mnist_pngs,
    make_tiny_encoder,
    running_service,
    service_settings,
    upload,
    wait_until,
)

from index.search_index import SearchIndex
from index.store import IndexStore
from service import lifecycle
from service.db import Database
from service.embedded_db import EmbeddedDatabase, free_port
from service.engine import Engine
from training.encoder import Encoder


def publish_new_model(data_dir: Path, seed: int) -> tuple[str, str]:
    """Publish an empty index with a different encoder, as a training run would: (version, model version)."""
    encoder_path = make_tiny_encoder(data_dir / f"model-{seed}.pt", seed=seed)
    encoder = Encoder.load(encoder_path)
    version = IndexStore(data_dir / "index").publish(
        SearchIndex.empty_flat(encoder.embed_dim), encoder_path=encoder_path
    )
    return version, encoder.version


def test_reload_swaps_versions_under_concurrent_searches(start_service, data_dir) -> None:
    items = fashion_mnist_pngs(0, 40)
    with start_service(RELOAD_POLL_SECONDS=3600) as client:
        ids = upload(client, [(d, f"{i}.png") for i, (d, _) in enumerate(items)])["ids"]
        old_model = client.get("/version").json()["model_version"]
        stop = threading.Event()
        outcomes: Counter = Counter()
        models_seen: set[str] = set()
        failures: list[str] = []

        def hammer(worker: int) -> None:
            with httpx.Client(base_url=str(client.base_url), timeout=60) as http:
                n = 0
                while not stop.is_set():
                    position = (worker * 7 + n) % len(items)
                    n += 1
                    reply = http.post("/search", files={"file": ("q.png", items[position][0], "image/png")})
                    outcomes[reply.status_code] += 1
                    if reply.status_code != 200:
                        failures.append(reply.text)
                        continue
                    body = reply.json()
                    models_seen.add(body["model_version"])
                    if body["results"] and body["results"][0]["id"] != ids[position]:
                        failures.append(f"wrong first result for {position}: {body['results'][0]}")

        workers = [threading.Thread(target=hammer, args=(w,)) for w in range(4)]
        for worker in workers:
            worker.start()
        wait_until(lambda: outcomes[200] >= 20, what="searches before the swap")
        _, new_model = publish_new_model(data_dir, seed=1)
        reload = client.post("/admin/reload")
        searches_at_swap = outcomes[200]
        wait_until(lambda: outcomes[200] >= searches_at_swap + 20, what="searches after the swap")
        stop.set()
        for worker in workers:
            worker.join()

        assert reload.status_code == 200 and reload.json()["reloaded"] is True
        assert reload.json()["model_version"] == new_model != old_model
        assert failures == [] and set(outcomes) == {200}
        assert {old_model, new_model} <= models_seen
        # Reconcile re-embedded the catalogue with the new model: every image is found again.
        assert client.get("/health/ready").json()["index_size"] == len(items)
        first = client.post("/search", files={"file": ("q.png", items[3][0], "image/png")}).json()["results"][
            0
        ]
        assert first["id"] == ids[3] and first["score"] == pytest.approx(1.0, abs=1e-4)
        record = client.get(f"/images/{ids[3]}").json()
        assert record["model_version"] == new_model and record["status"] == "indexed"
        assert client.post("/admin/reload").json()["reloaded"] is False  # nothing newer


def test_new_current_is_noticed_by_polling(start_service, data_dir) -> None:
    with start_service(RELOAD_POLL_SECONDS=0.2) as client:
        upload(client, [(fashion_mnist_pngs(0, 1)[0][0], "a.png")])
        version, model = publish_new_model(data_dir, seed=2)
        wait_until(lambda: client.get("/version").json()["model_version"] == model, what="the polled reload")
        # The swap comes first, then reconcile re-embeds the catalogue into the new version.
        wait_until(
            lambda: client.get("/health/ready").json()["index_size"] == 1, what="the reconcile after the swap"
        )
        current = client.get("/version").json()["index_version"]
        assert current >= version  # the loaded one, or a republish of it with the reconciled image


def test_reconcile_repairs_a_crash_between_record_and_index(data_dir, mongo_uri, mongo_db_name) -> None:
    settings = service_settings(data_dir, mongo_uri, mongo_db_name)
    items = fashion_mnist_pngs(0, 3)
    with running_service(settings) as url, httpx.Client(base_url=url) as client:
        kept_id = upload(client, [(items[0][0], "kept.png")])["ids"][0]
    # Simulate the crash: bytes + a pending record written, the index never got the vector ...
    with MongoClient(mongo_uri) as mongo:
        db = mongo[mongo_db_name]
        GridFSBucket(db, "content").upload_from_stream_with_id(777, "crashed.png", items[1][0])
        db.images.insert_one(
            {"_id": 777, "filename": "crashed.png", "sha256": "x" * 64, "status": "pending", "label": None,
             "tags": [], "created_at": datetime.now(timezone.utc)}
        )  # fmt: skip
    # ... and an index id whose record is gone (a crash between record delete and index remove).
    store = IndexStore(data_dir / "index")
    index = store.load()
    index.add(np.ones((1, index.dim), np.float32), np.array([888]))
    store.publish(index)

    with running_service(settings) as url, httpx.Client(base_url=url) as client:
        # Start-up reconcile runs in the background while the service already answers.
        wait_until(lambda: client.get("/health/ready").json()["reconciled"], what="start-up reconcile")
        assert client.get("/health/ready").json()["index_size"] == 2  # kept + repaired, stale 888 removed
        record = client.get("/images/777").json()
        assert record["status"] == "indexed" and record["model_version"]
        hit = client.post("/search", files={"file": ("q.png", items[1][0], "image/png")}).json()["results"][0]
        assert hit["id"] == 777 and hit["score"] == pytest.approx(1.0, abs=1e-4)
        ids = [r["id"] for r in client.post("/search", json={"id": kept_id, "k": 10}).json()["results"]]
        assert sorted(ids) == sorted([kept_id, 777])


def test_database_restart_gives_503_then_recovers(data_dir, tmp_path) -> None:
    database = EmbeddedDatabase(tmp_path / "restartable-db", port=free_port())
    uri = database.start()
    settings = service_settings(data_dir, uri, "restart", MONGO_TIMEOUT_MS=500)
    item = fashion_mnist_pngs(0, 1)[0][0]
    try:
        with running_service(settings) as url, httpx.Client(base_url=url, timeout=30) as client:
            image_id = upload(client, [(item, "a.png")])["ids"][0]
            database.stop()
            down = client.get(f"/images/{image_id}")
            assert down.status_code == 503 and "database unreachable" in down.json()["detail"]
            ready = client.get("/health/ready")
            assert ready.status_code == 503 and "database unreachable" in ready.json()["detail"]
            upload_down = client.post("/images", files={"files": ("b.png", fashion_mnist_pngs(1, 1)[0][0])})
            assert upload_down.status_code == 503
            database.start()
            wait_until(lambda: client.get("/health/ready").status_code == 200, what="recovery")
            assert client.get(f"/images/{image_id}").json()["status"] == "indexed"
            hit = client.post("/search", files={"file": ("q.png", item, "image/png")}).json()["results"][0]
            assert hit["id"] == image_id
    finally:
        database.stop()


def ping(port: int) -> bool:
    with MongoClient(
        f"mongodb://127.0.0.1:{port}/?directConnection=true", serverSelectionTimeoutMS=300
    ) as mongo:
        try:
            mongo.admin.command("ping")
            return True
        except Exception:
            return False


def test_embedded_database_when_mongo_uri_is_unset(data_dir) -> None:
    port = free_port()
    settings = service_settings(data_dir, None, "embedded", EMBEDDED_DB_PORT=port)
    item = fashion_mnist_pngs(0, 1)[0][0]
    with running_service(settings) as url, httpx.Client(base_url=url) as client:
        assert ping(port)
        image_id = upload(client, [(item, "a.png")])["ids"][0]
    assert not ping(port)  # stopped with the service
    assert (data_dir / "db").is_dir()
    with running_service(settings) as url, httpx.Client(base_url=url) as client:  # data survived
        assert client.get(f"/images/{image_id}").json()["status"] == "indexed"


async def hung_forced_publish(self: Engine, force: bool = False) -> str | None:
    """A shutdown publish that never finishes (the maintenance loop's publishes return at once)."""
    if force:
        await asyncio.Event().wait()
    return None


async def failing_close(self: Database) -> None:
    raise RuntimeError("the client could not be closed")


@pytest.mark.parametrize(
    ("step", "replacement", "logged"),
    [
        (
            "publish",
            hung_forced_publish,
            "publishing pending index changes (reconcile repairs them) did not finish",
        ),
        ("close", failing_close, "closing the database client failed"),
    ],
)
def test_a_hung_or_failing_shutdown_step_still_stops_the_embedded_database(
    data_dir, monkeypatch, caplog, step, replacement, logged
) -> None:
    """A shutdown step that never finishes or raises is passed over, logged, and the server this
    process started is still stopped (before, the shutdown waited for the step forever, or ended at
    its error, and the server was never asked to stop and checkpoint)."""
    monkeypatch.setattr(lifecycle, "SHUTDOWN_TIMEOUT_S", 1.0)
    if step == "publish":
        monkeypatch.setattr(Engine, "publish_if_due", replacement)
    else:
        monkeypatch.setattr(Database, "close", replacement)
    port = free_port()
    settings = service_settings(data_dir, None, f"shutdown-{step}", EMBEDDED_DB_PORT=port)
    with running_service(settings) as url, httpx.Client(base_url=url) as client:
        assert client.get("/health/ready").status_code == 200
        assert ping(port)
    assert not ping(port)  # stopped with the service, whatever the step did
    assert not (data_dir / "db.json").exists()
    assert logged in caplog.text


def test_changes_are_published_debounced_and_on_shutdown(start_service, data_dir) -> None:
    store = IndexStore(data_dir / "index")
    with start_service(PUBLISH_DEBOUNCE_SECONDS=3600) as client:
        before = store.current_version()
        image_id = upload(client, [(fashion_mnist_pngs(0, 1)[0][0], "a.png")])["ids"][0]
        assert store.current_version() == before  # debounced: not yet
    after = store.current_version()
    assert after != before
    assert store.load(after).contains(image_id)[0]
    manifest = store.read_manifest(after)
    assert manifest["based_on"] == before and manifest["parent_version"] == before


def test_republishing_prunes_old_versions(start_service, data_dir) -> None:
    store = IndexStore(data_dir / "index")
    items = fashion_mnist_pngs(0, 4)
    with start_service(PUBLISH_DEBOUNCE_SECONDS=0, INDEX_KEEP_VERSIONS=2) as client:
        published = [store.current_version()]
        for data, _ in items:
            upload(client, [(data, "x.png")])
            published.append(
                wait_until(lambda: (store.current_version() != published[-1]) and store.current_version())
            )
        assert len(set(published)) == 5
        # Pruning follows the CURRENT switch: wait for it rather than race it.
        wait_until(lambda: store.versions() == sorted(published)[-2:], what="pruning to 2 versions")
        parents = [store.read_manifest(v)["parent_version"] for v in store.versions()]
        assert parents == sorted(published)[-3:-1]

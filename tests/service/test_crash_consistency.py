"""Crash consistency with real processes and real signals: kill -9 of the service during bulk
uploads while debounced republishes run back to back, during deletes, and kill -9 of
`python -m service.ingest` of a folder. After a restart, reconcile and the clean-up window
(ORPHAN_GRACE_SECONDS shortened for the test): every acknowledged upload is there with its bytes
and is found by search, every acknowledged delete is gone everywhere, nothing is half-present
(records, GridFS files, chunks and the published index hold exactly the same ids)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from process_helpers import ServiceProcess, assert_consistent
from pymongo import MongoClient
from service_helpers import fashion_mnist_pngs, wait_until

from index.search_index import SearchIndex
from index.store import IndexStore
from training.encoder import Encoder

FOLDER_SIZE = 256
RESTART = {"ORPHAN_GRACE_SECONDS": 0, "ORPHAN_SWEEP_SECONDS": 1}  # nothing uploads after a restart


def is_publisher(service: ServiceProcess) -> bool:
    try:
        return httpx.get(f"{service.url}/replication", timeout=5).json().get("role") == "publisher"
    except (httpx.HTTPError, ValueError):
        return False


def restart_and_settle(data_dir: Path, env: dict) -> ServiceProcess:
    service = ServiceProcess(data_dir, **env, **RESTART).start()
    try:
        wait_until(service.reconciled, timeout_s=300, interval_s=0.2, what="reconcile and an orphan sweep")
        # Only the publisher-lease holder publishes (also on stop); the killed process's lease must
        # expire before this one takes it over and can publish what reconcile repaired.
        wait_until(lambda: is_publisher(service), timeout_s=120, interval_s=0.2, what="the publisher lease")
    except BaseException:
        service.stop()
        raise
    return service


def run_workers(target, count: int) -> tuple[threading.Event, list[threading.Thread]]:
    stop = threading.Event()
    threads = [threading.Thread(target=target, args=(w, stop), daemon=True) for w in range(count)]
    for thread in threads:
        thread.start()
    return stop, threads


def test_kill_9_during_uploads_republishes_and_deletes(
    data_dir: Path, mongo_uri: str, mongo_db_name: str
) -> None:
    env = {"MONGO_URI": mongo_uri, "MONGO_DB": mongo_db_name, "RELOAD_POLL_SECONDS": 0.1}
    images = fashion_mnist_pngs(0, 240)
    acknowledged: dict[int, bytes] = {}
    store = IndexStore(data_dir / "index")

    # (a) + (c): bulk uploads of 8 files per request from 3 clients, republishing every 0.1 s.
    first = ServiceProcess(data_dir, **env, PUBLISH_DEBOUNCE_SECONDS=0).start()
    versions_at_start = len(store.versions())

    def uploader(worker: int, stop: threading.Event) -> None:
        with httpx.Client(base_url=first.url, timeout=60) as http:
            for start in range(worker * 8, len(images), 24):
                if stop.is_set():
                    return
                batch = images[start : start + 8]
                files = [
                    ("files", (f"{start + i}.png", data, "image/png")) for i, (data, _) in enumerate(batch)
                ]
                try:
                    reply = http.post("/images", files=files)
                except httpx.HTTPError:
                    return  # the service died under this request: not acknowledged
                if reply.status_code == 201:
                    for item, (data, _) in zip(reply.json()["items"], batch, strict=True):
                        acknowledged[item["id"]] = data

    try:
        stop, threads = run_workers(uploader, 3)
        wait_until(
            lambda: len(acknowledged) >= 48 and len(store.versions()) > versions_at_start + 1,
            timeout_s=300,
            what="acknowledged uploads and republished versions",
        )
        first.kill9()
        stop.set()
        for thread in threads:
            thread.join()
    finally:
        first.stop()

    second = restart_and_settle(data_dir, env)
    deleted: set[int] = set()
    try:
        with second.client() as http:
            for image_id, data in list(acknowledged.items())[::15]:  # searchable after reconcile
                hit = http.post("/search", files={"file": ("q.png", data, "image/png")}).json()["results"][0]
                assert hit["id"] == image_id and hit["score"] == pytest.approx(1.0, abs=1e-4)
                assert http.get(f"/images/{image_id}/content").content == data
        victims = sorted(acknowledged)[: len(acknowledged) // 2]

        # (d): deletes from 4 clients, killed part-way.
        def deleter(worker: int, stop: threading.Event) -> None:
            with httpx.Client(base_url=second.url, timeout=60) as http:
                for image_id in victims[worker::4]:
                    if stop.is_set():
                        return
                    try:
                        reply = http.delete(f"/images/{image_id}")
                    except httpx.HTTPError:
                        return
                    if reply.status_code == 200:
                        deleted.add(image_id)

        stop, threads = run_workers(deleter, 4)
        wait_until(lambda: len(deleted) >= 8, timeout_s=60, what="acknowledged deletes")
        second.kill9()
        stop.set()
        for thread in threads:
            thread.join()
    finally:
        second.stop()
    assert len(deleted) < len(victims)  # the kill came part-way

    third = restart_and_settle(data_dir, env)
    try:
        with third.client() as http:
            for image_id in sorted(deleted)[:10]:
                assert http.get(f"/images/{image_id}").status_code == 404
                assert http.get(f"/images/{image_id}/content").status_code == 404
                assert http.get(f"/images/{image_id}/thumbnail").status_code == 404
    finally:
        third.stop()  # publishes its last changes
    state = assert_consistent(
        mongo_uri, mongo_db_name, data_dir, present=set(acknowledged) - set(victims), gone=deleted
    )
    with MongoClient(mongo_uri) as mongo:
        for image_id in sorted(set(acknowledged) & state["records"])[::20]:
            chunk = mongo[mongo_db_name]["content.chunks"].find_one({"files_id": image_id})
            assert bytes(chunk["data"]) == acknowledged[image_id]


def test_kill_9_during_ingest_of_a_folder(
    data_dir: Path, tmp_path: Path, mongo_uri: str, mongo_db_name: str
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, (data, _) in enumerate(fashion_mnist_pngs(0, FOLDER_SIZE)):
        (folder / f"{i:04d}.png").write_bytes(data)
    env = {"MONGO_URI": mongo_uri, "MONGO_DB": mongo_db_name}
    # Batches of 32: the kill must land between batches, not after one batch of the whole folder.
    command = [sys.executable, "-m", "service.ingest", str(folder), "--no-progress", "--batch-size", "32"]
    process_env = {**ServiceProcess(data_dir, **env).env}

    # The index must exist first, as when a user ingests into `make run`'s catalogue.
    encoder = Encoder.load(data_dir / "model.pt")
    IndexStore(data_dir / "index").publish(
        SearchIndex.empty_flat(encoder.embed_dim), encoder_path=data_dir / "model.pt"
    )
    ingest = subprocess.Popen(command, env=process_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with MongoClient(mongo_uri) as mongo:
        try:
            wait_until(
                lambda: mongo[mongo_db_name].images.estimated_document_count() >= 32,
                timeout_s=300,
                interval_s=0.05,
                what="ingest to store a batch",
            )
        finally:
            ingest.kill()
            ingest.wait()
        assert ingest.returncode == -9
        stored_at_kill = mongo[mongo_db_name].images.count_documents({})
    assert stored_at_kill < FOLDER_SIZE

    restart_and_settle(data_dir, env).stop()
    assert_consistent(mongo_uri, mongo_db_name, data_dir)

    rerun = subprocess.run(command, env=process_env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    summary = next(line for line in rerun.stdout.splitlines() if line.startswith("added "))
    state = assert_consistent(mongo_uri, mongo_db_name, data_dir)
    assert len(state["records"]) == FOLDER_SIZE, summary
    # The second run stores only what the first did not: every file counted once.
    assert summary.startswith(
        f"added {FOLDER_SIZE - stored_at_kill}, already present {stored_at_kill}, skipped 0"
    ), (
        summary,
        stored_at_kill,
    )

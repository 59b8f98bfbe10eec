"""`python -m service.backup create/restore`: a backup taken while the service runs, restored into
an empty database and DATA_DIR, gives the same catalogue, the same versions and the same top-10
for 20 queries; restoring over a catalogue that is not empty is refused and changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
from pymongo import MongoClient
from service_helpers import Catalogue, fashion_mnist_pngs, service_client, service_settings, wait_until

from index.store import IndexStore


def backup_command(
    verb: str, directory: Path, data_dir: Path, uri: str, db_name: str
) -> subprocess.CompletedProcess:
    env = {**os.environ, "MONGO_URI": uri, "MONGO_DB": db_name, "DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "service.backup", verb, str(directory), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def whole_catalogue(client: httpx.Client) -> list[dict]:
    items, cursor = [], None
    while True:
        params = {"limit": 1000} | ({"cursor": cursor} if cursor is not None else {})
        page = client.get("/images", params=params).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def top10(client: httpx.Client, queries: list[bytes]) -> list[list[tuple[int, float]]]:
    results = []
    for data in queries:
        reply = client.post("/search", files={"file": ("q.png", data, "image/png")}, data={"k": "10"})
        assert reply.status_code == 200, reply.text
        results.append([(r["id"], round(r["score"], 4)) for r in reply.json()["results"]])
    return results


def test_backup_while_running_and_restore_into_an_empty_catalogue(
    catalogue: Catalogue, tmp_path: Path, mongo_uri: str, module_db_name: str
) -> None:
    client, store = catalogue.client, IndexStore(catalogue.data_dir / "index")
    # Everything uploaded is published (the debounced republish), so both sides index the same vectors.
    wait_until(
        lambda: (
            store.read_manifest()["ntotal"] == len(catalogue.ids)
            and client.get("/version").json()["index_version"] == store.current_version()
        ),
        timeout_s=60,
        what="the catalogue's last republish",
    )
    queries = [data for data, _ in fashion_mnist_pngs(1000, 20)]
    expected_results = top10(client, queries)
    expected_items = whole_catalogue(client)
    expected_version = client.get("/version").json()

    backup = tmp_path / "backup"
    created = backup_command("create", backup, catalogue.data_dir, mongo_uri, module_db_name)
    assert created.returncode == 0, created.stderr
    assert f"backed up {len(catalogue.ids)} images" in created.stdout
    assert not (tmp_path / "backup.partial").exists()

    restored_dir, restored_db = tmp_path / "restored", f"test_{uuid.uuid4().hex[:12]}"
    restored_dir.mkdir()
    try:
        done = backup_command("restore", backup, restored_dir, mongo_uri, restored_db)
        assert done.returncode == 0, done.stderr
        settings = service_settings(restored_dir, mongo_uri, restored_db)
        with service_client(settings) as restored:
            wait_until(lambda: restored.get("/health/ready").json()["reconciled"], what="reconcile")
            version = restored.get("/version").json()
            assert (version["index_version"], version["model_version"], version["index_size"]) == (
                expected_version["index_version"],
                expected_version["model_version"],
                expected_version["index_size"],
            )
            assert whole_catalogue(restored) == expected_items  # records, labels, tags, statuses, versions
            assert top10(restored, queries) == expected_results
            for position in (0, 150, 299):
                image_id = catalogue.ids[position]
                assert restored.get(f"/images/{image_id}/content").content == catalogue.images[position]
            # New uploads continue after the restored ids: the counter came with the backup.
            new_id = restored.post("/images", files={"files": ("n.png", queries[0], "image/png")}).json()[
                "ids"
            ][0]
            assert new_id > max(catalogue.ids)

        again = backup_command("restore", backup, restored_dir, mongo_uri, restored_db)
        assert again.returncode == 2 and "already holds images" in again.stderr
        assert again.stderr.count("\n") == 1  # one line, no traceback
    finally:
        with MongoClient(mongo_uri) as mongo:
            mongo.drop_database(restored_db)


def test_backup_refuses_a_directory_that_is_not_empty(
    catalogue: Catalogue, tmp_path: Path, mongo_uri: str, module_db_name: str
) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    refused = backup_command("create", tmp_path / "full", catalogue.data_dir, mongo_uri, module_db_name)
    assert refused.returncode == 2 and "not empty" in refused.stderr
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    not_a_backup = backup_command("restore", tmp_path / "full", tmp_path, mongo_uri, "unused")
    assert not_a_backup.returncode == 2 and "is not a backup" in not_a_backup.stderr

"""service.connection: a refresh attaches to the embedded database the service announces in
DATA_DIR/db.json instead of starting a second server on the same files (real SecantusDB)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from encoder_files import install_encoder
from pymongo import MongoClient
from service_helpers import fashion_mnist_pngs, running_service, service_settings, upload

import service.connection as connection
from service.embedded_db import EmbeddedDatabaseError, free_port
from service.settings import Settings
from training.data.datasets import DataError, load_dataset


@pytest.fixture
def embedded_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings with MONGO_URI unset (embedded database under tmp_path), in the environment too."""
    monkeypatch.delenv("MONGO_URI", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    return Settings(_env_file=None, MONGO_URI=None, DATA_DIR=tmp_path)


def answers(uri: str) -> bool:
    with MongoClient(uri, serverSelectionTimeoutMS=500) as client:
        try:
            client.admin.command("ping")
            return True
        except Exception:
            return False


def test_first_process_starts_and_announces_the_others_attach(embedded_env: Settings) -> None:
    discovery = embedded_env.DATA_DIR / "db.json"
    uri, server = connection.attach_or_start(embedded_env)
    try:
        assert server is not None and answers(uri)
        announced = json.loads(discovery.read_text())
        assert announced == {"uri": uri, "pid": server.process.pid, "owner": os.getpid()}
        assert connection.attach_or_start(embedded_env) == (uri, None)  # attached, nothing started
        with connection.catalogue_connection() as (attached, _):
            assert attached == uri
        assert answers(uri)  # leaving the attached connection does not stop the owner's server
    finally:
        server.stop()
    assert not discovery.exists() and not answers(uri)


def test_announcement_of_a_dead_server_is_replaced(embedded_env: Settings) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    stale = {"uri": f"mongodb://127.0.0.1:{free_port()}/?directConnection=true", "pid": int(dead.stdout)}
    (embedded_env.DATA_DIR / "db.json").write_text(json.dumps(stale))
    uri, server = connection.attach_or_start(embedded_env)
    try:
        assert server is not None and answers(uri) and uri != stale["uri"]
        assert json.loads((embedded_env.DATA_DIR / "db.json").read_text())["pid"] == server.process.pid
    finally:
        server.stop()


def test_a_running_server_that_does_not_answer_is_an_error_not_a_second_server(
    embedded_env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "ATTACH_TIMEOUT_S", 0.5)
    silent = {"uri": f"mongodb://127.0.0.1:{free_port()}/?directConnection=true", "pid": os.getpid()}
    (embedded_env.DATA_DIR / "db.json").write_text(json.dumps(silent))
    with pytest.raises(EmbeddedDatabaseError, match="is running but does not answer"):
        connection.attach_or_start(embedded_env)
    # Through the refresh's data source: one clear line (DataError: exit 1), no second server.
    with pytest.raises(DataError, match="^cannot open the catalogue database: the embedded database"):
        load_dataset("catalogue", 28)
    assert not embedded_env.db_dir.exists()
    assert json.loads((embedded_env.DATA_DIR / "db.json").read_text()) == silent


def test_refresh_attaches_to_the_running_services_embedded_database(
    embedded_env: Settings, encoder_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_encoder(encoder_file, embedded_env.DATA_DIR / "model.pt")
    monkeypatch.setenv("MONGO_DB", "embedded")
    settings = service_settings(embedded_env.DATA_DIR, None, "embedded", EMBEDDED_DB_PORT=free_port())
    with running_service(settings) as url, httpx.Client(base_url=url) as client:
        image_id = upload(client, fashion_mnist_pngs(0, 1))["ids"][0]
        assert load_dataset("catalogue", 28).ids.tolist() == [image_id]

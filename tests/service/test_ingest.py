"""`python -m service.ingest`: idempotent, resumable after a kill, shares the upload write path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from pymongo import MongoClient
from service_helpers import png_bytes, running_service, service_settings, wait_until

from index.store import IndexStore
from service.catalogue import VECTOR_FIELDS, decode_vector
from service.ingest import main as ingest_main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ingest_env(monkeypatch, data_dir, mongo_uri, mongo_db_name) -> dict[str, str]:
    env = {"MONGO_URI": mongo_uri, "MONGO_DB": mongo_db_name, "DATA_DIR": str(data_dir)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def test_fashion_mnist_ingest_is_idempotent(ingest_env, data_dir, mongo_uri, mongo_db_name, capsys) -> None:
    assert ingest_main(["--fashion-mnist", "--limit", "30", "--no-progress"]) == 0
    assert "added 30, already present 0, skipped 0" in capsys.readouterr().out
    assert ingest_main(["--fashion-mnist", "--limit", "40", "--no-progress"]) == 0
    assert "added 10, already present 30, skipped 0" in capsys.readouterr().out
    store = IndexStore(data_dir / "index")
    index = store.load()
    assert index.ntotal == 40
    # Every record carries its vector, tagged by the model that computed it (what replicas add).
    with MongoClient(mongo_uri) as mongo:
        stored = list(mongo[mongo_db_name].images.find({}, VECTOR_FIELDS))
    assert {d["model_version"] for d in stored} == {store.read_manifest()["model_version"]}
    vectors = [decode_vector(d.get("vector"), index.dim) for d in stored]
    assert len(vectors) == 40 and all(v is not None for v in vectors)
    np.testing.assert_allclose(np.linalg.norm(np.stack(vectors), axis=1), 1.0, atol=1e-4)  # NxD rows
    settings = service_settings(data_dir, mongo_uri, mongo_db_name)
    with running_service(settings) as url, httpx.Client(base_url=url) as client:
        assert client.get("/health/ready").json()["index_size"] == 40
        records = client.get("/images", params={"limit": 40}).json()["items"]
        assert {r["status"] for r in records} == {"indexed"}
        assert records[0]["label"] == "Ankle boot" and records[0]["source"] == "fashion-mnist:test"


def test_folder_ingest_with_labels_and_unreadable_files(ingest_env, tmp_path, capsys) -> None:
    root = tmp_path / "photos"
    for label, value in (("cats", 10), ("dogs", 200)):
        (root / label).mkdir(parents=True)
        for i in range(3):
            (root / label / f"{i}.png").write_bytes(png_bytes(np.full((20, 20), value + i, np.uint8)))
    (root / "dogs" / "broken.png").write_bytes(b"not really a png")
    (root / "cats" / "copy-of-0.png").write_bytes((root / "cats" / "0.png").read_bytes())  # same bytes
    assert ingest_main([str(root), "--labels-from-dirs", "--tags", "pets", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "added 6, already present 1, skipped 1" in out and "dogs/broken.png" in out
    assert ingest_main([str(root), "--labels-from-dirs", "--tags", "pets", "--no-progress"]) == 0
    assert "added 0, already present 7, skipped 1" in capsys.readouterr().out  # re-running adds nothing
    with MongoClient(ingest_env["MONGO_URI"]) as mongo:
        records = list(mongo[ingest_env["MONGO_DB"]].images.find({}, {"label": 1, "tags": 1, "status": 1}))
    assert sorted(r["label"] for r in records) == ["cats"] * 3 + ["dogs"] * 3
    assert all(r["tags"] == ["pets"] and r["status"] == "indexed" for r in records)


def test_bad_arguments_give_one_line_errors(ingest_env, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        ingest_main([])
    assert exit_info.value.code == 2 and "PATH or --fashion-mnist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ingest_main([str(tmp_path / "missing")])
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert ingest_main([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.strip() == "error: no images found"


@pytest.mark.slow
def test_ingest_resumes_after_a_kill(ingest_env, data_dir, capsys) -> None:
    env = dict(os.environ, **ingest_env, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "service.ingest", "--fashion-mnist", "--limit", "400", "--no-progress"]
    process = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    with MongoClient(ingest_env["MONGO_URI"]) as mongo:
        images = mongo[ingest_env["MONGO_DB"]].images
        try:
            wait_until(lambda: images.count_documents({}) >= 100, timeout_s=120, what="the first records")
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        stored_before = images.count_documents({})
        assert 100 <= stored_before < 400, "the kill should land mid-run"
    assert ingest_main(["--fashion-mnist", "--limit", "400", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"added {400 - stored_before}, already present {stored_before}, skipped 0" in out
    index = IndexStore(data_dir / "index").load()
    assert index.ntotal == 400
    with MongoClient(ingest_env["MONGO_URI"]) as mongo:
        images = mongo[ingest_env["MONGO_DB"]].images
        assert images.count_documents({"status": "indexed"}) == 400
        assert sorted(index.ids().tolist()) == sorted(d["_id"] for d in images.find({}, {"_id": 1}))


def test_ingest_attaches_to_the_services_embedded_database(data_dir, monkeypatch, capsys) -> None:
    """Without MONGO_URI, ingest uses the server the running service announced (never a second one)."""
    from service.embedded_db import free_port

    port = free_port()
    monkeypatch.delenv("MONGO_URI", raising=False)
    monkeypatch.setenv("DATA_DIR", str(data_dir))
    monkeypatch.setenv("MONGO_DB", "attach")
    settings = service_settings(data_dir, None, "attach", EMBEDDED_DB_PORT=port)
    with running_service(settings) as url, httpx.Client(base_url=url) as client:
        assert f":{port}" in (data_dir / "db.json").read_text()
        assert ingest_main(["--fashion-mnist", "--limit", "5", "--no-progress"]) == 0
        assert "added 5, already present 0" in capsys.readouterr().out
        wait_until(
            lambda: client.get("/health/ready").json().get("index_size") == 5, what="the polled publish"
        )
        assert len(client.get("/images").json()["items"]) == 5
    assert not (data_dir / "db.json").exists()  # the service's server stopped and withdrew its address

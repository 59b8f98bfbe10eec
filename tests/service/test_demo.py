"""The first run of `make run` (service.demo): demo encoder and catalogue when missing, nothing after."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pymongo import MongoClient

from service.demo import DEMO_ENCODER
from training.encoder import read_encoder_record, training_size

ROOT = Path(__file__).resolve().parents[2]


def run_demo(data_dir: Path, mongo_uri: str, db_name: str, count: int) -> subprocess.CompletedProcess:
    env = os.environ | {"DATA_DIR": str(data_dir), "MONGO_URI": mongo_uri, "MONGO_DB": db_name}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "service.demo", "--count", str(count)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_demo_installs_the_model_and_catalogue_once(tmp_path, mongo_uri, mongo_db_name) -> None:
    first = run_demo(tmp_path, mongo_uri, mongo_db_name, 40)
    assert first.returncode == 0, first.stderr
    assert "demo encoder installed" in first.stdout and "added 40" in first.stdout
    model = tmp_path / "model.pt"
    assert model.read_bytes() == DEMO_ENCODER.read_bytes()
    record = read_encoder_record(model)
    assert (record["in_channels"], training_size(record)) == (1, 28)  # trained on Fashion-MNIST's format

    client: MongoClient = MongoClient(mongo_uri)
    try:
        records = list(client[mongo_db_name]["images"].find({}, {"label": 1, "status": 1}))
    finally:
        client.close()
    assert len(records) == 40 and all(r["status"] == "indexed" and r["label"] for r in records)

    again = run_demo(tmp_path, mongo_uri, mongo_db_name, 40)
    assert again.returncode == 0, again.stderr
    assert "index version" in again.stdout and "40 images already" in again.stdout
    assert "ingesting" not in again.stdout

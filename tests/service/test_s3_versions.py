"""Replicas on different machines share index versions through S3 (moto's server over HTTP):
each has its own INDEX_DIR cache; what one publishes the other downloads and serves."""

from __future__ import annotations

from pathlib import Path

import pytest
from encoder_files import install_encoder
from service_helpers import fashion_mnist_pngs, service_client, service_settings, upload, wait_until

from index.storage import S3Storage
from index.synced_store import SyncedIndexStore


def test_a_version_published_to_s3_is_served_by_a_replica_with_another_cache(
    tmp_path: Path, encoder_file: Path, mongo_uri: str, mongo_db_name: str, s3_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    environment = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test",
                   "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    for name, value in environment.items():  # boto3's default chain, as a deployment sets it
        monkeypatch.setenv(name, value)
    url = f"s3://index-store/{mongo_db_name}"
    machine_a, machine_b = tmp_path / "a", tmp_path / "b"
    machine_a.mkdir()
    install_encoder(encoder_file, machine_a / "model.pt")  # only A has a model file; B gets it from S3
    store = SyncedIndexStore(tmp_path / "reader", S3Storage("index-store", mongo_db_name))
    items = fashion_mnist_pngs(40, 3)

    with service_client(service_settings(machine_a, mongo_uri, mongo_db_name, INDEX_STORAGE_URL=url)) as a:
        ids = upload(a, [(png, f"{i}.png") for i, (png, _) in enumerate(items)])["ids"]
        wait_until(lambda: store.current_version() and store.read_manifest()["ntotal"] == 3,
                   timeout_s=30, what="A to publish its 3 images to S3")  # fmt: skip
        assert not (machine_a / "index" / "CURRENT").exists()  # CURRENT lives in the bucket only

    published = store.current_version()
    with service_client(service_settings(machine_b, mongo_uri, mongo_db_name, INDEX_STORAGE_URL=url)) as b:
        assert b.get("/version").json()["index_version"] == published
        assert (machine_b / "index" / "versions" / published / "index.faiss").is_file()  # downloaded
        query = {"file": ("q.png", items[1][0], "image/png")}
        assert b.post("/search", files=query, data={"k": "1"}).json()["results"][0]["id"] == ids[1]

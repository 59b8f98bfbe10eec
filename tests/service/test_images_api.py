"""The catalogue API over real HTTP: upload, dedupe, read, list, delete; auth; metrics; version."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image
from pymongo import MongoClient
from service_helpers import fashion_mnist_pngs, png_bytes, upload


def test_upload_read_list_delete(start_service) -> None:
    items = fashion_mnist_pngs(0, 6)
    with start_service() as client:
        reply = upload(client, [(d, f"{i}.png") for i, (d, _) in enumerate(items)], label="Shirt", tags="a,b")
        ids = reply["ids"]
        assert len(set(ids)) == 6 and all(item["created"] for item in reply["items"])
        assert all(item["status"] == "indexed" for item in reply["items"])

        record = client.get(f"/images/{ids[0]}").json()
        assert record["label"] == "Shirt" and record["tags"] == ["a", "b"]
        assert (record["width"], record["height"], record["media_type"]) == (28, 28, "image/png")

        content = client.get(f"/images/{ids[0]}/content")
        assert content.headers["content-type"] == "image/png" and content.content == items[0][0]
        thumbnail = client.get(f"/images/{ids[0]}/thumbnail")
        assert thumbnail.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(thumbnail.content)).size == (28, 28)  # never upscaled

        page1 = client.get("/images", params={"limit": 4, "label": "Shirt"}).json()
        page2 = client.get("/images", params={"limit": 4, "cursor": page1["next_cursor"]}).json()
        assert [r["id"] for r in page1["items"] + page2["items"]] == sorted(ids)
        assert page2["next_cursor"] is None
        assert client.get("/images", params={"tag": "b"}).json()["items"][0]["id"] == min(ids)
        assert client.get("/images", params={"label": "Coat"}).json()["items"] == []

        query = {"file": ("q.png", items[2][0], "image/png")}
        assert client.post("/search", files=query).json()["results"][0]["id"] == ids[2]
        # Inline thumbnails: the first N results carry the same bytes GET .../thumbnail serves (and
        # that read puts them in the service's memory: the delete below must still remove them).
        inline = client.post("/search", files=query, data={"k": "5", "thumbnails": "3"}).json()["results"]
        assert [r["thumbnail_data_url"] is not None for r in inline] == [True] * 3 + [False] * 2
        for result in inline[:3]:
            prefix, encoded = result["thumbnail_data_url"].split(",")
            served = client.get(f"/images/{result['id']}/thumbnail")
            assert prefix == "data:image/png;base64" and base64.b64decode(encoded) == served.content
        etag = client.get(f"/images/{ids[2]}/thumbnail").headers["etag"]
        revalidated = client.get(f"/images/{ids[2]}/thumbnail", headers={"If-None-Match": f'"x", {etag}'})
        assert revalidated.status_code == 304 and revalidated.content == b""
        assert revalidated.headers["etag"] == etag
        other = client.get(f"/images/{ids[3]}/thumbnail", headers={"If-None-Match": etag})
        assert other.status_code == 200 and other.headers["etag"] != etag
        deleted = client.delete(f"/images/{ids[2]}")
        assert deleted.status_code == 200 and deleted.json()["removed_from_index"] is True
        for path in (f"/images/{ids[2]}", f"/images/{ids[2]}/content", f"/images/{ids[2]}/thumbnail"):
            assert client.get(path).status_code == 404
        assert client.delete(f"/images/{ids[2]}").status_code == 404
        results = client.post("/search", files=query, data={"k": "10"}).json()["results"]
        assert ids[2] not in [r["id"] for r in results] and len(results) == 5
        assert client.get("/health/ready").json()["index_size"] == 5


def test_same_bytes_are_stored_once(start_service) -> None:
    data = fashion_mnist_pngs(10, 1)[0][0]
    with start_service() as client:
        first = upload(client, [(data, "a.png")])["items"][0]
        again = upload(client, [(data, "b.png")])["items"][0]
        assert first["created"] is True and again["created"] is False and again["id"] == first["id"]
        # Concurrent uploads of one new image: one id for all of them, one record.
        fresh = fashion_mnist_pngs(11, 1)[0][0]
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: upload(client, [(fresh, "c.png")]), range(8)))
        assert len({r["ids"][0] for r in replies}) == 1
        assert sum(r["items"][0]["created"] for r in replies) == 1
        assert len(client.get("/images").json()["items"]) == 2


def test_one_request_with_repeated_and_known_files_stores_each_once(start_service) -> None:
    """The batched write path: duplicates inside one request and files stored earlier."""
    (known, _), (new, _), (other, _) = fashion_mnist_pngs(30, 3)
    with start_service() as client:
        first = upload(client, [(known, "known.png")])["items"][0]
        reply = upload(client, [(new, "n1.png"), (known, "k.png"), (new, "n2.png"), (other, "o.png")])
        items = reply["items"]
        assert [item["created"] for item in items] == [True, False, False, True]
        assert items[1]["id"] == first["id"] and items[0]["id"] == items[2]["id"]
        assert len(set(reply["ids"])) == 3
        for item, data in ((items[0], new), (items[3], other)):
            assert client.get(f"/images/{item['id']}/content").content == data  # GridFS reads it back
            assert client.get(f"/images/{item['id']}").json()["filename"] in ("n1.png", "o.png")
        assert len(client.get("/images").json()["items"]) == 3
        assert client.get("/health/ready").json()["index_size"] == 3


def test_ids_are_unique_under_concurrent_uploads(start_service) -> None:
    items = fashion_mnist_pngs(20, 24)
    with start_service() as client, ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda item: upload(client, [(item[0], "x.png")]), items))
        ids = [r["ids"][0] for r in replies]
        assert len(set(ids)) == 24
        assert client.get("/health/ready").json()["index_size"] == 24


def test_unusual_modes_are_converted_not_refused(start_service) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)
    images = {
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "sixteen.png": Image.fromarray((rng.integers(0, 65535, (30, 30))).astype(np.uint16)),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "alpha.png": Image.fromarray(np.dstack([rgb, np.full((40, 30), 128, np.uint8)]), "RGBA"),
    }
    with start_service() as client:
        for name, image in images.items():
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG" if name.endswith(".jpg") else "PNG")
            reply = upload(client, [(buffer.getvalue(), name)])
            image_id = reply["ids"][0]
            assert reply["items"][0]["status"] == "indexed", name
            thumb = client.get(f"/images/{image_id}/thumbnail")
            assert Image.open(io.BytesIO(thumb.content)).mode in ("L", "RGB"), name
        assert client.get("/images/1/content").headers["content-type"] == "image/jpeg"


def test_api_key_guards_writes_and_admin(start_service) -> None:
    data = png_bytes(np.zeros((28, 28), np.uint8))
    files = {"files": ("a.png", data, "image/png")}
    with start_service(API_KEY="s3cret") as client:
        assert client.post("/images", files=files).status_code == 401
        wrong = client.post("/images", files=files, headers={"X-API-Key": "nope"})
        assert wrong.status_code == 403 and wrong.json()["detail"] == "invalid API key"
        assert client.get("/images").status_code == 200  # reads stay open by default
        ok = client.post("/images", files=files, headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 201
        image_id = ok.json()["ids"][0]
        assert client.delete(f"/images/{image_id}").status_code == 401
        assert client.post("/admin/reload").status_code == 401
        assert client.post("/admin/reload", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.delete(f"/images/{image_id}", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_protected_reads(start_service) -> None:
    with start_service(API_KEY="k", PROTECT_READS=True) as client:
        assert client.get("/images").status_code == 401
        assert client.get("/images", headers={"X-API-Key": "k"}).status_code == 200
        assert client.get("/health/live").status_code == 200  # probes stay open


def test_metrics_version_and_openapi(start_service) -> None:
    with start_service() as client:
        upload(client, [(fashion_mnist_pngs(0, 1)[0][0], "a.png")])
        client.get("/images/999999")
        text = client.get("/metrics").text
        assert 'http_requests_total{method="POST",route="/images",status="201"} 1.0' in text
        assert 'route="/images/{image_id}",status="404"' in text  # the template, not the id
        assert "http_request_duration_seconds_bucket" in text
        assert "index_vectors 1.0" in text
        version = client.get("/version").json()
        assert f'model_version="{version["model_version"]}"' in text
        assert version["index_size"] == 1 and version["embed_dim"] > 0
        schema = client.get("/openapi.json").json()
        assert {"/images", "/search", "/classify", "/health/ready", "/admin/reload"} <= set(schema["paths"])
        assert client.get("/docs").status_code == 200


def test_live_is_independent_of_the_model(start_service, data_dir) -> None:
    (data_dir / "model.pt").unlink()
    with start_service() as client:
        assert client.get("/health/live").status_code == 200
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and "no model" in ready.json()["detail"]
        # Uploads are still stored (pending); searches say why they cannot run.
        reply = upload(client, [(fashion_mnist_pngs(0, 1)[0][0], "a.png")])
        assert reply["items"][0]["status"] == "pending"
        search = client.post("/search", json={"vector": [0.0, 1.0]})
        assert search.status_code == 503 and "no model" in search.json()["detail"]


def test_bytes_deleted_while_read_answer_404_not_500(start_service, mongo_uri, mongo_db_name) -> None:
    """A delete removes the record, then the bytes: a download in between finds the GridFS file
    document without its chunks, which is 'no such image', not an internal error."""
    with start_service() as client:
        image_id = upload(client, [(fashion_mnist_pngs(0, 1)[0][0], "a.png")])["ids"][0]
        database = MongoClient(mongo_uri, serverSelectionTimeoutMS=2000)[mongo_db_name]
        try:
            assert database["content.chunks"].delete_many({"files_id": image_id}).deleted_count >= 1
        finally:
            database.client.close()
        reply = client.get(f"/images/{image_id}/content")
        assert reply.status_code == 404 and reply.json() == {"detail": f"no image with id {image_id}"}

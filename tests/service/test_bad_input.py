"""Bad input: each case answers a 4xx with a clear one-line JSON message, never a 500, and stores nothing."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from encoder_files import install_encoder
from PIL import Image
from pymongo import MongoClient
from service_helpers import fashion_mnist_pngs, png_bytes, running_service, service_settings

from service.queries import small_enough_to_decode_inline

MAX_UPLOAD_BYTES = 50_000
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def client(tmp_path_factory, encoder_file, mongo_uri, module_db_name) -> Iterator[httpx.Client]:
    directory = tmp_path_factory.mktemp("bad-input")
    install_encoder(encoder_file, directory / "model.pt")
    settings = service_settings(
        directory,
        mongo_uri,
        module_db_name,
        MAX_UPLOAD_BYTES=MAX_UPLOAD_BYTES,
        MAX_PIXELS=MAX_PIXELS,
        SEARCH_MAX_K=500,
    )
    with running_service(settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        reply = http.post(
            "/images", files={"files": ("seed.png", fashion_mnist_pngs(0, 1)[0][0], "image/png")}
        )
        assert reply.status_code == 201
        yield http


@pytest.fixture
def stored_nothing(mongo_uri, module_db_name) -> Iterator[None]:
    """Asserts that the test left the records and GridFS files exactly as they were."""
    with MongoClient(mongo_uri) as mongo:
        db = mongo[module_db_name]

        def counts() -> tuple[int, ...]:
            names = ("images", "content.files", "content.chunks", "thumbnails.files")
            return tuple(db[name].count_documents({}) for name in names)

        before = counts()
        yield
        assert counts() == before, "a rejected request wrote to the database"


def assert_error(reply: httpx.Response, status: int, *fragments: str) -> None:
    assert reply.status_code == status, reply.text
    detail = reply.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    for fragment in fragments:
        assert fragment.lower() in detail.lower(), detail


def post_files(client: httpx.Client, *files: tuple[str, bytes]) -> httpx.Response:
    return client.post(
        "/images", files=[("files", (name, data, "application/octet-stream")) for name, data in files]
    )


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


GOOD = png_bytes(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28))


@pytest.mark.usefixtures("stored_nothing")
class TestUploads:
    def test_not_an_image(self, client) -> None:
        assert_error(
            post_files(client, ("notes.txt", b"hello, this is text")),
            422,
            "notes.txt",
            "not a readable image",
        )

    def test_truncated_image(self, client) -> None:
        data = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)))
        assert_error(post_files(client, ("cut.png", data[: len(data) // 2])), 422, "cut.png")

    def test_corrupt_image(self, client) -> None:
        data = bytearray(GOOD)
        data[40:80] = bytes(40)  # the IDAT data no longer inflates
        assert_error(post_files(client, ("corrupt.png", bytes(data))), 422, "corrupt.png")

    def test_zero_bytes(self, client) -> None:
        assert_error(post_files(client, ("empty.png", b"")), 422, "empty")

    def test_over_max_upload_bytes(self, client) -> None:
        noise = np.random.default_rng(1).integers(0, 255, (300, 300), dtype=np.uint8)
        data = encoded(Image.fromarray(noise))
        assert len(data) > MAX_UPLOAD_BYTES
        assert_error(post_files(client, ("big.png", data)), 413, "limit", str(MAX_UPLOAD_BYTES))

    def test_decompression_bomb(self, client) -> None:
        data = encoded(Image.new("L", (4000, 4000)))  # tiny file, 16 megapixels
        assert len(data) < MAX_UPLOAD_BYTES
        assert_error(post_files(client, ("bomb.png", data)), 413, "4000x4000", "pixels", str(MAX_PIXELS))

    def test_one_bad_file_rejects_the_whole_request(self, client) -> None:
        assert_error(post_files(client, ("good.png", GOOD), ("bad.png", b"nope")), 422, "bad.png")

    def test_operator_smuggled_into_label_or_tags(self, client) -> None:
        files = [("files", ("good.png", GOOD, "image/png"))]
        assert_error(client.post("/images", files=files, data={"label": '{"$ne": null}'}), 422, "label")
        assert_error(client.post("/images", files=files, data={"tags": "ok,$where"}), 422, "tags")

    def test_no_file(self, client) -> None:
        assert_error(client.post("/images", data={"label": "x"}), 422, "files")


def search_json(client: httpx.Client, body) -> httpx.Response:
    return client.post("/search", json=body)


class TestSearch:
    def test_k_out_of_range(self, client) -> None:
        assert_error(search_json(client, {"vector": [1.0] * 128, "k": 0}), 422, "k")
        assert_error(search_json(client, {"vector": [1.0] * 128, "k": 1001}), 422, "k")
        assert_error(
            search_json(client, {"vector": [1.0] * 128, "k": 600}), 422, "at most 500"
        )  # SEARCH_MAX_K
        query = {"file": ("q.png", GOOD, "image/png")}
        assert_error(client.post("/search", files=query, data={"k": "0"}), 422, "k")
        assert_error(client.post("/search", files=query, data={"k": "many"}), 422, "k")

    def test_image_body_over_the_limits(self, client, stored_nothing) -> None:
        noise = np.random.default_rng(1).integers(0, 255, (300, 300), dtype=np.uint8)
        big = encoded(Image.fromarray(noise))
        headers = {"content-type": "image/png"}
        reply = client.post("/search", content=big, headers=headers)
        assert_error(reply, 413, "limit", str(MAX_UPLOAD_BYTES))
        bomb = encoded(Image.new("L", (4000, 4000)))
        assert_error(client.post("/search", content=bomb, headers=headers), 413, "pixels", str(MAX_PIXELS))
        # streamed without a Content-Length: cut off at the limit as it arrives
        chunks = (big[i : i + 8192] for i in range(0, len(big), 8192))
        assert_error(client.post("/search", content=chunks, headers=headers), 413, "limit")
        assert_error(client.post("/search?k=0", content=GOOD, headers=headers), 422, "k")

    def test_vector_of_the_wrong_dimension(self, client) -> None:
        assert_error(search_json(client, {"vector": [1.0, 2.0, 3.0]}), 422, "dimension 3", "128")

    def test_vector_with_nan_or_infinity(self, client) -> None:
        body = '{"vector": [NaN' + ", 1.0" * 127 + "]}"
        reply = client.post("/search", content=body, headers={"content-type": "application/json"})
        assert_error(reply, 422, "nan")
        body = '{"vector": [Infinity' + ", 1.0" * 127 + "]}"
        assert_error(client.post("/search", content=body, headers={"content-type": "application/json"}), 422)

    def test_zero_vector(self, client) -> None:
        assert_error(search_json(client, {"vector": [0.0] * 128}), 422, "zero")

    def test_unknown_id(self, client) -> None:
        assert_error(search_json(client, {"id": 987654321}), 404, "987654321")
        assert_error(client.get("/images/987654321"), 404, "987654321")
        assert_error(client.get("/images/987654321/content"), 404)
        assert_error(client.delete("/images/987654321"), 404)

    def test_odd_id_types(self, client) -> None:
        assert_error(search_json(client, {"id": "1"}), 422, "id")
        assert_error(search_json(client, {"id": True}), 422, "id")
        assert_error(search_json(client, {"id": 1, "vector": [1.0] * 128}), 422, "exactly one")
        assert_error(client.get("/images/abc"), 422, "image_id")
        assert_error(client.get("/images/-5"), 422, "image_id")

    def test_operators_smuggled_into_filters(self, client) -> None:
        vector = [1.0] * 128
        assert_error(search_json(client, {"vector": vector, "label": {"$ne": None}}), 422, "label")
        assert_error(search_json(client, {"vector": vector, "tags": [{"$gt": ""}]}), 422, "tags")
        assert_error(search_json(client, {"vector": vector, "tags": "a"}), 422, "tags")
        assert_error(search_json(client, {"vector": vector, "$where": "1"}), 422, "$where")
        assert_error(client.get("/images", params={"label": '{"$ne": null}'}), 422, "label")
        assert_error(client.get("/images", params={"tag": "$exists"}), 422, "tag")

    def test_bad_bodies(self, client) -> None:
        reply = client.post("/search", content=b"{not json", headers={"content-type": "application/json"})
        assert_error(reply, 422, "json")
        assert_error(search_json(client, [1, 2, 3]), 422, "object")
        assert_error(
            client.post("/search", content=b"x", headers={"content-type": "text/plain"}), 415, "text/plain"
        )
        assert_error(client.post("/search", files={"image": ("q.png", GOOD, "image/png")}), 422, '"file"')

    def test_bad_query_images(self, client) -> None:
        assert_error(client.post("/search", files={"file": ("q.png", b"", "image/png")}), 422, "empty")
        assert_error(
            client.post("/search", files={"file": ("q.png", b"junk", "image/png")}), 422, "not a readable"
        )
        bomb = encoded(Image.new("L", (4000, 4000)))
        assert_error(client.post("/classify", files={"file": ("q.png", bomb, "image/png")}), 413, "pixels")
        # Small enough to be decoded on the event loop (their headers are whole): the same errors.
        cut = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)))
        assert small_enough_to_decode_inline(cut[: len(cut) // 2]) and small_enough_to_decode_inline(GOOD)
        corrupt = bytearray(GOOD)
        corrupt[40:80] = bytes(40)  # the IDAT data no longer inflates
        for data in (cut[: len(cut) // 2], bytes(corrupt)):
            for path in ("/search", "/classify"):
                assert_error(
                    client.post(path, content=data, headers={"content-type": "image/png"}), 422, "query image"
                )
        assert not small_enough_to_decode_inline(bomb)  # declares 16M pixels: decoded off the loop

    def test_classify_parameters(self, client) -> None:
        query = {"file": ("q.png", GOOD, "image/png")}
        assert_error(client.post("/classify", files=query, data={"tau": "0"}), 422, "tau")
        assert_error(client.post("/classify", files=query, data={"k": "-1"}), 422, "k")

    def test_unknown_route_is_json(self, client) -> None:
        assert_error(client.get("/nope"), 404, "not found")

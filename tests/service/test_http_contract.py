"""The HTTP contract seen from a client: requests are built from `/openapi.json` (path templates,
request media types) and every real response, errors included, is checked against the documented
status codes, media types and JSON schemas (jsonschema over the document's own components).
Then the contract's details: unknown parameters refused, JSON-list tags, re-upload metadata,
the classify neighbour list, body limits before reading, CORS, and the API key kept out of logs."""

from __future__ import annotations

import fnmatch
import json
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from encoder_files import install_encoder
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from service_helpers import fashion_mnist_pngs, png_bytes, running_service, service_settings

from service.settings import Settings

KEY = "correct-horse-battery-staple"
AUTH = {"X-API-Key": KEY}
MAX_UPLOAD_BYTES = 60_000
MAX_REQUEST_BYTES = 400_000
DOCUMENT_URI = "urn:ssl-retrieval:openapi"


def pointer(*parts: str) -> str:
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


@dataclass
class ApiView:
    """What a generated client knows: operations, their request media types and response schemas."""

    document: dict
    client: httpx.Client
    called: set[tuple[str, str, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        resource = Resource.from_contents(self.document, default_specification=DRAFT202012)
        self.registry = Registry().with_resource(DOCUMENT_URI, resource)

    def operation(self, method: str, template: str) -> dict:
        return self.document["paths"][template][method.lower()]

    def call(self, method: str, template: str, path_params: dict | None = None, **request) -> httpx.Response:
        """Send a request as the document describes it, then check the response against it."""
        operation = self.operation(method, template)
        sent_as = (
            "application/json" if "json" in request else "multipart/form-data" if "files" in request else None
        )
        if sent_as is not None and "content" not in request:
            assert sent_as in operation["requestBody"]["content"], f"{method} {template} takes no {sent_as}"
        response = self.client.request(method, template.format(**(path_params or {})), **request)
        self.check(method, template, response)
        return response

    def check(self, method: str, template: str, response: httpx.Response) -> None:
        status = str(response.status_code)
        responses = self.operation(method, template)["responses"]
        assert status in responses, f"{method} {template} answered undocumented {status}: {response.text}"
        for header in responses[status].get("headers", {}):
            assert header.lower() in response.headers, f"{method} {template} {status} lacks {header}"
        content = responses[status].get("content", {})
        if not content:  # documented without a body (304)
            assert response.content == b"", f"{method} {template} {status} has an undocumented body"
            self.called.add((method.upper(), template, response.status_code))
            return
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        matches = [documented for documented in content if fnmatch.fnmatch(media_type, documented)]
        assert matches, f"{method} {template} {status}: {media_type} is not one of {list(content)}"
        if media_type == "application/json":
            location = pointer("paths", template, method.lower(), "responses", status, "content", matches[0])
            schema = {"$ref": f"{DOCUMENT_URI}#{location}/schema"}
            Draft202012Validator(schema, registry=self.registry).validate(response.json())
        self.called.add((method.upper(), template, response.status_code))


@pytest.fixture(scope="module")
def service(tmp_path_factory, encoder_file, mongo_uri, module_db_name) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("contract")
    install_encoder(encoder_file, directory / "model.pt")
    settings = service_settings(
        directory,
        mongo_uri,
        module_db_name,
        API_KEY=KEY,
        MAX_UPLOAD_BYTES=MAX_UPLOAD_BYTES,
        MAX_REQUEST_BYTES=MAX_REQUEST_BYTES,
    )
    with running_service(settings) as url:
        yield url


@pytest.fixture(scope="module")
def api(service: str) -> Iterator[ApiView]:
    with httpx.Client(base_url=service, timeout=60) as client:
        yield ApiView(client.get("/openapi.json").json(), client)


IMAGES = [data for data, _ in fashion_mnist_pngs(0, 4)]
FILE = {"file": ("q.png", IMAGES[0], "image/png")}


def test_every_documented_operation_answers_as_documented(api: ApiView) -> None:
    """At least one real call per operation and per documented error it can give here."""
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(IMAGES[:2])]
    # Nothing labelled yet: classify has no voters (409).
    unlabelled = api.call(
        "POST", "/images", files=[("files", ("u.png", IMAGES[3], "image/png"))], headers=AUTH
    )
    assert unlabelled.status_code == 201
    assert api.call("POST", "/classify", files=FILE).status_code == 409

    created = api.call("POST", "/images", files=files, data={"label": "Shirt", "tags": "a"}, headers=AUTH)
    assert created.status_code == 201
    image_id = created.json()["ids"][0]
    assert api.call("POST", "/images", files=files).status_code == 401
    assert api.call("POST", "/images", files=files, headers={"X-API-Key": "nope"}).status_code == 403
    assert (
        api.call(
            "POST", "/images", files={"files": ("x.txt", b"text", "text/plain")}, headers=AUTH
        ).status_code
        == 422
    )
    big = png_bytes(np.random.default_rng(0).integers(0, 255, (300, 300), dtype=np.uint8))
    assert len(big) > MAX_UPLOAD_BYTES
    assert (
        api.call("POST", "/images", files={"files": ("b.png", big, "image/png")}, headers=AUTH).status_code
        == 413
    )
    assert (
        api.call(
            "POST", "/images", content=b"{}", headers={**AUTH, "content-type": "application/json"}
        ).status_code
        == 415
    )
    assert api.call(
        "POST",
        "/images",
        content=b"--x\r\nbroken",
        headers={**AUTH, "content-type": "multipart/form-data; boundary=x"},
    ).status_code in (400, 422)

    assert api.call("GET", "/images").status_code == 200
    assert api.call("GET", "/images", params={"label": "$ne"}).status_code == 422
    assert api.call("GET", "/images/{image_id}", {"image_id": image_id}).status_code == 200
    assert api.call("GET", "/images/{image_id}", {"image_id": 10**12}).status_code == 404
    assert api.call("GET", "/images/{image_id}", {"image_id": "abc"}).status_code == 422
    for template in ("/images/{image_id}/content", "/images/{image_id}/thumbnail"):
        reply = api.call("GET", template, {"image_id": image_id})
        assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
        assert api.call("GET", template, {"image_id": 10**12}).status_code == 404
    etag = {"If-None-Match": api.client.get(f"/images/{image_id}/thumbnail").headers["etag"]}
    assert (
        api.call("GET", "/images/{image_id}/thumbnail", {"image_id": image_id}, headers=etag).status_code
        == 304
    )

    assert api.call("POST", "/search", files=FILE, data={"k": "3"}).status_code == 200
    assert api.call("POST", "/search", json={"id": image_id, "k": 2}).status_code == 200
    inline = api.call("POST", "/search", files=FILE, data={"k": "3", "thumbnails": "2"})
    assert [r["thumbnail_data_url"] is not None for r in inline.json()["results"]] == [True, True, False]
    assert api.call("POST", "/search", json={"id": image_id, "thumbnails": 64}).status_code == 200
    assert api.call("POST", "/search", json={"id": image_id, "thumbnails": 65}).status_code == 422
    dim = api.call("GET", "/version").json()["embed_dim"]
    assert api.call("POST", "/search", json={"vector": [1.0] * dim}).status_code == 200
    assert api.call("POST", "/search", json={"id": 10**12}).status_code == 404
    assert api.call("POST", "/search", json={"vector": [1.0] * dim, "k": 0}).status_code == 422
    assert (
        api.call("POST", "/search", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    )
    assert api.call(
        "POST", "/search", content=b"\xff\xfe{", headers={"content-type": "application/json"}
    ).status_code in (400, 422)
    assert api.call("POST", "/search", files={"file": ("q.png", big, "image/png")}).status_code == 413

    assert api.call("POST", "/classify", files=FILE).status_code == 200
    assert api.call("POST", "/classify", files=FILE, data={"neighbours": "1001"}).status_code == 422

    assert api.call("GET", "/health/live").status_code == 200
    assert api.call("GET", "/health/ready").status_code == 200
    assert api.call("GET", "/version").status_code == 200
    assert api.call("GET", "/replication").json()["role"] in ("publisher", "follower")
    assert api.call("GET", "/metrics").status_code == 200
    assert api.call("POST", "/admin/reload", headers=AUTH).status_code == 200
    assert api.call("POST", "/admin/reload").status_code == 401
    assert api.call("DELETE", "/images/{image_id}", {"image_id": image_id}, headers=AUTH).status_code == 200
    assert api.call("DELETE", "/images/{image_id}", {"image_id": image_id}, headers=AUTH).status_code == 404

    documented = {(m.upper(), p) for p, item in api.document["paths"].items() for m in item}
    assert documented == {(m, p) for m, p, _ in api.called}, "an operation without a checked call"


def test_errors_are_documented_as_one_string(api: ApiView) -> None:
    error = api.document["components"]["schemas"]["ErrorBody"]
    assert error["properties"]["detail"]["type"] == "string"
    assert "HTTPValidationError" not in api.document["components"]["schemas"]
    for path, item in api.document["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if status.startswith("4"):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)
    search = api.operation("POST", "/search")["requestBody"]["content"]
    assert set(search) == {"application/json", "multipart/form-data", "image/*"}
    assert "query parameters" in search["image/*"]["description"]  # where a raw image's options go
    classify = api.operation("POST", "/classify")["requestBody"]["content"]
    assert set(classify) == {"multipart/form-data", "image/*"}
    assert api.operation("GET", "/metrics")["responses"]["200"]["content"].keys() == {"text/plain"}


def detail(reply: httpx.Response, status: int) -> str:
    assert reply.status_code == status, reply.text
    message = reply.json()["detail"]
    assert isinstance(message, str) and "\n" not in message
    assert " object at 0x" not in message and "<class" not in message, message
    return message


class TestNothingIsDroppedSilently:
    def test_query_parameters_an_operation_does_not_take(self, api: ApiView) -> None:
        assert 'unknown query parameter "k"' in detail(api.client.post("/search?k=5", files=FILE), 422)
        assert '"k"' in detail(api.client.post("/search", params={"k": 5}, json={"id": 1}), 422)
        assert '"verbose"' in detail(api.client.get("/health/live", params={"verbose": 1}), 422)
        assert '"lable"' in detail(api.client.get("/images", params={"lable": "Shirt"}), 422)

    def test_form_and_json_fields_an_operation_does_not_take(self, api: ApiView) -> None:
        assert 'unknown field "K"' in detail(api.client.post("/search", files=FILE, data={"K": "5"}), 422)
        reply = api.client.post("/classify", files=FILE, data={"min_score": "0.5"})
        assert '"min_score"' in detail(reply, 422)
        assert '"limit"' in detail(api.client.post("/search", json={"id": 1, "limit": 5}), 422)

    def test_a_file_sent_as_a_plain_field_names_the_field_without_a_repr(self, api: ApiView) -> None:
        message = detail(
            api.client.post("/search", data={"file": "not a file"}, files={"x": ("x", b"")}), 422
        )
        assert "file" in message

    def test_not_an_image_has_no_object_repr(self, api: ApiView) -> None:
        message = detail(
            api.client.post("/search", files={"file": ("q.bin", b"\x00" * 64, "image/png")}), 422
        )
        assert "not a readable image" in message

    def test_form_tags_as_a_json_list(self, api: ApiView) -> None:
        data = png_bytes(np.full((28, 28), 7, dtype=np.uint8))
        files = {"files": ("t.png", data, "image/png")}
        reply = api.client.post("/images", files=files, data={"tags": '["red", "sale"]'}, headers=AUTH)
        assert reply.status_code == 201, reply.text
        record = api.client.get(f"/images/{reply.json()['ids'][0]}").json()
        assert record["tags"] == ["red", "sale"]
        found = api.client.post("/search", files=FILE, data={"tags": '["red","sale"]', "k": "50"}).json()
        assert [r["id"] for r in found["results"]] == [record["id"]]
        for bad in ('["red", 1]', '["red"', "[red]", '{"a": 1}'):
            assert "tags" in detail(
                api.client.post("/images", files=files, data={"tags": bad}, headers=AUTH), 422
            )
        assert api.client.get(f"/images/{record['id']}").json()["tags"] == ["red", "sale"]


def test_known_bytes_with_new_metadata_update_it_and_say_so(api: ApiView) -> None:
    data = png_bytes(np.full((28, 28), 99, dtype=np.uint8))
    files = {"files": ("m.png", data, "image/png")}
    first = api.client.post("/images", files=files, data={"label": "Coat", "tags": "x"}, headers=AUTH).json()
    image_id = first["ids"][0]
    assert first["items"][0]["created"] is True and first["items"][0]["updated"] == []

    again = api.client.post(
        "/images", files=files, data={"label": "Bag", "source": "shop"}, headers=AUTH
    ).json()
    assert again["items"][0] == {
        "id": image_id,
        "created": False,
        "status": "indexed",
        "filename": "m.png",
        "updated": ["label", "source"],
    }
    record = api.client.get(f"/images/{image_id}").json()
    assert (record["label"], record["tags"], record["source"]) == ("Bag", ["x"], "shop")

    same = api.client.post("/images", files=files, data={"label": "Bag"}, headers=AUTH).json()
    assert same["items"][0]["updated"] == []  # nothing differed
    bare = api.client.post("/images", files=files, headers=AUTH).json()
    assert (
        bare["items"][0]["updated"] == [] and api.client.get(f"/images/{image_id}").json()["label"] == "Bag"
    )


def read_json_response(connection: socket.socket) -> tuple[str, str]:
    """(status line and headers, body) of one HTTP response with a JSON object body."""
    reply = b""
    while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
        received = connection.recv(65536)  # the socket's timeout bounds the wait
        assert received, f"connection closed after {reply!r}"
        reply += received
    head, _, body = reply.decode("latin-1").partition("\r\n\r\n")
    return head, body


class TestBodyLimits:
    def test_content_length_over_the_limit_is_refused_before_the_body_is_sent(self, service: str) -> None:
        """Only the headers go out; the 413 must come back without the server waiting for a body."""
        address = urlsplit(service)
        with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
            connection.sendall(
                b"POST /search HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 500000000\r\n\r\n"
            )
            head, body = read_json_response(connection)
        assert head.startswith("HTTP/1.1 413"), head
        assert "over the limit" in json.loads(body)["detail"]

    def test_a_chunked_body_is_cut_off_at_the_limit(self, service: str, api: ApiView) -> None:
        """No Content-Length: the server counts the streamed bytes and answers 413 once past the
        limit, while the client still holds the rest of the body (it never sends the last chunk)."""
        before = api.client.get("/images", params={"limit": 1000}).json()["items"]
        address = urlsplit(service)
        with socket.create_connection((address.hostname, address.port), timeout=20) as connection:
            connection.sendall(
                b"POST /images HTTP/1.1\r\nHost: test\r\nX-API-Key: " + KEY.encode() + b"\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
            connection.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            chunk = b"\0" * 65536
            for _ in range(MAX_REQUEST_BYTES // len(chunk) + 2):  # just past the limit, then stop
                connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            head, body = read_json_response(connection)
        assert head.startswith("HTTP/1.1 413"), head
        assert f"over the limit of {MAX_REQUEST_BYTES} bytes" in json.loads(body)["detail"]
        assert api.client.get("/images", params={"limit": 1000}).json()["items"] == before

    def test_one_file_over_the_per_file_limit(self, api: ApiView) -> None:
        message = detail(
            api.client.post("/classify", files={"file": ("q.png", b"\x89PNG" * 20_000, "image/png")}), 413
        )
        assert str(MAX_UPLOAD_BYTES) in message


def test_the_api_key_never_reaches_the_logs(api: ApiView, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    files = {"files": ("k.png", IMAGES[1], "image/png")}
    assert api.client.post("/images", files=files, headers=AUTH).status_code == 201
    assert api.client.post("/images", files=files, headers={"X-API-Key": KEY + "-wrong"}).status_code == 403
    assert api.client.delete("/images/1").status_code == 401
    assert "wrong X-API-Key" in caplog.text and "no X-API-Key header" in caplog.text  # refusals are logged
    assert KEY not in caplog.text
    settings = Settings(_env_file=None, API_KEY=KEY)  # printed or logged, the settings mask the key
    assert KEY not in repr(settings) and KEY not in str(settings) and KEY not in settings.model_dump_json()


def test_cors_is_off_by_default_and_follows_cors_origins(
    api: ApiView, tmp_path, encoder_file, mongo_uri, mongo_db_name
) -> None:
    preflight = {"Origin": "https://shop.example", "Access-Control-Request-Method": "POST"}
    off = api.client.options("/search", headers=preflight)
    assert "access-control-allow-origin" not in off.headers
    assert (
        "access-control-allow-origin"
        not in api.client.get("/version", headers={"Origin": "https://shop.example"}).headers
    )

    settings = service_settings(tmp_path, mongo_uri, mongo_db_name, CORS_ORIGINS=["https://shop.example"])
    with running_service(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        allowed = client.options("/search", headers=preflight)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://shop.example"
        assert "X-API-Key".lower() in allowed.headers["access-control-allow-headers"].lower()
        simple = client.get("/health/live", headers={"Origin": "https://shop.example"})
        assert simple.headers["access-control-allow-origin"] == "https://shop.example"
        other = client.options("/search", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        # No model in this data directory: readiness says why, in the documented body.
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["reasons"] and ready.headers["retry-after"]
        view = ApiView(client.get("/openapi.json").json(), client)
        view.check("GET", "/health/ready", ready)
        view.check("POST", "/search", client.post("/search", json={"id": 1}))


def test_error_messages_lose_python_reprs() -> None:
    from service.errors import one_line, validation_message

    assert one_line("cannot identify image file <_io.BytesIO object at 0x7f3a2c1b9e50>\nline two") == (
        "cannot identify image file line two"
    )
    errors = [
        {
            "type": "value_error",
            "loc": ("body", "file"),
            "msg": "Value error, Expected UploadFile, received: <class 'str'>",
        },
        {"type": "missing", "loc": ("body",), "msg": "Field required"},
        {"type": "extra_forbidden", "loc": ("query", "k"), "msg": "Extra inputs are not permitted"},
    ]
    assert one_line(validation_message(errors)) == (
        'file: Expected UploadFile, received: str; a request body is required; unknown query parameter "k"'
    )

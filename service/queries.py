"""Turning a search/classify request into a query vector: an uploaded image, a catalogue id, or a
raw vector. Shared by `POST /search` and `POST /classify`."""

from __future__ import annotations

import math
import time
from typing import Annotated, Any

import numpy as np
from fastapi import HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator
from starlette.datastructures import UploadFile

from service.catalogue import read_file
from service.db import Database
from service.engine import Engine, Loaded
from service.errors import BadRequest
from service.imaging import check_size, decode_image, model_input
from service.search import Timer
from service.validation import Label, Tag

JSON = "application/json"
MULTIPART = "multipart/form-data"


class SearchFilters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: int = Field(10, ge=1, le=1000, description="number of results (1..SEARCH_MAX_K)")
    label: Label | None = Field(None, description="only images with this label")
    tags: list[Tag] = Field(
        default_factory=list, max_length=32, description="only images with all these tags"
    )
    min_score: float | None = Field(None, ge=-1.0, le=1.0, description="only results at least this similar")


class SearchByJson(SearchFilters):
    """Exactly one of `id` (a catalogue image) or `vector` (D floats, re-normalised)."""

    id: Annotated[StrictInt, Field(ge=1)] | None = None
    vector: list[float] | None = Field(None, min_length=1, max_length=65536)

    @model_validator(mode="after")
    def _one_query(self) -> SearchByJson:
        if (self.id is None) == (self.vector is None):
            raise ValueError('give exactly one of "id" or "vector" (or upload an image as multipart)')
        return self


def validation_error(exc: ValidationError) -> BadRequest:
    parts = []
    for error in exc.errors():
        location = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{location}: {error['msg']}" if location else error["msg"])
    return BadRequest("; ".join(parts))


async def parse_search_request(request: Request, max_bytes: int) -> tuple[SearchFilters, Any]:
    """(filters, query) where query is bytes (uploaded image), an int (catalogue id) or a list (vector)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == JSON:
        try:
            body = await request.json()
        except ValueError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        try:
            parsed = SearchByJson.model_validate(body)
        except ValidationError as exc:
            raise validation_error(exc) from exc
        return parsed, parsed.id if parsed.id is not None else parsed.vector
    if content_type == MULTIPART:
        form = await request.form(max_files=1, max_fields=64)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise BadRequest('multipart search needs the image in a file field named "file"')
        fields: dict[str, Any] = {key: form.get(key) for key in ("k", "label", "min_score") if key in form}
        tags = form.getlist("tags")
        if tags:
            fields["tags"] = [
                t.strip() for value in tags if isinstance(value, str) for t in value.split(",") if t.strip()
            ]
        try:
            filters = SearchFilters.model_validate(fields)
        except ValidationError as exc:
            raise validation_error(exc) from exc
        data = await upload.read(max_bytes + 1)
        check_size(data, max_bytes, upload.filename or "upload")
        return filters, data
    raise BadRequest(
        f"unsupported content type {content_type or '(none)'!r}: send {JSON} or {MULTIPART}", 415
    )


def _decode_for_model(data: bytes, max_bytes: int, max_pixels: int, channels: int, size: int):
    decoded = decode_image(data, max_bytes, max_pixels, "query image")
    return model_input(decoded.image, channels, size)[None]  # 1xCxSxS


async def query_vector(engine: Engine, db: Database, loaded: Loaded, query: Any, timer: Timer) -> np.ndarray:
    """float32 1xD for an uploaded image (bytes), a catalogue id (int) or a raw vector (list)."""
    settings, encoder = engine.settings, loaded.encoder
    if isinstance(query, list):
        if len(query) != loaded.index.dim:
            raise BadRequest(f"vector has dimension {len(query)}, the index has dimension {loaded.index.dim}")
        if not all(math.isfinite(v) for v in query):
            raise BadRequest("vector contains NaN or infinity")
        vector = np.asarray(query, dtype=np.float32)[None]  # 1xD
        if not np.linalg.norm(vector) > 0:
            raise BadRequest("vector is all zeros")
        return vector
    if isinstance(query, int):
        started = time.perf_counter()
        stored = await read_file(db, query)
        if stored is None or await db.images.count_documents({"_id": query}, limit=1) == 0:
            raise HTTPException(404, f"no image with id {query}")
        data = stored[0]
        timer.add("metadata", started)
        max_bytes = max(settings.MAX_UPLOAD_BYTES, len(data))
    else:
        data, max_bytes = query, settings.MAX_UPLOAD_BYTES
    started = time.perf_counter()
    images = await engine.run_in_thread(
        _decode_for_model, data, max_bytes, settings.MAX_PIXELS, encoder.in_channels, encoder.input_size
    )
    timer.add("decode", started)
    started = time.perf_counter()
    vector = await engine.embed(loaded, images)  # 1xD
    timer.add("embed", started)
    return vector

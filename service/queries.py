"""Turning a search/classify request into a query vector: an uploaded image, a catalogue id (its
stored vector when the loaded model computed it, else its bytes embedded), or a raw vector.
Shared by `POST /search` and `POST /classify`."""

from __future__ import annotations

import io
import math
import time
from typing import Any

import numpy as np
from fastapi import HTTPException
from PIL import Image

from service.catalogue import VECTOR_FIELDS, read_file, usable_vector
from service.db import Database
from service.engine import Engine, Loaded
from service.errors import BadRequest
from service.imaging import decode_image, model_input
from service.search import Timer

# A query image this small decodes in 0.12-0.28 ms here (28-64 px, PNG or JPEG): less than its trip
# to the thread pool and back, so it is decoded on the event loop.
INLINE_DECODE_MAX_PIXELS = 64 * 64
INLINE_DECODE_MAX_BYTES = 64 * 1024


def decode_for_model(data: bytes, max_bytes: int, max_pixels: int, channels: int, size: int):
    decoded = decode_image(data, max_bytes, max_pixels, "query image")
    return model_input(decoded.image, channels, size)[None]  # 1xCxSxS


def small_enough_to_decode_inline(data: bytes) -> bool:
    """Whether the header declares at most INLINE_DECODE_MAX_PIXELS (no pixels decoded here)."""
    if len(data) > INLINE_DECODE_MAX_BYTES:
        return False
    try:
        with Image.open(io.BytesIO(data)) as header:
            return header.width * header.height <= INLINE_DECODE_MAX_PIXELS
    except Exception:  # not an image: the pool's decode reports it as the API does for any upload
        return False


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
        record = await db.images.find_one({"_id": query}, VECTOR_FIELDS)
        if record is None:
            raise HTTPException(404, f"no image with id {query}")
        vector = usable_vector(record, loaded.model_version, loaded.index.dim)
        if vector is not None:  # the vector the index holds for it: nothing to decode or embed
            timer.add("metadata", started)
            return vector[None]  # 1xD
        stored = await read_file(db, query)  # pending, or indexed by another model
        if stored is None:
            raise HTTPException(404, f"no image with id {query}")
        data = stored[0]
        timer.add("metadata", started)
        max_bytes = max(settings.MAX_UPLOAD_BYTES, len(data))
    else:
        data, max_bytes = query, settings.MAX_UPLOAD_BYTES
    started = time.perf_counter()
    decode_args = (data, max_bytes, settings.MAX_PIXELS, encoder.in_channels, encoder.input_size)
    if small_enough_to_decode_inline(data):
        images = decode_for_model(*decode_args)
    else:
        images = await engine.run_in_thread(decode_for_model, *decode_args)
    timer.add("decode", started)
    started = time.perf_counter()
    vector = await engine.embed(loaded, images)  # 1xD
    timer.add("embed", started)
    return vector

"""A synthetic catalogue of N images written straight into MongoDB (records, GridFS bytes and
thumbnails in the service's own layout) plus a published index holding their ids: how the
reconcile bench and the large-catalogue test get 10k-100k images in minutes instead of hours of
uploads. Optional damage for reconcile to repair: records missing from the index (pending, no
vector: a crash between the record and the index add), stale index ids, and old GridFS files
without a record (orphans).

What the service would have written: every image's bytes are a real, decodable PNG of its own
(a handful of base images, each copy made distinct by a tEXt chunk carrying its id, so the
record's sha256 is the hash of its bytes and no two are equal), its thumbnail is the base image's
thumbnail, and an indexed record carries its vector (the one in the index) tagged by the model
that computed it, as `mark_indexed` stores it.

Fast enough for 100k on a loaded 2-core machine: documents go in as large `insert_many` batches
into collections that have no secondary index yet, and the service's indexes are created once at
the end (`Database.prepare`, one pass per index). SecantusDB's per-document cost of an insert grows
with the number of indexes on the collection (each insert re-reads the index catalogue for its
unique, geo and entry checks), so this is several times faster than inserting under the indexes.
Start the server non-durable for the build (`EmbeddedDatabase(durable=False)`); the service
measured afterwards opens the same files durable, as `make run` does.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from PIL import Image
from pymongo import MongoClient

from index.encoder_file import encoder_version
from index.search_index import SearchIndex
from index.store import IndexStore
from service.catalogue import INDEXED, PENDING, VECTOR, _gridfs_documents, encode_vector
from service.db import CONTENT_BUCKET, IMAGE_ID_COUNTER, THUMBNAIL_BUCKET, Database
from service.imaging import make_thumbnail
from service.settings import Settings
from training.encoder import Encoder

BUCKETS = (CONTENT_BUCKET, THUMBNAIL_BUCKET)
BATCH = 5000  # records per round of inserts (5 collections, ~25k documents)
BASE_IMAGES = 16
SIDE = 28
PNG_SIGNATURE_AND_IHDR = 8 + 25  # signature, then the IHDR chunk (length, type, 13 bytes, CRC)


@dataclass
class BuiltCatalogue:
    ids: list[int]  # records
    missing: list[int]  # records not in the index (reconcile embeds them)
    stale: list[int]  # index ids without a record (reconcile removes them)
    orphans: list[int]  # GridFS ids without a record, older than any grace period
    version: str
    build_s: dict[str, float]  # seconds per phase: index, documents, indexes


def _png(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (SIDE, SIDE), dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def distinct_png(base: bytes, image_id: int) -> bytes:
    """`base` with a tEXt chunk naming `image_id` after its header: the same pixels, other bytes."""
    body = b"tEXt" + b"Comment\x00" + f"synthetic-{image_id}".encode()
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    return base[:PNG_SIGNATURE_AND_IHDR] + chunk + base[PNG_SIGNATURE_AND_IHDR:]


def _gridfs(image_id: int, name: str, data: bytes, media_type: str, uploaded: datetime) -> tuple[dict, list]:
    files, chunks = _gridfs_documents(image_id, name, data, media_type)
    files["uploadDate"] = uploaded  # older than any grace period: orphans among them are sweepable
    return files, chunks


def _record(image_id: int, data: bytes, created: datetime) -> dict:
    """The record `store_prepared_many` writes, still pending (no model, no vector)."""
    return {
        "_id": image_id, "filename": f"synthetic-{image_id}.png", "sha256": hashlib.sha256(data).hexdigest(),
        "media_type": "image/png", "width": SIDE, "height": SIDE, "size": len(data),
        "label": f"class-{image_id % 10}", "tags": ["synthetic"], "source": "bench",
        "created_at": created, "status": PENDING, "model_version": None, "index_version": None,
    }  # fmt: skip


async def _prepare(uri: str, db_name: str) -> None:
    db = Database.connect(uri, db_name, 10_000)
    try:
        await db.prepare()
    finally:
        await db.close()


def build_catalogue(
    uri: str,
    db_name: str,
    count: int,
    index_dir: Path,
    encoder_path: Path,
    missing: int = 0,
    stale: int = 0,
    orphans: int = 0,
    seed: int = 0,
    batch: int = BATCH,
    progress: Callable[[int, int], None] | None = None,
) -> BuiltCatalogue:
    """Write the catalogue into database `db_name` (expected empty) and publish its index under
    `index_dir`. `progress(done, total)` after each batch of documents."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    bases = [_png(rng) for _ in range(BASE_IMAGES)]  # real, decodable bytes (reconcile embeds the missing)
    with Image.open(io.BytesIO(bases[0])) as probe:
        assert probe.size == (SIDE, SIDE)
    thumb_side = Settings.model_fields["THUMBNAIL_SIZE"].default
    thumbnails = [make_thumbnail(Image.open(io.BytesIO(b)), thumb_side) for b in bases]
    old = datetime.now(timezone.utc) - timedelta(days=1)
    ids = list(range(1, count + 1))
    orphan_ids = list(range(count + 1, count + orphans + 1))
    missing_ids = ids[-missing:] if missing else []
    stale_ids = list(range(count + orphans + 1, count + orphans + stale + 1))

    # The index first: an indexed record stores the version of the index it went into.
    indexed = np.asarray(ids[: count - missing] + stale_ids, np.int64)
    dim = Encoder.load(encoder_path).embed_dim
    vectors = rng.standard_normal((len(indexed), dim)).astype(np.float32)  # NxD, unit rows
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = SearchIndex.empty_flat(dim)
    index.add(vectors, indexed)
    version = IndexStore(index_dir).publish(index, encoder_path=encoder_path)
    model_version = encoder_version(encoder_path)
    timings["index"] = time.perf_counter() - started

    started = time.perf_counter()
    indexed_count = count - missing  # ids 1..indexed_count are indexed, in the index's row order
    total = count + orphans
    with MongoClient(uri, tz_aware=True) as client:
        db = client[db_name]
        for start in range(1, total + 1, batch):
            documents: dict[str, list[dict]] = {
                f"{bucket}.{kind}": [] for bucket in BUCKETS for kind in ("files", "chunks")
            }  # fmt: skip
            records = []
            for image_id in range(start, min(start + batch, total + 1)):
                base = image_id % BASE_IMAGES
                data = distinct_png(bases[base], image_id)
                for bucket, name, payload in (
                    (CONTENT_BUCKET, f"synthetic-{image_id}.png", data),
                    (THUMBNAIL_BUCKET, f"{image_id}.png", thumbnails[base]),
                ):
                    files, chunks = _gridfs(image_id, name, payload, "image/png", old)
                    documents[f"{bucket}.files"].append(files)
                    documents[f"{bucket}.chunks"] += chunks
                if image_id > count:
                    continue  # an orphan: bytes without a record
                record = _record(image_id, data, old)
                if image_id <= indexed_count:
                    record |= {
                        "status": INDEXED, "model_version": model_version, "index_version": version,
                        VECTOR: encode_vector(vectors[image_id - 1]),
                    }  # fmt: skip
                records.append(record)
            # Files documents before chunks, as the service writes them.
            for name, docs in documents.items():
                db[name].insert_many(docs, ordered=False)
            if records:
                db.images.insert_many(records, ordered=False)
            if progress is not None:
                progress(min(start + batch - 1, total), total)
        timings["documents"] = time.perf_counter() - started

        started = time.perf_counter()
        asyncio.run(_prepare(uri, db_name))  # the service's indexes, one pass each over the data
        db.counters.update_one({"_id": IMAGE_ID_COUNTER}, {"$set": {"seq": total}}, upsert=True)
        timings["indexes"] = time.perf_counter() - started
    return BuiltCatalogue(ids, missing_ids, stale_ids, orphan_ids, version, timings)

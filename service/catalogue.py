"""The catalogue write and read paths: image bytes in GridFS, one record per image in `images`.

`store_image` is the one function that stores "an image + its record", shared by `POST /images`
and `python -m service.ingest`. Write order (a crash loses nothing and leaves no orphan that the
reconcile step cannot repair): GridFS bytes, then the record with status "pending"; the caller
then adds the vector to the index and only then marks the record "indexed".
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from bson import Binary
from gridfs.errors import CorruptGridFile, NoFile
from pymongo.errors import BulkWriteError

from service.db import CONTENT_BUCKET, THUMBNAIL_BUCKET, Database
from service.imaging import DecodedImage, decode_image, make_thumbnail

RunInThread = Callable[..., Awaitable[Any]]

GRIDFS_CHUNK_SIZE = 255 * 1024  # GridFS's default chunk size
DUPLICATE_KEY = 11000
PENDING = "pending"
INDEXED = "indexed"


@dataclass
class ImageMetadata:
    label: str | None = None
    tags: tuple[str, ...] = ()
    source: str | None = None


@dataclass
class Limits:
    max_bytes: int
    max_pixels: int
    thumbnail_size: int


@dataclass
class StoredImage:
    record: dict[str, Any]
    created: bool  # False: the same bytes were already stored, `record` is the existing one
    decoded: DecodedImage

    @property
    def id(self) -> int:
        return int(self.record["_id"])


@dataclass
class PreparedImage:
    """Validated upload, ready to store: nothing has been written yet."""

    data: bytes
    filename: str
    decoded: DecodedImage
    thumbnail: bytes  # PNG


def prepare_image(data: bytes, filename: str, limits: Limits) -> PreparedImage:
    """Validate and decode (CPU work: call from a thread). Raises ImageRejected."""
    decoded = decode_image(data, limits.max_bytes, limits.max_pixels, filename or "upload")
    return PreparedImage(data, filename, decoded, make_thumbnail(decoded.image, limits.thumbnail_size))


async def store_prepared(db: Database, prepared: PreparedImage, metadata: ImageMetadata) -> StoredImage:
    """Store bytes + thumbnail + a pending record; the same bytes again return the existing record."""
    return (await store_prepared_many(db, [prepared], [metadata]))[0]


def _gridfs_documents(image_id: int, filename: str, data: bytes, media_type: str) -> tuple[dict, list[dict]]:
    """The files document and chunk documents GridFS itself would write (same layout, same chunk
    size), so GridFSBucket reads them back; written in bulk instead of two round trips per file."""
    files = {
        "_id": image_id,
        "length": len(data),
        "chunkSize": GRIDFS_CHUNK_SIZE,
        "uploadDate": datetime.now(timezone.utc),
        "filename": filename,
        "metadata": {"contentType": media_type},
    }
    chunks = [
        {"files_id": image_id, "n": n, "data": Binary(data[start : start + GRIDFS_CHUNK_SIZE])}
        for n, start in enumerate(range(0, max(len(data), 1), GRIDFS_CHUNK_SIZE))
    ]
    return files, chunks


def _record(image_id: int, prepared: PreparedImage, metadata: ImageMetadata) -> dict[str, Any]:
    decoded = prepared.decoded
    return {
        "_id": image_id,
        "filename": prepared.filename,
        "sha256": decoded.sha256,
        "media_type": decoded.media_type,
        "width": decoded.width,
        "height": decoded.height,
        "size": len(prepared.data),
        "label": metadata.label,
        "tags": list(metadata.tags),
        "source": metadata.source,
        "created_at": datetime.now(timezone.utc),
        "status": PENDING,
        "model_version": None,
        "index_version": None,
    }


async def store_prepared_many(
    db: Database, prepared: list[PreparedImage], metadata: list[ImageMetadata]
) -> list[StoredImage]:
    """`store_prepared` for a batch, in a handful of round trips whatever its size: one query for
    the hashes already stored, one block of ids, then bulk inserts in the crash-safe order (bytes,
    thumbnails, then the pending records). Duplicates within the batch are stored once."""
    if not prepared:
        return []
    shas = [p.decoded.sha256 for p in prepared]
    existing = {d["sha256"]: d async for d in db.images.find({"sha256": {"$in": sorted(set(shas))}})}
    first_of: dict[str, int] = {}
    new = [i for i, sha in enumerate(shas) if sha not in existing and first_of.setdefault(sha, i) == i]
    records: dict[str, dict[str, Any]] = {}
    if new:
        ids = await db.allocate_ids(len(new))
        documents = {CONTENT_BUCKET: ([], []), THUMBNAIL_BUCKET: ([], [])}
        for image_id, i in zip(ids, new, strict=True):
            item = prepared[i]
            for bucket, name, data, media_type in (
                (CONTENT_BUCKET, item.filename, item.data, item.decoded.media_type),
                (THUMBNAIL_BUCKET, f"{image_id}.png", item.thumbnail, "image/png"),
            ):
                files, chunks = _gridfs_documents(image_id, name, data, media_type)
                documents[bucket][0].append(files)
                documents[bucket][1].extend(chunks)
            records[shas[i]] = _record(image_id, item, metadata[i])
        for bucket, (files, chunks) in documents.items():
            await db.db[f"{bucket}.chunks"].insert_many(chunks, ordered=False)
            await db.db[f"{bucket}.files"].insert_many(files, ordered=False)
        attempted = list(records.values())  # writeErrors index into this list, fixed before deletions
        try:
            await db.images.insert_many(attempted, ordered=False)
        except BulkWriteError as exc:  # concurrent uploads of the same bytes won some races
            for error in exc.details.get("writeErrors", []):
                lost = attempted[error["index"]]
                if error.get("code") != DUPLICATE_KEY:
                    raise
                await delete_files(db, lost["_id"])
                winner = await db.images.find_one({"sha256": lost["sha256"]})
                if winner is None:
                    raise
                existing[lost["sha256"]] = winner
                del records[lost["sha256"]]
    stored = []
    for i, sha in enumerate(shas):
        created = sha in records and first_of.get(sha) == i
        record = records[sha] if sha in records else existing[sha]
        stored.append(StoredImage(record, created, prepared[i].decoded))
    return stored


async def store_image(
    db: Database,
    data: bytes,
    filename: str,
    metadata: ImageMetadata,
    limits: Limits,
    run_in_thread: RunInThread,
) -> StoredImage:
    """Validate, then store (see `store_prepared`). Raises ImageRejected before anything is written."""
    prepared = await run_in_thread(prepare_image, data, filename, limits)
    return await store_prepared(db, prepared, metadata)


async def mark_indexed(db: Database, ids: list[int], model_version: str, index_version: str) -> int:
    """Returns how many of the records still exist (matched), so callers can skip a lookup."""
    if not ids:
        return 0
    result = await db.images.update_many(
        {"_id": {"$in": ids}},
        {"$set": {"status": INDEXED, "model_version": model_version, "index_version": index_version}},
    )
    return result.matched_count


async def delete_files(db: Database, image_id: int) -> None:
    for bucket in (db.content, db.thumbnails):
        with contextlib.suppress(NoFile):
            await bucket.delete(image_id)


async def delete_image(db: Database, image_id: int) -> dict[str, Any] | None:
    """Record first (it disappears from results at once), then the bytes. The caller then removes
    the index entry; a crash in between leaves an index id without a record, which reconcile removes."""
    record = await db.images.find_one_and_delete({"_id": image_id})
    if record is not None:
        await delete_files(db, image_id)
    return record


async def read_file(db: Database, image_id: int, thumbnail: bool = False) -> tuple[bytes, str] | None:
    """(bytes, media type) from GridFS, or None when there is no such file."""
    bucket = db.thumbnails if thumbnail else db.content
    try:
        stream = await bucket.open_download_stream(image_id)
        data = await stream.read()
    except (NoFile, CorruptGridFile):  # Corrupt: a delete removed the chunks while they were read
        return None
    media_type = (stream.metadata or {}).get("contentType", "application/octet-stream")
    return data, media_type


SEARCH_FIELDS = {"label": 1, "tags": 1}  # what a search result shows: less to send and decode


async def records_by_id(db: Database, ids: list[int], extra_filter: dict | None = None) -> dict[int, dict]:
    """{id: record (label and tags only)} for the ids that exist and pass `extra_filter`."""
    query: dict[str, Any] = {"_id": {"$in": ids}}
    if extra_filter:
        query.update(extra_filter)
    cursor = db.images.find(query, SEARCH_FIELDS, batch_size=max(len(ids), 1))
    return {int(doc["_id"]): doc async for doc in cursor}


def metadata_filter(label: str | None, tags: list[str] | tuple[str, ...] | None) -> dict[str, Any]:
    """A Mongo filter from already-validated plain strings (never user-supplied operators)."""
    query: dict[str, Any] = {}
    if label is not None:
        query["label"] = label
    if tags:
        query["tags"] = {"$all": list(tags)}
    return query


async def list_images(
    db: Database, label: str | None, tag: str | None, limit: int, cursor: int | None
) -> tuple[list[dict], int | None]:
    """A page in _id order after `cursor`; the next cursor is the last _id (None at the end)."""
    query = metadata_filter(label, [tag] if tag else None)
    if cursor is not None:
        query["_id"] = {"$gt": cursor}
    docs = await db.images.find(query).sort("_id", 1).limit(limit + 1).to_list()
    next_cursor = int(docs[limit - 1]["_id"]) if len(docs) > limit else None
    return docs[:limit], next_cursor


def public_record(doc: dict[str, Any]) -> dict[str, Any]:
    """The JSON form of a record."""
    image_id = int(doc["_id"])
    created = doc.get("created_at")
    return {
        "id": image_id,
        "filename": doc.get("filename"),
        "sha256": doc.get("sha256"),
        "media_type": doc.get("media_type"),
        "width": doc.get("width"),
        "height": doc.get("height"),
        "size": doc.get("size"),
        "label": doc.get("label"),
        "tags": doc.get("tags") or [],
        "source": doc.get("source"),
        "created_at": created.isoformat() if isinstance(created, datetime) else created,
        "status": doc.get("status"),
        "model_version": doc.get("model_version"),
        "index_version": doc.get("index_version"),
        "content_url": f"/images/{image_id}/content",
        "thumbnail_url": f"/images/{image_id}/thumbnail",
    }

"""A synthetic catalogue of N images written straight into MongoDB (records, GridFS bytes and
thumbnails in the service's own layout) plus a published index holding their ids: how the
reconcile bench and the large-catalogue test get 10k-100k images in seconds instead of an hour of
uploads. Optional damage for reconcile to repair: records missing from the index, stale index ids,
and old GridFS files without a record (orphans)."""

from __future__ import annotations

import asyncio
import hashlib
import io
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from bson import Binary
from PIL import Image
from pymongo import MongoClient

from index.search_index import SearchIndex
from index.store import IndexStore
from service.catalogue import GRIDFS_CHUNK_SIZE
from service.db import Database
from training.encoder import Encoder

BATCH = 1000


@dataclass
class BuiltCatalogue:
    ids: list[int]  # records
    missing: list[int]  # records not in the index (reconcile embeds them)
    stale: list[int]  # index ids without a record (reconcile removes them)
    orphans: list[int]  # GridFS ids without a record, older than any grace period
    version: str


def _png(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _gridfs(image_id: int, name: str, data: bytes, media_type: str, uploaded: datetime) -> tuple[dict, dict]:
    assert len(data) <= GRIDFS_CHUNK_SIZE
    files = {
        "_id": image_id,
        "length": len(data),
        "chunkSize": GRIDFS_CHUNK_SIZE,
        "uploadDate": uploaded,
        "filename": name,
        "metadata": {"contentType": media_type},
    }
    return files, {"files_id": image_id, "n": 0, "data": Binary(data)}


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
) -> BuiltCatalogue:
    rng = np.random.default_rng(seed)
    pngs = [_png(rng) for _ in range(16)]  # real, decodable bytes (reconcile embeds the missing ones)
    old = datetime.now(timezone.utc) - timedelta(days=1)
    ids = list(range(1, count + 1))
    orphan_ids = list(range(count + 1, count + orphans + 1))
    asyncio.run(_prepare(uri, db_name))  # the service's indexes exist before the first record, as in use
    with MongoClient(uri, tz_aware=True) as client:
        db = client[db_name]
        for start in range(0, count + orphans, BATCH):
            batch = range(start + 1, min(start + BATCH, count + orphans) + 1)
            documents: dict[str, list[dict]] = {
                "content.files": [], "content.chunks": [], "thumbnails.files": [], "thumbnails.chunks": []
            }  # fmt: skip
            records = []
            for image_id in batch:
                data = pngs[image_id % len(pngs)]
                for bucket, name in (
                    ("content", f"synthetic-{image_id}.png"),
                    ("thumbnails", f"{image_id}.png"),
                ):
                    files, chunk = _gridfs(image_id, name, data, "image/png", old)
                    documents[f"{bucket}.files"].append(files)
                    documents[f"{bucket}.chunks"].append(chunk)
                if image_id <= count:
                    records.append(
                        {
                            "_id": image_id, "filename": f"synthetic-{image_id}.png",
                            "sha256": hashlib.sha256(f"synthetic-{image_id}".encode()).hexdigest(),
                            "media_type": "image/png", "width": 28, "height": 28, "size": len(data),
                            "label": f"class-{image_id % 10}", "tags": ["synthetic"], "source": "bench",
                            "created_at": old, "status": "indexed", "model_version": None,
                            "index_version": None,
                        }
                    )  # fmt: skip
            for name, docs in documents.items():
                db[name].insert_many(docs, ordered=False)
            if records:
                db.images.insert_many(records, ordered=False)
        db.counters.update_one({"_id": "image_id"}, {"$set": {"seq": count + orphans}}, upsert=True)

    missing_ids = ids[-missing:] if missing else []
    stale_ids = list(range(count + orphans + 1, count + orphans + stale + 1))
    indexed = np.asarray(ids[: count - missing] + stale_ids, np.int64)
    dim = Encoder.load(encoder_path).embed_dim
    vectors = rng.standard_normal((len(indexed), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = SearchIndex.empty_flat(dim)
    index.add(vectors, indexed)
    version = IndexStore(index_dir).publish(index, encoder_path=encoder_path)
    return BuiltCatalogue(ids, missing_ids, stale_ids, orphan_ids, version)

"""How fast can the embedded database take an ingest's writes, with no other work beside them?

`python -m service.ingest` reads, decodes, thumbnails and embeds each batch in worker threads while
the previous batch is written; when the database server is the slower side, its write rate is the
ingest's ceiling whatever the client does. This bench measures that ceiling directly: the images are
read, decoded, thumbnailed and given (random) vectors *before* the clock starts, then written with
the service's own write path (`catalogue.store_prepared_many`: the sha256 lookup, the id block, the
GridFS files and chunks of the bytes and of the thumbnail, the records with their vectors), batch by
batch as ingest writes them, against a fresh embedded SecantusDB on disk started as the service
starts it (journaled writes). A second phase writes only the documents no catalogue can do without
(the record and the GridFS files + chunk of the bytes: no thumbnail, no lookup), as plain bulk
inserts: a floor under any write order that keeps the bytes in GridFS.

    python bench/ingest_ceiling.py                          # 10k Fashion-MNIST images
    python bench/ingest_ceiling.py --before 234             # also: the ceiling / that rate

Prints images/s, the database server's CPU per image and its share of one core.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.search_bench import machine  # noqa: E402
from bench.secantus_write_cost import cpu_seconds  # noqa: E402
from service.catalogue import (  # noqa: E402
    CONTENT_BUCKET,
    Embedded,
    ImageMetadata,
    Limits,
    PreparedImage,
    _gridfs_documents,
    _record,
    prepare_image,
    store_prepared_many,
)
from service.db import Database  # noqa: E402
from service.embedded_db import EmbeddedDatabase  # noqa: E402
from service.ingest import fashion_mnist_items  # noqa: E402
from service.settings import Settings  # noqa: E402


@dataclass
class Phase:
    name: str
    images: int
    wall_s: float
    server_cpu_s: float

    @property
    def rate(self) -> float:
        return self.images / self.wall_s

    def row(self, before: float | None) -> str:
        ratio = f" | {self.rate / before:.2f}x" if before else ""
        return (
            f"| {self.name} | {self.rate:.0f}{ratio} | {1000 * self.server_cpu_s / self.images:.2f} "
            f"| {100 * self.server_cpu_s / self.wall_s:.0f}% |"
        )


def prepared_images(count: int) -> tuple[list[PreparedImage], list[ImageMetadata]]:
    settings = Settings()
    limits = Limits(settings.MAX_UPLOAD_BYTES, settings.MAX_PIXELS, settings.THUMBNAIL_SIZE)
    prepared, metadata = [], []
    for item in fashion_mnist_items("train", count):
        prepared.append(prepare_image(item.data, item.name, limits))
        metadata.append(ImageMetadata(label=item.label, source="bench"))
    return prepared, metadata


async def service_write_path(
    db: Database, prepared: list[PreparedImage], metadata: list[ImageMetadata], batch: int, dim: int, pid: int
) -> Phase:
    vectors = np.random.default_rng(0).standard_normal((len(prepared), dim)).astype(np.float32)
    started, cpu = time.perf_counter(), cpu_seconds(pid)
    for start in range(0, len(prepared), batch):
        rows = slice(start, start + batch)
        embedded = Embedded(vectors[rows], "bench-model", "bench-index")
        stored = await store_prepared_many(db, prepared[rows], metadata[rows], embedded)
        if not all(s.created for s in stored):
            raise RuntimeError("the bench's catalogue was not empty")
    return Phase(
        "the service's write path (lookup, bytes + thumbnail in GridFS, records with vectors)",
        len(prepared), time.perf_counter() - started, cpu_seconds(pid) - cpu,
    )  # fmt: skip


async def documents_floor(
    db: Database, prepared: list[PreparedImage], metadata: list[ImageMetadata], batch: int, dim: int, pid: int
) -> Phase:
    """Record + the bytes' GridFS documents only, in a second database with the same indexes."""
    vectors = np.random.default_rng(1).standard_normal((len(prepared), dim)).astype(np.float32)
    first_id = 1
    started, cpu = time.perf_counter(), cpu_seconds(pid)
    for start in range(0, len(prepared), batch):
        rows = range(start, min(start + batch, len(prepared)))
        embedded = Embedded(vectors[start : rows.stop], "bench-model", "bench-index")
        files, chunks, records = [], [], []
        for row in rows:
            item, image_id = prepared[row], first_id + row
            file_document, chunk_documents = _gridfs_documents(
                image_id, item.filename, item.data, item.decoded.media_type
            )
            files.append(file_document)
            chunks.extend(chunk_documents)
            records.append(_record(image_id, item, metadata[row], embedded, row - start))
        await db.db[f"{CONTENT_BUCKET}.files"].insert_many(files, ordered=False)
        await db.db[f"{CONTENT_BUCKET}.chunks"].insert_many(chunks, ordered=False)
        await db.images.insert_many(records, ordered=False)
    return Phase(
        "floor: the record and the bytes' files + chunk only (no thumbnail, no lookup)",
        len(prepared), time.perf_counter() - started, cpu_seconds(pid) - cpu,
    )  # fmt: skip


async def measure(images: int, batch: int, dim: int, uri: str, pid: int) -> list[Phase]:
    prepared, metadata = prepared_images(images)
    phases = []
    for name, phase in (("ceiling", service_write_path), ("floor", documents_floor)):
        db = Database.connect(uri, f"bench_{name}", timeout_ms=10_000)
        try:
            await db.prepare()
            phases.append(await phase(db, prepared, metadata, batch, dim, pid))
        finally:
            await db.client.close()
    return phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000, help="Fashion-MNIST training images (10000)")
    parser.add_argument("--batch", type=int, default=256, help="images per write batch, as ingest (256)")
    parser.add_argument("--dim", type=int, default=512, help="stored vector length (512: the demo encoder)")
    parser.add_argument("--before", type=float, help="an ingest rate (images/s) to divide the ceilings by")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ingest-ceiling-") as tmp:
        database = EmbeddedDatabase(Path(tmp) / "db")
        uri = database.start()
        try:
            phases = asyncio.run(measure(args.images, args.batch, args.dim, uri, database.process.pid))
        finally:
            database.stop()
    print(f"machine: {machine()}")
    print(f"{args.images} Fashion-MNIST images in batches of {args.batch}, {args.dim}-d vectors, "
          "embedded SecantusDB on disk (journaled)\n")  # fmt: skip
    ratio_head = f" | / {args.before:g} images/s" if args.before else ""
    print(f"| writes | images/s{ratio_head} | server CPU ms / image | server busy (of one core) |")
    print("|---|---:|" + ("---:|" if args.before else "") + "---:|---:|")
    for phase in phases:
        print(phase.row(args.before))
    return 0


if __name__ == "__main__":
    sys.exit(main())

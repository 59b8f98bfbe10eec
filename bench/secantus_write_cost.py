"""What an insert and an update of a catalogue record cost the embedded database (SecantusDB), in
server CPU per record, with the catalogue's secondary indexes, fewer, or none.

The write order of ingest needs at least three inserts (the GridFS files document and chunk of the
bytes, the record) and one update (`indexed`, with the vector) per image; this says what each costs
the server, which runs them in Python on one core. Server CPU comes from /proc/<pid>/stat around
each phase; records are shaped like `service.catalogue`'s, written in batches as ingest does.

    python bench/secantus_write_cost.py                 # 3072 records, batches of 256
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from bson import Binary
from pymongo import ASCENDING, MongoClient, UpdateOne

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.embedded_db import EmbeddedDatabase  # noqa: E402

INDEXES = {
    "the catalogue's four (sha256 unique, label, tags, status)": ["sha256", "label", "tags", "status"],
    "three (no status)": ["sha256", "label", "tags"],
    "one: sha256 (unique)": ["sha256"],
    "one: label": ["label"],
    "one: tags (an array)": ["tags"],
    "none": [],
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def record(image_id: int) -> dict:
    return {
        "_id": image_id, "filename": f"{image_id}.png", "sha256": f"{image_id:064x}",
        "media_type": "image/png", "width": 28, "height": 28, "size": 500, "label": str(image_id % 10),
        "tags": ["a", "b"], "source": "bench", "created_at": datetime.now(timezone.utc), "status": "pending",
        "model_version": None, "index_version": None,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=3072)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512, help="vector length stored by the update (512)")
    args = parser.parse_args(argv)
    vector = Binary(np.random.default_rng(0).random(args.dim, dtype=np.float32).astype("<f4").tobytes())
    batches = [range(s, min(s + args.batch, args.records)) for s in range(0, args.records, args.batch)]
    status = {"status": "indexed", "model_version": "m", "index_version": "v"}
    print(f"{args.records} records in batches of {args.batch}; server CPU ms per record\n")
    print("| secondary indexes | insert | update (`UpdateOne` by `_id`: status + vector) "
          "| update (one `update_many` over an `_id` range: status) |")  # fmt: skip
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="secantus-cost-") as tmp:
        database = EmbeddedDatabase(Path(tmp) / "db")
        client = MongoClient(database.start())
        try:
            pid = database.process.pid
            for name, fields in INDEXES.items():
                costs = []
                for phase in ("insert", "update one", "update range"):
                    collection = client.bench[f"images_{len(fields)}_{phase.replace(' ', '_')}"]
                    for field in fields:
                        collection.create_index([(field, ASCENDING)], unique=field == "sha256")
                    if phase != "insert":
                        for ids in batches:
                            collection.insert_many([record(i) for i in ids], ordered=False)
                    started = cpu_seconds(pid)
                    for ids in batches:
                        if phase == "insert":
                            collection.insert_many([record(i) for i in ids], ordered=False)
                        elif phase == "update one":
                            updates = [
                                UpdateOne({"_id": i}, {"$set": {**status, "vector": vector}}) for i in ids
                            ]
                            collection.bulk_write(updates, ordered=False)
                        else:
                            collection.update_many(
                                {"_id": {"$gte": ids.start, "$lt": ids.stop}}, {"$set": status}
                            )
                    costs.append(1000 * (cpu_seconds(pid) - started) / args.records)
                    collection.drop()
                print(f"| {name} | " + " | ".join(f"{c:.2f}" for c in costs) + " |", flush=True)
        finally:
            client.close()
            database.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

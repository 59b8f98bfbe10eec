"""Cost of durable commits on raw writes: one small record per insert (as single-image uploads) and
64-document batches (as ingest), on the embedded server with --sync-on-commit + j:true and without.

    python bench/durable_writes.py
"""

import shutil
import sys
import time
from pathlib import Path

from pymongo import MongoClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.embedded_db import EmbeddedDatabase  # noqa: E402

for durable in (True, False):
    path = f"/tmp/durable-writes-{durable}"
    shutil.rmtree(path, ignore_errors=True)
    db = EmbeddedDatabase(path, durable=durable)
    uri = db.start(timeout_s=300)
    try:
        with MongoClient(uri, journal=durable) as c:
            coll = c.x.images
            coll.insert_one({"_id": 0})
            t = time.perf_counter()
            for i in range(1, 201):  # one small record per write, as uploads of one image each
                coll.insert_one({"_id": i, "sha256": f"{i:064d}", "status": "pending", "tags": ["a"]})
            one = time.perf_counter() - t
            t = time.perf_counter()
            for s in range(1000, 1000 + 64 * 10, 64):  # 64-document batches, as ingest writes them
                coll.insert_many([{"_id": i, "sha256": f"{i:064d}"} for i in range(s, s + 64)])
            batch = time.perf_counter() - t
        print(
            f"durable={durable}: 200 single inserts {one:.2f} s ({200 / one:.0f}/s); "
            f"10 x 64-doc insert_many {batch:.2f} s ({640 / batch:.0f} docs/s)",
            flush=True,
        )
    finally:
        db.stop()

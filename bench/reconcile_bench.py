"""Start-up reconcile and the orphan sweep on a large catalogue with the embedded server.

    python bench/reconcile_bench.py --images 10000 100000

For each size: a synthetic catalogue (records + small GridFS files + thumbnails, an index holding
the ids; some records missing from the index, some stale index ids, some orphan files) under a
fresh DATA_DIR, then `python -m service` as `make run` starts it (embedded, durable SecantusDB).
Measured: time to the first 200 from /health/ready, time until the start-up reconcile has
finished, POST /search latency (by vector and by id, one client in a loop) during the reconcile,
the database's CPU share once it is done, and one orphan sweep on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.catalogue_builder import build_catalogue  # noqa: E402
from service.db import Database  # noqa: E402
from service.embedded_db import EmbeddedDatabase, free_port  # noqa: E402
from service.random_model import write_random_encoder  # noqa: E402
from service.reconcile import sweep_orphans  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def search_loop(base: str, stop: threading.Event, dim: int, ids: list[int], out: dict) -> None:
    rng = np.random.default_rng(0)
    with httpx.Client(base_url=base, timeout=60) as client:
        n = 0
        while not stop.is_set():
            n += 1
            body = (
                {"vector": rng.standard_normal(dim).tolist(), "k": 10}
                if n % 2
                else {"id": int(ids[n % len(ids)]), "k": 10}
            )
            started = time.perf_counter()
            try:
                status = client.post("/search", json=body).status_code
            except httpx.HTTPError:
                status = 0
            out.setdefault(status, []).append(time.perf_counter() - started)


def bench(size: int, work: Path) -> dict:
    data_dir = work / f"data-{size}"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    encoder = write_random_encoder(data_dir / "model.pt", width=0.25)
    builder_db = EmbeddedDatabase(data_dir / "db", durable=False)
    uri = builder_db.start()
    started = time.perf_counter()
    built = build_catalogue(
        uri, "retrieval", size, data_dir / "index", encoder, missing=64, stale=50, orphans=100
    )
    build_s = time.perf_counter() - started
    builder_db.stop()

    port = free_port()
    env = {**os.environ, "DATA_DIR": str(data_dir), "ORPHAN_GRACE_SECONDS": "60", "PORT": str(port)}
    env.pop("MONGO_URI", None)
    base = f"http://127.0.0.1:{port}"
    launched = time.perf_counter()
    service = subprocess.Popen([sys.executable, "-m", "service", "--log-level", "warning"], env=env)
    latencies: dict[int, list[float]] = {}
    stop = threading.Event()
    result: dict = {"images": size, "build_s": round(build_s, 1)}
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            while True:
                try:
                    if client.get("/health/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if service.poll() is not None:
                    raise RuntimeError("the service exited")
                time.sleep(0.2)
            result["ready_s"] = round(time.perf_counter() - launched, 1)
            dim = client.get("/version").json()["embed_dim"]
            loop = threading.Thread(target=search_loop, args=(base, stop, dim, built.ids, latencies))
            loop.start()
            while not client.get("/health/ready").json().get("reconciled"):
                time.sleep(0.5)
            result["reconciled_s"] = round(time.perf_counter() - launched, 1)
            stop.set()
            loop.join()
            ready = client.get("/health/ready").json()
            result["index_size"] = ready["index_size"]
            result["reconcile_s"] = ready.get("reconcile_seconds")
            db_pid = json.loads((data_dir / "db.json").read_text())["pid"]
            before, t0 = cpu_seconds(db_pid), time.perf_counter()
            time.sleep(5)
            result["db_cpu_after"] = round((cpu_seconds(db_pid) - before) / (time.perf_counter() - t0), 3)
            ok = latencies.get(200, [])
            result["searches"] = sum(len(v) for v in latencies.values())
            result["search_errors"] = {k: len(v) for k, v in latencies.items() if k != 200}
            result["search_p50_ms"] = round(percentile(ok, 50) * 1000, 1)
            result["search_p99_ms"] = round(percentile(ok, 99) * 1000, 1)
            result["search_max_ms"] = round(max(ok, default=float("nan")) * 1000, 1)

            async def sweep() -> float:
                db = Database.connect(
                    json.loads((data_dir / "db.json").read_text())["uri"], "retrieval", 2000
                )
                try:
                    t = time.perf_counter()
                    await sweep_orphans(db, timedelta(seconds=60))
                    return time.perf_counter() - t
                finally:
                    await db.close()

            result["orphan_sweep_s"] = round(asyncio.run(sweep()), 1)
    finally:
        stop.set()
        service.send_signal(signal.SIGTERM)
        service.wait(120)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="reconcile-bench-"))
    for size in args.images:
        print(json.dumps(bench(size, work)), flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

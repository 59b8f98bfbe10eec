"""Start-up reconcile and the orphan sweep on a large catalogue with the embedded server.

    python bench/reconcile_bench.py --images 10000 100000

For each size: a synthetic catalogue (records + small GridFS files + thumbnails, an index holding
the ids; some records missing from the index, some stale index ids, some orphan files) under a
fresh DATA_DIR, then `python -m service` as `make run` starts it (embedded, durable SecantusDB).
Measured: the build (set-up, reported apart), time to the first 200 from /health/ready, the
start-up reconcile and the service's first orphan sweep after it (as /health/ready reports them),
POST /search latency during each (by vector and by id in turn, one client in a loop), the files
left after the sweep, and the database's CPU share once both are done.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from pymongo import MongoClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.catalogue_builder import build_catalogue  # noqa: E402
from service.embedded_db import EmbeddedDatabase, free_port  # noqa: E402
from service.random_model import write_random_encoder  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
MISSING, STALE, ORPHANS = 64, 50, 100  # damage for reconcile and the sweep to repair


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def search_loop(base: str, stop: threading.Event, dim: int, ids: list[int], out: list) -> None:
    """POST /search in a loop (by vector and by id in turn); appends (finished at, status, seconds)."""
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
            finished = time.perf_counter()
            out.append((finished, status, finished - started))


def latency_summary(samples: list[tuple[float, int, float]], since: float, until: float) -> dict:
    """Count, errors and p50/p99/max (ms) of the searches that finished in [since, until]."""
    window = [(status, seconds) for at, status, seconds in samples if since <= at <= until]
    ok = [seconds for status, seconds in window if status == 200]
    errors: dict[int, int] = {}
    for status, _ in window:
        if status != 200:
            errors[status] = errors.get(status, 0) + 1
    return {
        "searches": len(window),
        "errors": errors,
        "p50_ms": round(percentile(ok, 50) * 1000, 1),
        "p99_ms": round(percentile(ok, 99) * 1000, 1),
        "max_ms": round(max(ok, default=float("nan")) * 1000, 1),
    }


def wait_for(client: httpx.Client, field: str, service: subprocess.Popen) -> dict:
    """/health/ready once `field` is truthy (polled every 0.5 s)."""
    while True:
        if service.poll() is not None:
            raise RuntimeError("the service exited")
        ready = client.get("/health/ready").json()
        if ready.get(field):
            return ready
        time.sleep(0.5)


def build(size: int, data_dir: Path) -> tuple[list[int], dict[str, float]]:
    """The damaged catalogue under `data_dir`: its record ids and build time per phase."""
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    encoder = write_random_encoder(data_dir / "model.pt", width=0.25)
    # Set-up, not measured: the catalogue is written with the server non-durable (no fsync per
    # commit); the service below opens the same files durable, as `make run` does.
    builder_db = EmbeddedDatabase(data_dir / "db", durable=False)
    uri = builder_db.start()
    try:
        built = build_catalogue(
            uri, "retrieval", size, data_dir / "index", encoder,
            missing=MISSING, stale=STALE, orphans=ORPHANS,
            progress=lambda done, total: print(f"building: {done}/{total} images", end="\r", file=sys.stderr),
        )  # fmt: skip
    finally:
        builder_db.stop()
    return built.ids, built.build_s


def bench(size: int, work: Path, reuse: bool) -> dict:
    """`reuse`: build the damaged catalogue once into work/pristine-SIZE and run every later bench
    of that size on a fresh copy of it (the run repairs its copy)."""
    data_dir = work / f"data-{size}"
    pristine = work / f"pristine-{size}"
    started = time.perf_counter()
    if reuse and (pristine / "built.json").exists():
        built = json.loads((pristine / "built.json").read_text())
        record_ids, build_phases = built["ids"], built["build_s"]
    else:
        record_ids, build_phases = build(size, pristine if reuse else data_dir)
        if reuse:
            (pristine / "built.json").write_text(json.dumps({"ids": record_ids, "build_s": build_phases}))
    build_s = time.perf_counter() - started if not reuse else sum(build_phases.values())
    if reuse:
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.copytree(pristine, data_dir)

    port = free_port()
    env = {**os.environ, "DATA_DIR": str(data_dir), "ORPHAN_GRACE_SECONDS": "60", "PORT": str(port)}
    env.pop("MONGO_URI", None)
    base = f"http://127.0.0.1:{port}"
    result: dict = {
        "images": size,
        "build_s": round(build_s, 1),
        "build_phases_s": {phase: round(s, 1) for phase, s in build_phases.items()},
        "load_at_start": os.getloadavg()[0],
    }
    launched = time.perf_counter()
    service = subprocess.Popen([sys.executable, "-m", "service", "--log-level", "warning"], env=env)
    samples: list[tuple[float, int, float]] = []
    stop = threading.Event()
    loop: threading.Thread | None = None
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
            ready_at = time.perf_counter()
            result["ready_s"] = round(ready_at - launched, 1)
            dim = client.get("/version").json()["embed_dim"]
            loop = threading.Thread(target=search_loop, args=(base, stop, dim, record_ids, samples))
            loop.start()
            ready = wait_for(client, "reconciled", service)
            reconciled_at = time.perf_counter()
            result["reconciled_after_launch_s"] = round(reconciled_at - launched, 1)
            result["reconcile_s"] = ready.get("reconcile_seconds")
            result["index_size"] = ready["index_size"]  # size: MISSING added, STALE removed
            # The first orphan sweep follows the start-up reconcile; searches go on through it.
            ready = wait_for(client, "orphan_sweep_seconds", service)
            swept_at = time.perf_counter()
            result["orphan_sweep_s"] = ready["orphan_sweep_seconds"]
            stop.set()
            loop.join()
            result["search_during_reconcile"] = latency_summary(samples, ready_at, reconciled_at)
            result["search_during_sweep"] = latency_summary(samples, reconciled_at, swept_at)
            with MongoClient(json.loads((data_dir / "db.json").read_text())["uri"]) as mongo:
                db = mongo["retrieval"]
                buckets = ("content", "thumbnails")
                result["files_left"] = {b: db[f"{b}.files"].count_documents({}) for b in buckets}
            db_pid = json.loads((data_dir / "db.json").read_text())["pid"]
            before, t0 = cpu_seconds(db_pid), time.perf_counter()
            time.sleep(5)  # the measurement window
            result["db_cpu_after"] = round((cpu_seconds(db_pid) - before) / (time.perf_counter() - t0), 3)
            result["load_at_end"] = os.getloadavg()[0]
    finally:
        stop.set()
        if loop is not None:
            loop.join()
        service.send_signal(signal.SIGTERM)
        service.wait(120)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument(
        "--reuse", action="store_true",
        help="build each catalogue once into WORK/pristine-SIZE and bench a fresh copy of it (needs --work)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.reuse and args.work is None:
        parser.error("--reuse needs --work DIR")
    work = args.work or Path(tempfile.mkdtemp(prefix="reconcile-bench-"))
    for size in args.images:
        print(json.dumps(bench(size, work, args.reuse)), flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

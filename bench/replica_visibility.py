"""Cross-replica visibility: an image uploaded through replica A is searchable on replica B after
how long (and a delete through B is gone from A's results after how long), under a bounded mixed
load of searches on both replicas.

    python bench/replica_visibility.py [--catalogue 500] [--writes 60] [--searchers 2] [--write-rate 2]

Two `python -m service` processes on one database (embedded SecantusDB unless MONGO_URI is set)
and one index store, with the production defaults (10 s lease, 10 s publish debounce, 5 s poll):
what makes B see A's writes is the change stream, not a published version. Each write alternates
its origin; the latency runs from the origin's 201/200 reply to the first search on the other
replica that shows the change (search by catalogue id: the id is among the first 10 results; for
a delete, search by the image's bytes: it is not), polled every 20 ms. Results go to
bench/RESULTS.md between the replica-visibility markers.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from service.embedded_db import EmbeddedDatabase, free_port  # noqa: E402
from training.data.datasets import load_fashion_mnist  # noqa: E402

POLL_S = 0.02
K = 10
RESULTS = ROOT / "bench" / "RESULTS.md"
START, END = "<!-- replica-visibility:start -->", "<!-- replica-visibility:end -->"


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def start_replica(name: str, uri: str, data_dir: Path, db_name: str) -> tuple[subprocess.Popen, httpx.Client]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MONGO_URI": uri, "MONGO_DB": db_name,
           "DATA_DIR": str(data_dir), "REPLICA_ID": name, "INFERENCE_THREADS": "1"}  # fmt: skip
    log = open(data_dir / f"{name}.log", "wb")  # noqa: SIM115 - kept open for the process's life
    process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port)], env=env, cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    deadline = time.monotonic() + 180
    while True:
        try:
            if client.get("/health/ready").status_code == 200:
                return process, client
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"replica {name} did not start; see {data_dir / (name + '.log')}")
        time.sleep(0.2)


def upload(client: httpx.Client, images: list[bytes]) -> list[int]:
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    reply = client.post("/images", files=files)
    reply.raise_for_status()
    return reply.json()["ids"]


def top_ids(client: httpx.Client, **query) -> list[int]:
    """The ids of the first K results (near-duplicate images can outrank an image's own vector)."""
    if "png" in query:
        reply = client.post("/search", files={"file": ("q.png", query["png"], "image/png")}, data={"k": K})
    else:
        reply = client.post("/search", json={"id": query["id"], "k": K})
    return [r["id"] for r in reply.json()["results"]] if reply.status_code == 200 else []


def wait_visible(predicate, timeout_s: float = 60.0) -> float:
    started = time.perf_counter()
    while not predicate():
        if time.perf_counter() - started > timeout_s:
            return float("inf")
        time.sleep(POLL_S)
    return time.perf_counter() - started


def searcher(client: httpx.Client, queries: list[bytes], stop: threading.Event, counts: list[int]) -> None:
    rng = random.Random(len(counts))
    while not stop.is_set():
        top_ids(client, png=rng.choice(queries))
        counts.append(1)


def watcher_state(client: httpx.Client) -> dict:
    return client.get("/replication").json()["watcher"]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalogue", type=int, default=500, help="images loaded before measuring")
    parser.add_argument("--writes", type=int, default=60, help="measured uploads (every 4th also a delete)")
    parser.add_argument("--searchers", type=int, default=2, help="concurrent search loops per replica")
    parser.add_argument("--write-rate", type=float, default=2.0, help="at most this many writes per second")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()

    images = load_fashion_mnist("train", 28).images[:, 0].numpy()
    pngs = [png(images[i]) for i in range(args.catalogue + args.writes)]
    work = Path(tempfile.mkdtemp(prefix="replica-visibility-"))
    shutil.copyfile(ROOT / "service" / "assets" / "demo-encoder.pt", work / "model.pt")
    server = None
    uri = os.environ.get("MONGO_URI")
    if not uri:
        server = EmbeddedDatabase(work / "db")
        uri = server.start()
    processes = []
    try:
        a_process, a = start_replica("a", uri, work, "visibility")
        processes.append(a_process)
        b_process, b = start_replica("b", uri, work, "visibility")
        processes.append(b_process)
        for start in range(0, args.catalogue, 32):
            upload(a, pngs[start : min(start + 32, args.catalogue)])

        stop, counts = threading.Event(), []
        threads = [threading.Thread(target=searcher, args=(c, pngs[: args.catalogue], stop, counts))
                   for c in (a, b) for _ in range(args.searchers)]  # fmt: skip
        for thread in threads:
            thread.start()
        load_started = time.perf_counter()
        adds, deletes = [], []
        for i in range(args.writes):
            began = time.perf_counter()
            origin, other = (a, b) if i % 2 == 0 else (b, a)
            data = pngs[args.catalogue + i]
            (new_id,) = upload(origin, [data])
            adds.append(wait_visible(lambda c=other, n=new_id: n in top_ids(c, id=n)))
            if i % 4 == 3:  # delete it through the replica that did not upload it; gone from the origin
                assert other.delete(f"/images/{new_id}").status_code == 200
                deletes.append(wait_visible(lambda c=origin, d=data, n=new_id: n not in top_ids(c, png=d)))
            deleted = f", delete in {deletes[-1] * 1000:.0f} ms" if i % 4 == 3 else ""
            print(
                f"write {i + 1}/{args.writes}: upload visible in {adds[-1] * 1000:.0f} ms{deleted}",
                flush=True,
            )
            time.sleep(max(0.0, 1 / args.write_rate - (time.perf_counter() - began)))
        elapsed = time.perf_counter() - load_started
        stop.set()
        for thread in threads:
            thread.join()
        watchers = {name: watcher_state(c) for name, c in {"A": a, "B": b}.items()}
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=60)
        if server is not None:
            server.stop()

    searches_per_s = len(counts) / elapsed
    rows = [("upload on one, searchable on the other", adds), ("delete on one, gone from the other", deletes)]
    table = ["| change | n | p50 ms | p95 ms | max ms |", "|---|---:|---:|---:|---:|"]
    for name, values in rows:
        table.append(f"| {name} | {len(values)} | {percentile(values, 50) * 1000:.0f} | "
                     f"{percentile(values, 95) * 1000:.0f} | {max(values) * 1000:.0f} |")  # fmt: skip
    load = os.getloadavg()
    report = "\n".join([
        START,
        "## Cross-replica visibility (bench/replica_visibility.py)",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPU cores (load average "
        f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end: other jobs share them), no GPU; "
        f"{'MONGO_URI' if os.environ.get('MONGO_URI') else 'embedded SecantusDB'}.",
        "",
        f"Command: `python bench/replica_visibility.py --catalogue {args.catalogue} --writes {args.writes} "
        f"--searchers {args.searchers} --write-rate {args.write_rate}`",
        "",
        f"Two replicas (production defaults: 10 s lease, 10 s publish debounce, 5 s poll), a "
        f"{args.catalogue}-image catalogue, {2 * args.searchers} search loops ({searches_per_s:.1f} "
        f"searches/s served) plus writes alternating between the replicas for {elapsed:.0f} s.",
        "",
        *table,
        "",
        f"p95 upload visibility: **{percentile(adds, 95) * 1000:.0f} ms** (goal <= 1000 ms). It includes "
        f"the polling search itself (by id: the record's stored vector once it is indexed, its bytes "
        f"decoded and embedded before; then the search on the other replica). The watchers' own "
        f"lag, write committed -> applied to the other index (`GET /replication`, apply_lag, seed load "
        f"included): "
        + "; ".join(f"{name} p50 {w['apply_lag']['p50_ms']} ms, p95 {w['apply_lag']['p95_ms']} ms over "
                    f"{w['apply_lag']['events']} events" for name, w in watchers.items()) + ". "
        "Added from the writer's stored vector / embedded from the bytes / inserts whose vector "
        "missed the grace: "
        + "; ".join(f"{name} {w['added_from_vector']} / {w['embedded']} / {w['grace_expired']}"
                    for name, w in watchers.items()) + ".",
        END,
    ])  # fmt: skip
    print(report)
    if not args.no_write:
        text = RESULTS.read_text()
        if START in text:
            text = text[: text.index(START)] + report + text[text.index(END) + len(END) :]
        else:
            text = text.rstrip("\n") + "\n\n" + report + "\n"
        RESULTS.write_text(text)
    if all(np.isfinite(adds + deletes)):
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"some changes never became visible within 60 s: replica logs kept in {work}")


if __name__ == "__main__":
    main()

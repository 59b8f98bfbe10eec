"""Latency and throughput of `POST /search` (image upload) over loopback, against the in-process floor.

The service runs as its own process (uvicorn, `python -m service`) on a catalogue of Fashion-MNIST
images ingested through the API; a load generator sends image-upload searches at concurrency 1, 4
and 16 (bounded in count and time). The floor is what one search costs without HTTP or the
database, measured in the same run: decode + embed + FAISS search for one image in this process.
Goal: p50 / floor <= 1.5x at concurrency 1.

The load generator is lean by default (`--client raw`, as wrk or hey would be): each worker keeps
one HTTP/1.1 connection and sends request bytes encoded once per query image, so the figures are
the service's, not the client's; `--client httpx` measures through httpx's AsyncClient instead,
which adds 2-5 ms of Python per request at concurrency 1 and competes with the service for the
cores at 16.

    python bench/search_bench.py                     # defaults below; appends to bench/RESULTS.md
    python bench/search_bench.py --catalogue 5000 --requests 500 --no-append
    python bench/search_bench.py --concurrency 1 16 --rounds 5   # the 16/1 ratio, round by round
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import faiss
import httpx
import numpy as np
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from index.search_index import SearchIndex  # noqa: E402
from service.embedded_db import EmbeddedDatabase, free_port  # noqa: E402
from service.engine import intra_op_threads  # noqa: E402
from service.random_model import write_random_encoder  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.service.service_helpers import fashion_mnist, png_bytes  # noqa: E402
from training.encoder import Encoder  # noqa: E402
from training.inference import calibration_images, load_deploy_encoder, write_inference_encoder  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"
SECTION = "## Service: POST /search (bench/search_bench.py)"
DATA = "fashion-mnist:test"  # the catalogue's images, and the deploy form's calibration set


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalogue", type=int, default=2000, help="images ingested (default 2000)")
    parser.add_argument(
        "--requests", type=int, default=300, help="searches per concurrency level (default 300)"
    )
    parser.add_argument("--max-seconds", type=float, default=30.0, help="time cap per level (default 30)")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 4, 16], help="levels (default 1 4 16)"
    )
    parser.add_argument("--k", type=int, default=10, help="results per search (default 10)")
    parser.add_argument(
        "--model", type=Path, help="encoder file (default: an untrained ResNet-18 width 0.25)"
    )
    parser.add_argument(
        "--floor-repeats", type=int, default=200, help="repetitions of the floor (default 200)"
    )
    parser.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="load generator: pre-encoded requests on keep-alive sockets (raw, default) or httpx",
    )
    parser.add_argument(
        "--body",
        choices=("image", "multipart"),
        default="image",
        help="the query as the request body (Content-Type: image/png, k in the query string; default) "
        "or as a multipart form",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the levels this many times against the same service, one after the other, so a "
        "busy machine's slow phases fall on every level alike; the ratio of the highest level's "
        "requests/s to concurrency 1's is then given per round and as the median (default 1)",
    )
    parser.add_argument("--no-append", action="store_true", help=f"do not append to {RESULTS}")
    return parser.parse_args(argv)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


class Floor:
    """decode + embed + FAISS search of one image in this process (no HTTP, no database)."""

    def __init__(self, model: Path, catalogue_size: int, k: int) -> None:
        faiss.omp_set_num_threads(Settings().FAISS_THREADS)  # as the service runs it
        self.encoder = Encoder.load(model)
        self.index = SearchIndex.empty_flat(self.encoder.embed_dim)
        vectors = np.random.default_rng(0).normal(size=(catalogue_size, self.encoder.embed_dim))
        self.index.add(vectors.astype(np.float32), np.arange(1, catalogue_size + 1))
        self.k = k

    def sample(self, query: bytes) -> float:
        """Milliseconds for one image."""
        started = time.perf_counter()
        image = self.encoder.prepare(query)  # CxSxS uint8
        vector = self.encoder.embed(image[None])  # 1xD
        self.index.search(vector, self.k)
        return (time.perf_counter() - started) * 1000

    def median(self, queries: list[bytes], repeats: int) -> float:
        for query in queries[:10]:  # warm-up
            self.sample(query)
        return statistics.median(self.sample(queries[i % len(queries)]) for i in range(repeats))


def start_service(data_dir: Path, mongo_uri: str, port: int) -> subprocess.Popen:
    env = dict(
        os.environ, MONGO_URI=mongo_uri, MONGO_DB="bench", DATA_DIR=str(data_dir), PYTHONPATH=str(REPO)
    )
    command = [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"]
    return subprocess.Popen(command, env=env, cwd=REPO)


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the service exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the service was not ready after {timeout_s:.0f} s")


def ingest(url: str, images: list[bytes], labels: list[str]) -> None:
    with (
        httpx.Client(base_url=url, timeout=120) as client,
        tqdm(total=len(images), desc="ingest", unit="img") as bar,
    ):
        for start in range(0, len(images), 64):
            chunk = range(start, min(start + 64, len(images)))
            for label in sorted({labels[i] for i in chunk}):
                files = [("files", (f"{i}.png", images[i], "image/png")) for i in chunk if labels[i] == label]
                reply = client.post("/images", files=files, data={"label": label})
                reply.raise_for_status()
                bar.update(len(files))


def level_summary(
    concurrency: int, latencies: list[float], errors: int, wall: float, stages: dict[str, list[float]]
) -> dict:
    """One concurrency level's row: latency percentiles, requests/s and the median of each stage."""
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "p99": percentile(latencies, 99),
        "rps": len(latencies) / wall,
        "stages": {stage: statistics.median(values) for stage, values in stages.items()},
    }


async def load(
    url: str,
    queries: list[bytes],
    concurrency: int,
    count: int,
    max_s: float,
    k: int,
    body: str,
) -> dict:
    """Latencies of up to `count` searches by `concurrency` workers, and the service's own stage timings."""
    latencies: list[float] = []
    stages: dict[str, list[float]] = {}
    errors = 0
    issued = 0
    deadline = time.monotonic() + max_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal issued, errors
            while issued < count and time.monotonic() < deadline:
                data = queries[issued % len(queries)]
                issued += 1
                started = time.perf_counter()
                reply = await client.post("/search", **search_arguments(data, k, body))
                elapsed = (time.perf_counter() - started) * 1000
                if reply.status_code == 200:
                    latencies.append(elapsed)
                    for stage, ms in reply.json()["timing_ms"].items():
                        stages.setdefault(stage, []).append(ms)
                else:
                    errors += 1

        for _ in range(min(20, count)):  # warm-up (connections, caches), not measured
            await client.post("/search", **search_arguments(queries[0], k, body))
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return level_summary(concurrency, latencies, errors, wall, stages)


BOUNDARY = "search-bench-7d1f0c"


def search_arguments(image: bytes, k: int, body: str) -> dict:
    """httpx arguments of an image search: the image as the body, or a multipart form."""
    if body == "image":
        return {"content": image, "headers": {"Content-Type": "image/png"}, "params": {"k": str(k)}}
    return {"files": {"file": ("q.png", image, "image/png")}, "data": {"k": str(k)}}


def image_search(host: str, image: bytes, k: int) -> bytes:
    """The whole HTTP/1.1 request of an image search with the image as the body, encoded once."""
    head = (
        f"POST /search?k={k} HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: image/png\r\nContent-Length: {len(image)}\r\n\r\n"
    )
    return head.encode() + image


def multipart_search(host: str, image: bytes, k: int) -> bytes:
    """The whole HTTP/1.1 request of an image search, encoded once."""
    body = b"".join(
        [
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'.encode(),
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'.encode(),
            b"Content-Type: image/png\r\n\r\n",
            image,
            f"\r\n--{BOUNDARY}--\r\n".encode(),
        ]
    )
    head = (
        f"POST /search HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response with a Content-Length (what uvicorn sends for JSON)."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("the service closed the connection")
    length = None
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        raise ConnectionError("a response without Content-Length")
    return int(status_line.split()[1]), await reader.readexactly(length)


async def load_raw(
    url: str, queries: list[bytes], concurrency: int, count: int, max_s: float, k: int, body: str
) -> dict:
    """As `load`, with pre-encoded requests on one keep-alive socket per worker."""
    host_port = url.removeprefix("http://")
    host, port = host_port.rsplit(":", 1)
    encode = image_search if body == "image" else multipart_search
    requests = [encode(host_port, query, k) for query in queries]
    latencies: list[float] = []
    stages: dict[str, list[float]] = {}
    errors = issued = 0
    connections = [await asyncio.open_connection(host, int(port)) for _ in range(concurrency)]
    for reader, writer in connections:  # warm-up (connections, caches), not measured
        writer.write(requests[0])
        await read_response(reader)
    deadline = time.monotonic() + max_s

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal issued, errors
        while issued < count and time.monotonic() < deadline:
            request = requests[issued % len(requests)]
            issued += 1
            started = time.perf_counter()
            writer.write(request)
            status, body = await read_response(reader)
            elapsed = (time.perf_counter() - started) * 1000
            if status == 200:
                latencies.append(elapsed)
                for stage, ms in json.loads(body)["timing_ms"].items():
                    stages.setdefault(stage, []).append(ms)
            else:
                errors += 1

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker(reader, writer) for reader, writer in connections))
    finally:
        for _, writer in connections:
            writer.close()
    wall = time.perf_counter() - started
    return level_summary(concurrency, latencies, errors, wall, stages)


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{model}, {os.cpu_count()} cores (load average {load} at the end: other jobs share them), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (0 for none, or off Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def forward_passes(url: str) -> float:
    """The service's count of micro-batched forward passes so far (`embed_batches` in /metrics)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("embed_batches "))


def report(args: argparse.Namespace, floors_ms: list[float], rows: list[dict], deploy: str) -> str:
    floor_ms = min(floors_ms)  # the less disturbed of the two: the conservative ratio
    first = rows[0] if rows and rows[0]["concurrency"] == 1 else None
    ratio = first["p50"] / floor_ms if first else float("nan")
    stages = ", ".join(f"{k} {v:.2f}" for k, v in first["stages"].items()) if first else "n/a"
    lines = [
        f"### {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {machine()}",
        f"- command: `python bench/search_bench.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        f"- catalogue: {args.catalogue} Fashion-MNIST PNGs, flat index, k={args.k}, "
        f"{'MONGO_URI' if os.environ.get('MONGO_URI') else 'embedded SecantusDB'}, loopback HTTP, "
        f"load generator: {args.client}, the query "
        + ("as the body" if args.body == "image" else "in a multipart form"),
        f"- encoder: {args.model or 'untrained ResNet-18 x0.25'}, served in its deploy form: {deploy}",
        "- floor: in-process decode + embed + FAISS search of one image, median of "
        f"{args.floor_repeats}, measured just before / just after each concurrency-1 level: "
        f"{' / '.join(f'{f:.2f}' for f in floors_ms)} ms, using **{floor_ms:.2f} ms**",
        f"- the service's own stage medians at concurrency 1 (timing_ms): {stages} ms",
        "",
        f"| {'round | ' if args.rounds > 1 else ''}concurrency | requests | errors | p50 ms | p95 ms "
        "| p99 ms | requests/s | images per forward pass "
        "| CPU ms per request: service / database / load generator |",
        "|---:" * (9 + (args.rounds > 1)) + "|",
    ]
    for row in rows:
        cpu = " / ".join(f"{row['cpu_ms'][name]:.1f}" for name in ("service", "database", "client"))
        lines.append(
            f"| {str(row['round']) + ' | ' if args.rounds > 1 else ''}"
            f"{row['concurrency']} | {row['requests']} | {row['errors']} | {row['p50']:.2f} "
            f"| {row['p95']:.2f} | {row['p99']:.2f} | {row['rps']:.1f} | {row['batch']:.2f} | {cpu} |"
        )
    compute = (
        sum(first["stages"].get(k, 0.0) for k in ("decode", "embed", "search")) if first else float("nan")
    )
    lines += [
        "",
        f"p50 / floor at concurrency 1: **{ratio:.2f}x** (goal <= 1.5x)",
        f"p50 / the service's own decode + embed + search ({compute:.2f} ms) at concurrency 1: "
        f"**{first['p50'] / compute if first and compute else float('nan'):.2f}x** "
        "(the same ratio with the floor measured inside the server, robust to a busy machine)",
    ]
    if args.rounds > 1:
        own = [
            row["p50"] / sum(row["stages"].get(k, 0.0) for k in ("decode", "embed", "search"))
            for row in rows
            if row["concurrency"] == 1
        ]
        lines.append(
            f"the same ratio in each round: {', '.join(f'{r:.2f}' for r in own)}x; "
            f"median **{statistics.median(own):.2f}x**"
        )
    busiest = max(rows, key=lambda row: row["concurrency"]) if rows else None  # the first round's
    if first and busiest is not first:
        busy_stages = ", ".join(f"{k} {v:.2f}" for k, v in busiest["stages"].items())
        lines.append(f"stage medians at concurrency {busiest['concurrency']} (timing_ms): {busy_stages} ms")
        lines.append(
            f"requests/s at concurrency {busiest['concurrency']} / at 1: "
            f"**{busiest['rps'] / first['rps']:.2f}x** (goal >= 3x at 16)"
        )
        if args.rounds > 1:
            ratios = round_ratios(rows, busiest["concurrency"])
            lines.append(
                f"the same ratio in each round: {', '.join(f'{r:.2f}' for r in ratios)}x; "
                f"median **{statistics.median(ratios):.2f}x**"
            )
        cores = len(os.sched_getaffinity(0))
        pairs = round_pairs(rows, busiest["concurrency"])
        ceilings = [ratio_ceiling(low, high, cores) for low, high in pairs]
        used = [high["rps"] * sum(high["cpu_ms"].values()) / 1000 / cores for _, high in pairs]
        lines.append(
            f"ceiling of that ratio on {cores} cores (cores x mean latency at 1 / CPU ms per request at "
            f"{busiest['concurrency']}, all three processes), per round: "
            f"{', '.join(f'{c:.2f}' for c in ceilings)}x; the cores busy at {busiest['concurrency']}: "
            f"{', '.join(f'{u:.0%}' for u in used)}"
        )
    lines.append("")
    return "\n".join(lines)


def round_pairs(rows: list[dict], concurrency: int) -> list[tuple[dict, dict]]:
    """(the row at concurrency 1, the row at `concurrency`) of each round that has both levels."""
    by_round: dict[int, dict[int, dict]] = {}
    for row in rows:
        by_round.setdefault(row["round"], {})[row["concurrency"]] = row
    return [
        (levels[1], levels[concurrency])
        for levels in by_round.values()
        if 1 in levels and concurrency in levels
    ]


def round_ratios(rows: list[dict], concurrency: int) -> list[float]:
    """requests/s at `concurrency` / at 1, within each round that has both levels."""
    return [high["rps"] / low["rps"] for low, high in round_pairs(rows, concurrency)]


def ratio_ceiling(low: dict, high: dict, cores: int) -> float:
    """The most that requests/s at high concurrency / at 1 can be here: one request at a time
    takes the mean latency 1/rps; with every core busy, requests/s is at most cores / (the CPU
    each request costs the service, the database and the load generator together)."""
    return cores * (1000 / low["rps"]) / sum(high["cpu_ms"].values())


def append_results(block: str, section: str = SECTION) -> None:
    """Insert the block at the end of the service section (created at the end of the file if missing)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if section not in text:
        text = text.rstrip("\n") + f"\n\n{section}\n\n{block}"
    else:
        start = text.index(section) + len(section)
        next_section = text.find("\n## ", start)
        end = len(text) if next_section < 0 else next_section + 1
        text = text[:end].rstrip("\n") + f"\n\n{block}\n" + ("\n" if text[end:] else "") + text[end:]
    RESULTS.write_text(text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    images, labels, names = fashion_mnist("test")
    count = min(args.catalogue, len(images))
    pngs = [png_bytes(images[i]) for i in range(count)]
    label_names = [names[int(labels[i])] for i in range(count)]
    queries = [png_bytes(images[-1 - i]) for i in range(100)]  # not in the catalogue

    with tempfile.TemporaryDirectory(prefix="search-bench-") as tmp:
        data_dir = Path(tmp)
        model = args.model or write_random_encoder(data_dir / "model.pt")
        if args.model:
            (data_dir / "model.pt").write_bytes(args.model.read_bytes())
        # Its deploy form next to it, as a refresh or the demo writes it: what the service runs.
        served = data_dir / "model.pt"
        deploy = write_inference_encoder(served, calibration_images(DATA, served))
        settings = Settings()  # the service's, environment included
        threads = intra_op_threads(
            load_deploy_encoder(served), settings.INTRA_OP_THREADS, torch.get_num_threads()
        )
        deploy_form = (
            f"{deploy['dtype']}, {deploy['runtime']}; {threads} intra-op "
            f"thread(s) per pass, up to {max(1, settings.INFERENCE_THREADS // threads)} batch(es) at once"
        )
        print(f"deploy form: {deploy_form}")
        floor = Floor(model, count, args.k)
        floors: list[float] = []

        database = None
        mongo_uri = os.environ.get("MONGO_URI")
        if not mongo_uri:
            database = EmbeddedDatabase(data_dir / "db")
            mongo_uri = database.start()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        process = start_service(data_dir, mongo_uri, port)
        rows = []
        try:
            wait_ready(url, process)
            ingest(url, pngs, label_names)
            levels = [(r + 1, c) for r in range(args.rounds) for c in args.concurrency]
            for round_number, concurrency in levels:
                if concurrency == 1:
                    floors.append(floor.median(queries, args.floor_repeats))
                generator = load_raw if args.client == "raw" else load
                level = generator(
                    url, queries, concurrency, args.requests, args.max_seconds, args.k, args.body
                )
                passes_before = forward_passes(url)
                database_pid = database.process.pid if database is not None and database.process else None
                pids = {"service": process.pid, "database": database_pid}
                cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                cpu_before["client"] = time.process_time()
                row = asyncio.run(level)
                cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
                cpu["client"] = time.process_time() - cpu_before["client"]
                passes = forward_passes(url) - passes_before
                row["batch"] = row["requests"] / passes if passes else float("nan")
                per_request = 1000 / max(row["requests"], 1)
                row["cpu_ms"] = {name: seconds * per_request for name, seconds in cpu.items()}
                if concurrency == 1:
                    floors.append(floor.median(queries, args.floor_repeats))
                    print(f"floor (in-process decode + embed + search) before / after: {floors} ms")
                row["round"] = round_number
                rows.append(row)
                print(
                    f"{f'round {round_number}, ' if args.rounds > 1 else ''}"
                    f"concurrency {concurrency:>2}: p50 {row['p50']:.2f} ms, p95 {row['p95']:.2f} ms, "
                    f"p99 {row['p99']:.2f} ms, {row['rps']:.1f} req/s, {row['errors']} errors"
                )
        finally:
            process.terminate()
            process.wait(60)
            if database is not None:
                database.stop()

    block = report(args, floors or [float("nan")], rows, deploy_form)
    print("\n" + block)
    if not args.no_append:
        append_results(block)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()

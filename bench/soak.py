"""A bounded soak: mixed traffic against a running service (`make run`), then a check that nothing
acknowledged was lost.

    python bench/soak.py --minutes 10 --concurrency 16 --seed 0 [--url http://127.0.0.1:8000]

16 clients (threads, one HTTP connection each) draw from a fixed mix with a fixed seed: search by
image, by catalogue id and by vector, classify, uploads (fresh PNGs, 1-4 per request), deletes (of
the soak's own uploads only), listing, and record/content reads. Reports requests, errors by
status, p50/p95/p99 latency per route, the service's resident memory at the start, after the first
minute and at the end; then checks that every acknowledged upload is present with its bytes and
every acknowledged delete is gone, and deletes what the soak uploaded (`--keep` to leave it).
Exit code 1 when a 5xx was seen or an acknowledged write was lost.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
from PIL import Image

MIX = {  # route: weight
    "search_image": 22,
    "search_id": 14,
    "search_vector": 10,
    "classify": 10,
    "upload": 14,
    "delete": 6,
    "list": 10,
    "get_record": 7,
    "get_content": 7,
}


def png(rng: np.random.Generator) -> bytes:
    """A fresh 28x28 grey image: a random blob on noise (unique bytes, so uploads are created)."""
    canvas = rng.integers(0, 60, (28, 28), dtype=np.uint8)
    y, x = rng.integers(4, 20, 2)
    canvas[y : y + rng.integers(4, 9), x : x + rng.integers(4, 9)] = rng.integers(120, 256)
    buffer = io.BytesIO()
    Image.fromarray(canvas, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def listening_pid(port: int) -> int | None:
    """The pid of the process listening on TCP `port` (from /proc), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid)
        except OSError:
            continue
    return None


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


@dataclass
class Shared:
    ids: list[int]  # catalogue ids known to exist at the start (never deleted by the soak)
    dim: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    uploaded: dict[int, bytes] = field(default_factory=dict)  # acknowledged, not deleted
    deleted: set[int] = field(default_factory=set)  # acknowledged deletes
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))


def one_request(http: httpx.Client, route: str, rng: np.random.Generator, shared: Shared) -> int:
    """Send one request of kind `route`; returns its status (0: a transport error)."""
    with shared.lock:
        mine = list(shared.uploaded)
    known = shared.ids + mine
    if route == "search_image":
        reply = http.post("/search", files={"file": ("q.png", png(rng), "image/png")}, data={"k": "10"})
    elif route == "search_id":
        reply = http.post("/search", json={"id": int(rng.choice(known)), "k": 10})
    elif route == "search_vector":
        reply = http.post("/search", json={"vector": rng.standard_normal(shared.dim).tolist(), "k": 10})
    elif route == "classify":
        reply = http.post("/classify", files={"file": ("q.png", png(rng), "image/png")})
    elif route == "upload":
        images = [png(rng) for _ in range(int(rng.integers(1, 5)))]
        files = [("files", (f"soak-{i}.png", data, "image/png")) for i, data in enumerate(images)]
        reply = http.post("/images", files=files, data={"label": "soak", "tags": "soak"})
        if reply.status_code == 201:
            with shared.lock:
                for item, data in zip(reply.json()["items"], images, strict=True):
                    shared.uploaded[item["id"]] = data
    elif route == "delete":
        if not mine:
            return one_request(http, "list", rng, shared)
        victim = int(rng.choice(mine))
        with shared.lock:  # one delete per id: a second would rightly answer 404
            if victim not in shared.uploaded:
                return one_request(http, "list", rng, shared)
            data = shared.uploaded.pop(victim)
        reply = http.delete(f"/images/{victim}")
        with shared.lock:
            if reply.status_code == 200:
                shared.deleted.add(victim)
            else:  # not acknowledged: it may or may not be there; keep it out of both checks
                shared.uploaded.pop(victim, None)
                del data
    elif route == "list":
        reply = http.get("/images", params={"limit": 50, "cursor": int(rng.integers(0, max(known) + 1))})
    elif route == "get_record":
        reply = http.get(f"/images/{int(rng.choice(shared.ids))}")
    else:
        reply = http.get(f"/images/{int(rng.choice(shared.ids))}/content")
    return reply.status_code


def worker(url: str, seed: int, deadline: float, shared: Shared, headers: dict[str, str]) -> None:
    rng = np.random.default_rng(seed)
    routes, weights = list(MIX), np.array(list(MIX.values()), float)
    with httpx.Client(base_url=url, timeout=60, headers=headers) as http:
        while time.monotonic() < deadline:
            route = routes[int(rng.choice(len(routes), p=weights / weights.sum()))]
            started = time.perf_counter()
            try:
                status = one_request(http, route, rng, shared)
            except httpx.HTTPError:
                status = 0
            elapsed = time.perf_counter() - started
            with shared.lock:
                shared.latencies[route].append(elapsed)
                shared.statuses[route][status] += 1


def verify(url: str, shared: Shared, headers: dict[str, str]) -> tuple[list[int], list[int]]:
    """(acknowledged uploads missing or changed, acknowledged deletes still present)."""
    lost, undead = [], []
    with httpx.Client(base_url=url, timeout=60, headers=headers) as http:
        for image_id, data in shared.uploaded.items():
            reply = http.get(f"/images/{image_id}/content")
            if reply.status_code != 200 or reply.content != data:
                lost.append(image_id)
        for image_id in shared.deleted:
            if http.get(f"/images/{image_id}").status_code != 404 or (
                http.get(f"/images/{image_id}/content").status_code != 404
            ):
                undead.append(image_id)
    return lost, undead


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=os.environ.get("API_KEY"), help="X-API-Key (default: $API_KEY)")
    parser.add_argument("--keep", action="store_true", help="leave the soak's uploads in the catalogue")
    args = parser.parse_args()
    headers = {"X-API-Key": args.api_key} if args.api_key else {}

    with httpx.Client(base_url=args.url, timeout=30, headers=headers) as http:
        ready = http.get("/health/ready")
        if ready.status_code != 200:
            print(f"error: the service at {args.url} is not ready: {ready.text}", file=sys.stderr)
            return 2
        dim = http.get("/version").json()["embed_dim"]
        ids = [item["id"] for item in http.get("/images", params={"limit": 1000}).json()["items"]]
    if not ids:
        print("error: the catalogue is empty; run `make run` (it loads a demo catalogue)", file=sys.stderr)
        return 2
    pid = listening_pid(urlparse(args.url).port or 80)
    shared = Shared(ids, dim)
    rss = {"start": rss_mib(pid)}
    started = time.monotonic()
    deadline = started + args.minutes * 60
    threads = [
        threading.Thread(target=worker, args=(args.url, args.seed * 1000 + w, deadline, shared, headers))
        for w in range(args.concurrency)
    ]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        time.sleep(1)
        if "after 1 min" not in rss and time.monotonic() - started >= 60:
            rss["after 1 min"] = rss_mib(pid)
        done = sum(len(v) for v in shared.latencies.values())
        print(f"\r{time.monotonic() - started:6.0f} s  {done} requests", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    rss["end"] = rss_mib(pid)
    lost, undead = verify(args.url, shared, headers)
    report(args, time.monotonic() - started, shared, rss, lost, undead)
    if not args.keep:
        with httpx.Client(base_url=args.url, timeout=60, headers=headers) as http:
            for image_id in list(shared.uploaded):
                http.delete(f"/images/{image_id}")
    server_errors = sum(n for c in shared.statuses.values() for s, n in c.items() if s >= 500 or s == 0)
    return 1 if server_errors or lost or undead else 0


def report(args, elapsed: float, shared: Shared, rss: dict, lost: list[int], undead: list[int]) -> None:
    total = sum(len(v) for v in shared.latencies.values())
    print(f"\nsoak: {elapsed / 60:.1f} min, concurrency {args.concurrency}, seed {args.seed}, {args.url}")
    print(f"requests: {total} ({total / elapsed:.1f}/s)\n")
    print("| route | requests | errors by status | p50 ms | p95 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for route in MIX:
        values = np.asarray(shared.latencies.get(route, [0.0])) * 1000
        errors = {s: n for s, n in sorted(shared.statuses[route].items()) if not 200 <= s < 300}
        shown = ", ".join(f"{s}: {n}" for s, n in errors.items()) or "none"
        p50, p95, p99 = np.percentile(values, [50, 95, 99])
        count = len(shared.latencies.get(route, []))
        print(f"| {route} | {count} | {shown} | {p50:.0f} | {p95:.0f} | {p99:.0f} |")
    print(
        "\nresident memory (MiB): " + ", ".join(f"{k} {v:.0f}" if v else f"{k} n/a" for k, v in rss.items())
    )
    if rss.get("after 1 min") and rss.get("end"):
        print(f"growth after the first minute: {100 * (rss['end'] / rss['after 1 min'] - 1):+.1f}%")
    print(
        f"acknowledged uploads kept: {len(shared.uploaded)}, missing or changed: {len(lost)}; "
        f"acknowledged deletes: {len(shared.deleted)}, still present: {len(undead)}"
    )


if __name__ == "__main__":
    sys.exit(main())

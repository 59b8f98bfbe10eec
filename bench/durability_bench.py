"""What durable commits cost on ingest: `python -m service.ingest --fashion-mnist --limit N` into a
fresh embedded catalogue (the wall time includes starting the database and loading torch), with
the defaults (--sync-on-commit + j:true) and with both turned off.

    python bench/durability_bench.py --images 2000
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO_ENCODER = Path(__file__).resolve().parents[1] / "service" / "assets" / "demo-encoder.pt"
MODES = {
    "durable (default: --sync-on-commit, j:true)": {"EMBEDDED_DB_DURABLE": "true", "MONGO_JOURNAL": "true"},
    "not durable (EMBEDDED_DB_DURABLE=false MONGO_JOURNAL=false)": {
        "EMBEDDED_DB_DURABLE": "false",
        "MONGO_JOURNAL": "false",
    },
}


def ingest_seconds(images: int, settings: dict[str, str], work: Path) -> float:
    data_dir = work / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    shutil.copyfile(DEMO_ENCODER, data_dir / "model.pt")
    env = {**os.environ, "DATA_DIR": str(data_dir), **settings}
    env.pop("MONGO_URI", None)
    command = [
        sys.executable,
        "-m",
        "service.ingest",
        "--fashion-mnist",
        "--limit",
        str(images),
        "--no-progress",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"ingest failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="durability-bench-"))
    try:
        results = {name: ingest_seconds(args.images, settings, work) for name, settings in MODES.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = results[next(iter(MODES))]
    print(f"ingest of {args.images} Fashion-MNIST images into a fresh embedded catalogue")
    print("| mode | seconds | images/s | vs durable |\n|---|---|---|---|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds:.1f} | {args.images / seconds:.0f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()

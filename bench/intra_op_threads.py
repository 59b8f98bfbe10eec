"""Forward passes of deploy-time encoders on one intra-op thread against more, as the service runs
them: through a pool of two threads, one pass at a time with a pause after each (the pacing of
concurrency-1 traffic, where the HTTP, decode and search steps leave torch's threads idle between
passes). The thread counts alternate in blocks, so both see the same machine.

What it decides: `service.engine.intra_op_threads` runs an encoder of at most
SINGLE_THREAD_MAX_MACS per image on one thread (waking a second one at every layer costs a small
pass more than it saves) and lets its batches run side by side instead.

    mkdir -p /tmp/demo && cp service/assets/demo-encoder.pt /tmp/demo/model.pt
    python -m training.inference /tmp/demo/model.pt --data fashion-mnist:test   # the form the service runs
    python -m service.random_model --width 1.0 /tmp/w1/model.pt
    python -m training.inference /tmp/w1/model.pt
    python -m service.random_model --width 1.0 --input-size 96 /tmp/w96/model.pt
    python -m training.inference /tmp/w96/model.pt
    python bench/intra_op_threads.py /tmp/demo/model.pt /tmp/w1/model.pt /tmp/w96/model.pt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.engine import SINGLE_THREAD_MAX_MACS  # noqa: E402
from training.inference import load_deploy_encoder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("encoders", nargs="+", type=Path, help="encoder files (their deploy form is used)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="images per pass")
    parser.add_argument("--passes", type=int, default=20, help="timed passes per block (default 20)")
    parser.add_argument("--blocks", type=int, default=3, help="alternating blocks per setting (default 3)")
    parser.add_argument("--pause-ms", type=float, default=3.0, help="pause after each pass (default 3)")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, default threads {torch.get_num_threads()}, pool of 2, "
          f"pause {args.pause_ms} ms, {args.blocks} x {args.passes} passes per cell; "
          f"one thread up to {SINGLE_THREAD_MAX_MACS / 1e6:.0f} MMACs per image in the service")  # fmt: skip
    header = " | ".join(f"{t} thread(s), ms" for t in args.threads)
    print(f"\n| encoder | MMACs / image | dtype | images per pass | {header} |")
    print("|---|---:|---|---:|" + "---:|" * len(args.threads))
    with ThreadPoolExecutor(2) as pool:
        for path in args.encoders:
            encoder = load_deploy_encoder(path)
            for batch in args.batches:
                side = encoder.input_size
                images = torch.randint(0, 256, (batch, encoder.in_channels, side, side), dtype=torch.uint8)
                times: dict[int, list[float]] = {t: [] for t in args.threads}
                for _ in range(args.blocks):
                    for threads in args.threads:
                        encoder.threads = threads  # applied by embed() in the pool thread
                        for _ in range(3):  # each pool thread takes the count before timing
                            pool.submit(encoder.embed, images).result()
                        for _ in range(args.passes):
                            started = time.perf_counter()
                            pool.submit(encoder.embed, images).result()
                            times[threads].append((time.perf_counter() - started) * 1000)
                            time.sleep(args.pause_ms / 1000)
                cells = " | ".join(f"{statistics.median(times[t]):.1f}" for t in args.threads)
                dtype = str(encoder.dtype).removeprefix("torch.")
                mmacs = encoder.macs_per_image / 1e6
                print(f"| {path} | {mmacs:.0f} | {dtype} | {batch} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

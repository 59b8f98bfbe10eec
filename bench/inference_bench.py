"""Deploy-time encoder vs the training graph in fp32: images/s at the same batch size, and agreement.

    python bench/inference_bench.py [--encoder service/assets/demo-encoder.pt] [--batch 1 8 64 256]

For each batch size: the training graph (`training.encoder.Encoder`, fp32, BatchNorm separate) and
the deploy-time form (`training.inference`, folded, channels-last, bf16 where within tolerance and
faster) in each runtime it was stored for (ONNX Runtime, TorchScript, eager), all through `embed`
(uint8 in, normalised float32 out, as the service calls them).
Throughput is measured two ways: CPU seconds of the calling thread with torch on one thread
(robust to other jobs on a shared machine) and wall clock with all threads. The agreement (cosine,
top-10 overlap) is measured on held-out Fashion-MNIST test images.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import torch

from training.encoder import Encoder, read_encoder_record
from training.inference import (
    RUNTIMES,
    InferenceEncoder,
    build_inference_encoder,
    calibration_images,
    inference_record,
    measure_agreement,
    with_forms,
)

REPO = Path(__file__).resolve().parents[1]


def rate(encoder: Encoder, images: torch.Tensor, seconds: float, clock) -> float:
    """images/s of encoder.embed over repeated calls for about `seconds` of `clock`."""
    encoder.embed(images)  # warm-up (oneDNN primitive creation)
    encoder.embed(images)
    count, start = 0, clock()
    while clock() - start < seconds:
        encoder.embed(images, batch_size=images.shape[0])
        count += images.shape[0]
    return count / (clock() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", type=Path, default=REPO / "service/assets/demo-encoder.pt")
    parser.add_argument("--data", default="fashion-mnist:test", help="held-out images (calibration)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="measure the form in this dtype instead of the one publishing would choose (e.g. bf16 on a "
        "CPU that only emulates it)",
    )
    args = parser.parse_args()

    record = read_encoder_record(args.encoder)
    images = calibration_images(args.data, args.encoder, 2000)
    if args.dtype:
        candidate = with_forms(inference_record(record, args.dtype))
        deployed = {**candidate, "runtime": "onnxruntime" if "onnx" in candidate else "torchscript"}
    else:
        deployed = build_inference_encoder(record, images)
    exact, fast = Encoder(record), InferenceEncoder(deployed)
    # Every form of the chosen record, the one that serves first: how much each runtime gives.
    forms = {f"{fast.runtime} {deployed['dtype']}": fast}
    for runtime in RUNTIMES:
        form = InferenceEncoder({**deployed, "runtime": runtime})
        if form.runtime == runtime:
            forms.setdefault(f"{runtime} {deployed['dtype']}", form)
    agreement = measure_agreement(exact, fast, images)
    print(f"encoder {record['version']} ({record['network']['arch']}, {record['input_size']} px)")
    print(
        f"deploy form: {deployed['dtype']}, {len(deployed['folded'])} batchnorms folded, channels-last, "
        f"served by {fast.runtime}; timed at publish (ms for a pass of 1 + a pass of 8, one thread): "
        + ", ".join(f"{name} {ms}" for name, ms in deployed.get("timings_ms", {}).items())
    )
    print(
        f"agreement on {agreement.images} held-out images ({agreement.queries} queries): mean cosine "
        f"{agreement.mean_cosine:.6f}, min {agreement.min_cosine:.5f}, top-10 overlap "
        f"{agreement.top10_overlap:.4f} (fast db) / {agreement.top10_overlap_mixed:.4f} (fp32 db), "
        f"identical top-10 {agreement.top10_identical:.1%}"
    )
    threads = torch.get_num_threads()
    names = list(forms)
    print(
        "| batch | training graph fp32 img/s (1 thread, CPU s) | "
        + " | ".join(f"{name} img/s (1 thread, CPU s)" for name in names)
        + f" | served / training graph | training graph img/s ({threads} threads, wall) "
        "| served img/s (wall) | ratio |"
    )
    print("|---:" * (len(names) + 6) + "|")
    for batch in args.batch:
        x = images[:batch]
        torch.set_num_threads(1)
        cpu = [rate(e, x, args.seconds, time.thread_time) for e in (exact, *forms.values())]
        torch.set_num_threads(threads)
        wall = [rate(e, x, args.seconds, time.perf_counter) for e in (exact, fast)]
        print(
            f"| {batch} | {cpu[0]:.0f} | "
            + " | ".join(f"{value:.0f}" for value in cpu[1:])
            + f" | {cpu[1] / cpu[0]:.2f}x | {wall[0]:.0f} | {wall[1]:.0f} | {wall[1] / wall[0]:.2f}x |"
        )
    for count in sorted({1, threads}):
        torch.set_num_threads(count)
        for form in forms.values():
            form.threads = count
        passes = {name: beside_python(form, images[:6], args.seconds) for name, form in forms.items()}
        print(
            f"one pass of 6 images beside a thread running Python (as the service's event loop under "
            f"load), {count} torch thread(s), wall ms: "
            + ", ".join(f"{name} {ms:.1f}" for name, ms in passes.items())
        )
    torch.set_num_threads(threads)


def beside_python(encoder: Encoder, images: torch.Tensor, seconds: float) -> float:
    """ms per embed call while another thread runs pure Python: each time the call's thread gives
    the GIL up (every layer of an eager module) it may wait a switch interval to get it back."""
    stop = threading.Event()

    def python_work() -> None:
        while not stop.is_set():
            sum(range(1000))

    worker = threading.Thread(target=python_work)
    worker.start()
    try:
        return 1000 / rate(encoder, images, seconds, time.perf_counter) * images.shape[0]
    finally:
        stop.set()
        worker.join()


if __name__ == "__main__":
    main()

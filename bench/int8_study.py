"""int8 in ONNX Runtime against the deploy form's tolerance (bench/RESULTS.md, "int8 in ONNX Runtime").

The encoder's ONNX form (what serves in fp32) is quantised statically by ONNX Runtime (QDQ,
per-channel int8 weights, calibrated on training images) several ways; each variant is scored
against the fp32 embedding on held-out test images (cosine, top-10 overlap of 500 queries) and
timed on one thread.

    python bench/int8_study.py [--encoder service/assets/demo-encoder.pt] [--seconds 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from training.data.datasets import load_dataset
from training.encoder import Encoder
from training.inference import TOLERANCE, inference_record, with_forms
from training.onnx_runner import INPUT_NAME, OnnxRunner

CALIBRATION_IMAGES, TEST_IMAGES, QUERIES = 512, 2000, 500


class Batches(CalibrationDataReader):
    def __init__(self, images: np.ndarray, size: int = 32) -> None:
        self.batches = iter([images[i : i + size] for i in range(0, len(images), size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantised_variants(model: bytes, calibration: np.ndarray, workdir: Path) -> dict[str, bytes]:
    source, prepared = workdir / "fp32.onnx", workdir / "prepared.onnx"
    source.write_bytes(model)
    quant_pre_process(str(source), str(prepared))
    nodes = onnx.load(str(prepared)).graph.node
    gemms = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]  # the whitening
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    minmax, percentile = CalibrationMethod.MinMax, CalibrationMethod.Percentile
    plans = {
        "int8, every node, min-max": ([], minmax, QuantType.QUInt8),
        "int8, every node, percentile 99.999": ([], percentile, QuantType.QUInt8),
        "int8, whitening left fp32, min-max": (gemms, minmax, QuantType.QUInt8),
        "int8, whitening and first conv left fp32": (gemms + convs[:1], percentile, QuantType.QUInt8),
        "int8, also the last five convs left fp32": (
            gemms + convs[:1] + convs[-5:],
            percentile,
            QuantType.QUInt8,
        ),
        "int8 weights, 16-bit activations": (gemms, percentile, QuantType.QUInt16),
    }
    variants = {}
    for number, (name, (excluded, method, activations)) in enumerate(plans.items()):
        out = workdir / f"q{number}.onnx"
        quantize_static(
            str(prepared),
            str(out),
            Batches(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=activations,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
            nodes_to_exclude=excluded,
            extra_options={"CalibPercentile": 99.999} if method == percentile else {},
        )
        variants[name] = out.read_bytes()
    return variants


def top10(queries: torch.Tensor, database: torch.Tensor) -> torch.Tensor:
    return (queries @ database.T).topk(11, dim=1).indices[:, 1:]  # QUERIESx10, the query itself left out


def images_per_second(runner: OnnxRunner, images: torch.Tensor, seconds: float) -> int:
    runner(images, 1)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        runner(images, 1)
        count += len(images)
    return round(count / (time.perf_counter() - start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="service/assets/demo-encoder.pt")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per batch size")
    args = parser.parse_args()
    encoder = Encoder.load(args.encoder)
    model = with_forms(inference_record(encoder.record, "float32"))["onnx"]
    calibration = load_dataset("fashion-mnist", 28).subset(CALIBRATION_IMAGES, seed=1).images.numpy()
    test = load_dataset("fashion-mnist:test", 28).images[:TEST_IMAGES]
    exact = torch.from_numpy(encoder.embed(test))  # NxD, the training graph in fp32
    exact_top = top10(exact[:QUERIES], exact)
    with tempfile.TemporaryDirectory() as workdir:
        variants = {"fp32 (what serves)": model, **quantised_variants(model, calibration, Path(workdir))}
    print(f"tolerance: {TOLERANCE}")
    print("| form | mean cosine | min cosine | top-10 overlap | images/s at 1 / 8 / 64 |")
    print("|---|---:|---:|---:|---|")
    for name, data in variants.items():
        runner = OnnxRunner(data)
        fast = runner(test, 1)
        cosine = (fast * exact).sum(1)
        found = top10(fast[:QUERIES], fast)
        overlap = np.mean(
            [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(found, exact_top, strict=True)]
        )
        rates = " / ".join(str(images_per_second(runner, test[:b], args.seconds)) for b in (1, 8, 64))
        print(f"| {name} | {cosine.mean():.5f} | {cosine.min():.4f} | {overlap:.3f} | {rates} |")


if __name__ == "__main__":
    main()

"""Which arithmetic a run uses: `--amp auto` picks bf16 where the device computes it natively.

bf16 autocast halves the bytes moved and, on hardware with bf16 units, roughly doubles the math
rate: CUDA GPUs that support it (Ampere and later), and CPUs with AVX-512 BF16 or AMX (Cooper
Lake, Sapphire Rapids and later; measured 2x on this project's CPU, bench/RESULTS.md). Elsewhere
bf16 is emulated and slower than fp32, so `auto` stays in fp32 there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_flags(cpuinfo_text: str | None = None) -> set[str]:
    """The `flags` of the first CPU in /proc/cpuinfo (empty where there is no such file)."""
    if cpuinfo_text is None:
        try:
            cpuinfo_text = CPUINFO.read_text()
        except OSError:
            return set()
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cpu_has_native_bf16(cpuinfo_text: str | None = None) -> bool:
    """AVX-512 BF16 or AMX, from the CPU flags (Linux), else torch's own capability query."""
    flags = cpu_flags(cpuinfo_text)
    if flags:
        return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    return capability in ("AVX512_BF16", "AMX")  # torch names its dispatch levels this way


def native_bf16(device: torch.device, cpuinfo_text: str | None = None) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16(cpuinfo_text)
    return False


def resolve_amp(amp: str, device: torch.device, cpuinfo_text: str | None = None) -> str:
    """`auto` -> "bf16" where the device computes bf16 natively, else "none"; others unchanged."""
    if amp != "auto":
        return amp
    return "bf16" if native_bf16(device, cpuinfo_text) else "none"


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--amp` on `device` (None: fp32)."""
    return AMP_DTYPES[resolve_amp(amp, device)]


def add_inference_amp_argument(parser: argparse.ArgumentParser) -> None:
    """`--amp` of the inference commands (training.embed, training.evaluate)."""
    parser.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "none", "bf16"],
        help="inference precision; auto: bf16 where the device computes it natively (the vectors agree "
        "with fp32 to a cosine of 0.999; tests/training/test_embed.py), fp32 elsewhere",
    )

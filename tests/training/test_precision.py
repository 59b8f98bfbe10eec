"""`--amp auto`: bf16 where the device computes it natively (both branches of the detection), and
the bf16 inference fast path of training.embed / training.evaluate agreeing with fp32."""

from __future__ import annotations

import pytest
import torch

from training.data.datasets import load_dataset
from training.encoder import Encoder, make_encoder_record
from training.knn_monitor import knn_accuracy
from training.models import build_embedding_network, network_spec
from training.precision import autocast_dtype, cpu_flags, resolve_amp

CPU = torch.device("cpu")
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
COOPER_LAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"


def test_cpu_flags_are_read_from_cpuinfo():
    assert {"avx512_bf16", "amx_bf16", "avx2"} <= cpu_flags(SAPPHIRE_RAPIDS)
    assert cpu_flags("") == set()


@pytest.mark.parametrize(
    ("cpuinfo", "expected"), [(SAPPHIRE_RAPIDS, "bf16"), (COOPER_LAKE, "bf16"), (SKYLAKE, "none")]
)
def test_auto_is_bf16_only_on_cpus_with_native_bf16(cpuinfo, expected):
    assert resolve_amp("auto", CPU, cpuinfo) == expected
    assert resolve_amp("none", CPU, SAPPHIRE_RAPIDS) == "none"  # an explicit choice is kept
    assert resolve_amp("bf16", CPU, SKYLAKE) == "bf16"


@pytest.mark.parametrize(
    ("capability", "expected"), [("AVX512_BF16", "bf16"), ("AMX", "bf16"), ("AVX2", "none")]
)
def test_without_cpuinfo_torch_is_asked(capability, expected, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert resolve_amp("auto", CPU, cpuinfo_text="") == expected


def test_cuda_follows_torchs_bf16_query(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_amp("auto", torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # e.g. a V100
    assert resolve_amp("auto", torch.device("cuda")) == "none"
    assert autocast_dtype("none", torch.device("cuda")) is None


def test_bf16_embeddings_agree_with_fp32_and_give_the_same_knn_accuracy(tmp_path):
    torch.manual_seed(0)
    spec = network_spec("resnet18", {"in_channels": 1, "small_stem": True, "width": 0.125})
    network = build_embedding_network(spec).eval()
    record = make_encoder_record("simclr", spec, network, 64, 28, 1, [0.286], [0.353])
    memory = load_dataset("fashion-mnist", 28).subset(2000, seed=0)
    queries = load_dataset("fashion-mnist:test", 28).subset(500, seed=0)
    accuracy = {}
    for amp in ("none", "bf16"):
        encoder = Encoder(record, CPU, amp=amp)
        vectors = {
            name: torch.from_numpy(encoder.embed(data.images))
            for name, data in (("m", memory), ("q", queries))
        }
        accuracy[amp] = knn_accuracy(vectors["m"], memory.labels, vectors["q"], queries.labels, 10)[0]
        if amp == "none":
            fp32 = vectors["q"]
    bf16 = vectors["q"]
    assert not torch.equal(fp32, bf16)  # it did run in bf16
    assert float((fp32 * bf16).sum(1).min()) > 0.998  # rows are L2-normalised: cosine
    # Retrieval quality unchanged beyond noise (issue 10: within 0.5 point).
    assert abs(accuracy["bf16"] - accuracy["none"]) <= 0.5, accuracy

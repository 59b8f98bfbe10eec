"""The deploy-time form of an encoder: what the service runs instead of the training graph.

    python -m training.inference ENCODER.pt [--data fashion-mnist:test] [--out encoder.inference.pt]

Five changes, none of which alters what the network computes beyond a stated tolerance:
1. Every BatchNorm that directly follows a convolution or a linear layer (and is its only user) is
   folded into it: y = gamma (Wx + b - mu) / sqrt(var + eps) + beta is a convolution with weights
   W * s and bias (b - mu) * s + beta, s = gamma / sqrt(var + eps) (the structural
   re-parameterisation of RepVGG). In fp32 this is exact up to rounding (tested to 1e-5).
2. The graph is fixed in eval mode (no running-statistics updates, no dropout).
3. Channels-last layout; bf16 weights and activations where the CPU computes bf16 natively
   (AVX-512 BF16 / AMX, from the CPU flags as for `--amp auto`; elsewhere oneDNN emulates bf16,
   slower than fp32), it is the faster form (5. below), and the embeddings stay within TOLERANCE
   of the fp32 training graph, measured on held-out images: mean cosine, worst cosine and the
   overlap of each query's top-10 neighbours (bf16 queries against both a bf16 and an fp32
   database, since a published index may hold fp32 vectors).
   Otherwise the folded graph stays in fp32.
4. The whole path from uint8 pixels to the normalised embedding (scaling, the network, L2
   normalisation) is also traced to TorchScript and stored with the record (`scripted`): the
   service runs it in C++ with the GIL released once per call. The eager module takes the GIL
   back at every layer, and beside a thread running Python (the service's event loop under load,
   holding the GIL for up to the switch interval each time) a 6-image pass took 566 ms instead of
   5 ms; the traced one 40 ms. It is also 1.1-1.5x faster alone, and its output is checked
   identical to the eager form's. A network that does not trace is served eagerly.
5. The fp32 path is also exported to ONNX (`onnx`, training/onnx_runner.py): ONNX Runtime runs
   the demo encoder's single-image pass in 0.7 ms against 3-4.5 ms in TorchScript. Which form
   serves (`runtime`: onnxruntime, torchscript or eager, in fp32 or bf16) is chosen at publish by
   timing each on one thread at the service's batch sizes (1 and 8 images; `timings_ms`), so a
   CPU where bf16 TorchScript beats fp32 ONNX Runtime keeps it. At load every stored form is
   checked against the eager one and the next one serves when it does not load or disagrees.

The inference file (`torch.save` of a dict, format INFERENCE_FORMAT) holds the original encoder
record's fields, the folded state_dict, the list of folded (layer, batchnorm) pairs, the dtype and
the measured tolerance. It is written next to the encoder file as `encoder.inference.pt`;
`index.store` carries it into each version with the encoder, and the service loads it from there
(`load_deploy_encoder`), falling back to folding in fp32 (exact) when a version has none.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from index.rwlock import ReadWriteLock
from index.store import INFERENCE_ENCODER_FILE
from training import onnx_runner
from training.encoder import Encoder, EncoderError, read_encoder_record, save_encoder, use_threads
from training.models import build_embedding_network
from training.models.whitening import Whitening
from training.onnx_runner import OnnxRunner
from training.precision import cpu_has_native_bf16

log = logging.getLogger("training.inference")
INFERENCE_FORMAT = "ssl-retrieval/inference-encoder/v1"
SCRIPT_EXAMPLE_BATCH = 6  # traced at this batch size; the graph serves any batch size
SCRIPT_AGREEMENT = 1e-5  # largest |difference| from the eager form that a stored form may show
RUNTIMES = ("onnxruntime", "torchscript", "eager")  # preference when a record names none it can use
TIMED_BATCHES = (1, 8)  # the service's passes: one image at low load, a few at high load
FOLDABLE = {
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
    nn.Linear: nn.BatchNorm1d,
}


@dataclass(frozen=True)
class Tolerance:
    """What a reduced-precision form must keep, compared with the fp32 training graph."""

    mean_cosine: float = 0.999  # mean over images of cos(fp32 embedding, fast embedding)
    min_cosine: float = 0.99  # the worst image
    # mean |top-10 fp32 & top-10 fast| / 10 over held-out queries: bf16 swaps near-tied neighbours
    # at the 10th place for ~1 query in 8 on Fashion-MNIST (0.987 measured), so "unchanged" is 0.97
    top10_overlap: float = 0.97


TOLERANCE = Tolerance()
MIN_CALIBRATION_IMAGES = 200  # fewer held-out images than this say too little about top-10 lists


@dataclass
class Agreement:
    """Measured agreement of a fast form with the fp32 training graph on `images` images."""

    images: int
    queries: int
    mean_cosine: float
    min_cosine: float
    top10_overlap: float  # fast queries against the fast database
    top10_overlap_mixed: float  # fast queries against an fp32 database
    top10_identical: float  # fraction of queries whose top-10 (fast vs fast) is exactly unchanged

    def within(self, tolerance: Tolerance = TOLERANCE) -> bool:
        return (
            self.mean_cosine >= tolerance.mean_cosine
            and self.min_cosine >= tolerance.min_cosine
            and min(self.top10_overlap, self.top10_overlap_mixed) >= tolerance.top10_overlap
        )


# torch.fx's tracer patches nn.Module.__call__ process-wide while it traces, so a forward pass in
# another thread (the service embeds while a new version loads) would run through the tracer and
# fail: traces take this lock exclusively, deploy-time forward passes share it.
FX_TRACE_LOCK = ReadWriteLock()


# ----------------------------------------------------------------------------- folding
class _LeafWhiteningTracer(torch.fx.Tracer):
    """fx's tracer, with the whitening (no batchnorm inside; its autocast guard is not traceable) a leaf."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, Whitening) or super().is_leaf_module(module, qualified_name)


def foldable_pairs(network: nn.Module) -> list[tuple[str, str]]:
    """(layer, batchnorm) module names where the batchnorm directly consumes the layer's output and
    nothing else does (traced with torch.fx, so the pairs follow the data flow, not the attribute
    order; a network that runs its modules more than once, at several scales, names each pair once).
    A network fx cannot trace has no pairs: it then runs unfolded."""
    try:
        with FX_TRACE_LOCK.write():
            graph = _LeafWhiteningTracer().trace(network)
    except Exception:  # data-dependent control flow: keep the network as it is
        return []
    modules = dict(network.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or not isinstance(node.args[0], torch.fx.Node):
            continue
        producer = node.args[0]
        if producer.op != "call_module" or len(producer.users) != 1:
            continue
        layer, norm = modules[producer.target], modules[node.target]
        expected = FOLDABLE.get(type(layer))
        pair = (str(producer.target), str(node.target))
        if expected is not None and type(norm) is expected and norm.track_running_stats and pair not in pairs:
            pairs.append(pair)
    return pairs


@torch.no_grad()
def fold_into(layer: nn.Module, norm: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold eval-mode `norm` into `layer` (Conv*d or Linear) in place; the layer gains a bias."""
    scale = torch.rsqrt(norm.running_var.double() + norm.eps)  # C
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -norm.running_mean.double() * scale  # C
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    weight = layer.weight.double()  # CxC_in(xkxk)
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(shift)
    layer.weight.copy_((weight * scale.view(-1, *[1] * (weight.dim() - 1))).to(layer.weight.dtype))
    layer.bias = nn.Parameter((bias * scale + shift).to(layer.weight.dtype))


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def apply_folding(network: nn.Module, pairs: list[tuple[str, str]], fold_weights: bool) -> nn.Module:
    """Replace each paired batchnorm by Identity; with `fold_weights` its statistics go into the
    layer first (otherwise the layer only gains a zero bias, to receive a folded state_dict)."""
    for layer_name, norm_name in pairs:
        layer = network.get_submodule(layer_name)
        if fold_weights:
            fold_into(layer, network.get_submodule(norm_name))
        elif layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype))
        _set_module(network, norm_name, nn.Identity())
    return network


def fold_batchnorm(network: nn.Module) -> tuple[nn.Module, list[tuple[str, str]]]:
    """(an eval-mode copy of `network` with its batchnorms folded, the folded pairs)."""
    folded = copy.deepcopy(network).eval()
    pairs = foldable_pairs(folded)
    return apply_folding(folded, pairs, fold_weights=True), pairs


# ----------------------------------------------------------------------------- the encoder
FLOAT32_PREFIXES = ("whitening.",)  # kept in float32 in every form: see training.models.whitening


def keep_float32(network: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Undo the dtype conversion for the whitening: its float32 values, back from the record."""
    whitening = getattr(network, "whitening", None)
    if whitening is not None:
        whitening.float()
        prefix = FLOAT32_PREFIXES[0]
        whitening.load_state_dict(
            {k.removeprefix(prefix): v.float() for k, v in state_dict.items() if k.startswith(prefix)}
        )


def native_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX-512 BF16 or AMX), as `--amp auto` decides.
    Not oneDNN's own `_is_mkldnn_bf16_supported()`: that is true on any AVX-512 CPU, where bf16 is
    emulated and 2x slower than fp32 at the service's batch sizes (bench/RESULTS.md)."""
    return cpu_has_native_bf16()


class InferenceEncoder(Encoder):
    """`Encoder` with the folded eval graph in `dtype` (same interface: prepare, embed, version...)."""

    def __init__(self, record: dict[str, Any], device: str | torch.device = "cpu") -> None:
        if record.get("format") != INFERENCE_FORMAT:
            raise EncoderError(f"not an inference encoder record (format {record.get('format')!r})")
        self.record = record
        self.device = torch.device(device)
        self.dtype = getattr(torch, record["dtype"])
        self.folded_pairs = [tuple(pair) for pair in record["folded"]]
        network = apply_folding(
            build_embedding_network(record["network"]), self.folded_pairs, fold_weights=False
        )
        network.load_state_dict(record["state_dict"])
        # channels-last: oneDNN's fast bf16/fp32 convolution layout (2x over NCHW in bf16 here)
        self.network = network.to(self.device, self.dtype, memory_format=torch.channels_last).eval()
        keep_float32(self.network, record["state_dict"])
        for parameter in self.network.parameters():
            parameter.requires_grad_(False)
        self.embed_dim = record["embed_dim"]
        self.input_size = record["input_size"]
        self.in_channels = record["in_channels"]
        self.version = record["version"]  # the source encoder's: the same model, served faster
        self.method = record["method"]
        self.metrics = record.get("metrics", {})
        self._threads: int | None = None  # as Encoder.threads
        shape = (1, self.in_channels, 1, 1)
        # Normalisation folded into one multiply-add in the network's dtype: x * a + b.
        std = torch.tensor(record["std"], dtype=torch.float64).view(shape)
        mean = torch.tensor(record["mean"], dtype=torch.float64).view(shape)
        self._scale = (1.0 / (255.0 * std)).to(self.device, torch.float32)
        self._offset = (-mean / std).to(self.device, torch.float32)
        self._mean, self._std = mean.float().to(self.device), std.float().to(self.device)
        # Built once: the eager path (what the stored forms were made from), then the first stored
        # form, in the order the record prefers, that loads and computes what the eager path does.
        self._path = EmbeddingPath(self.network, self._scale, self._offset, self.dtype).eval()
        self.onnx: OnnxRunner | None = None
        self.scripted: torch.jit.ScriptModule | None = None
        preferred = record.get("runtime")
        for runtime in sorted(RUNTIMES, key=lambda runtime: runtime != preferred):  # stable
            if runtime == "onnxruntime" and self.device.type == "cpu":
                self.onnx = self._load_onnx(record.get("onnx"))
            elif runtime == "torchscript":
                self.scripted = self._load_scripted(record.get("scripted"))
            if runtime == "eager" or self.onnx is not None or self.scripted is not None:
                self.runtime = runtime
                break

    @property
    def threads(self) -> int | None:
        """Intra-op threads per pass (None: the calling thread's torch count), as Encoder.threads."""
        return self._threads

    @threads.setter
    def threads(self, count: int | None) -> None:
        self._threads = count
        if self.onnx is not None and count is not None:
            self.onnx.session(count)  # built now (the service sets it at load), not in a search

    @property
    def agreement(self) -> dict[str, Any] | None:
        return self.record.get("agreement")

    def path(self) -> EmbeddingPath:
        """The eager module from uint8 pixels to normalised embeddings (what `scripted` traces)."""
        return self._path

    def _eager_pass(self, images: torch.Tensor) -> torch.Tensor:
        return self._path(images)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """images: uint8 NxCxSxS. Returns float32 NxD, rows L2-normalised."""
        use_threads(self.threads)
        out = []
        # No profiling executor: same speed here, and no slow first calls at each new batch size.
        with FX_TRACE_LOCK.read(), torch.jit.optimized_execution(False):
            run = self._runner()
            for start in range(0, images.shape[0], batch_size):
                batch = images[start : start + batch_size].to(self.device, non_blocking=True)
                out.append(run(batch).cpu())
        if not out:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return torch.cat(out).numpy()

    def _runner(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.onnx is not None:
            return functools.partial(self.onnx, threads=self.threads)
        return self.scripted if self.scripted is not None else self._path

    def _load_onnx(self, data: bytes | None) -> OnnxRunner | None:
        """The stored ONNX form in ONNX Runtime, if it is installed, loads and agrees; else None."""
        if not data or not onnx_runner.available():
            return None
        try:
            runner = OnnxRunner(data)
        except Exception as exc:  # damaged, or from an opset this runtime lacks: another form serves
            log.warning("encoder %s: its ONNX form does not load (%s)", self.version, exc)
            return None
        one_thread = functools.partial(runner, threads=1)  # the session built with it; others when set
        if not form_agrees(self._path, one_thread, self.in_channels, self.input_size, self.device):
            log.warning("encoder %s: its ONNX form disagrees with the eager form", self.version)
            return None
        return runner

    def _load_scripted(self, data: bytes | None) -> torch.jit.ScriptModule | None:
        """The stored TorchScript form, if there is one and it still computes what the eager form
        does (a different torch could load it and differ): else None, and the eager form serves."""
        if not data:
            return None
        try:
            with torchscript():
                scripted = torch.jit.load(io.BytesIO(data), map_location=self.device).eval()
        except Exception as exc:  # written by another torch, damaged: the eager form is exact
            log.warning(
                "encoder %s: its scripted form does not load (%s); using the eager form", self.version, exc
            )
            return None
        if not form_agrees(self._path, scripted, self.in_channels, self.input_size, self.device):
            log.warning(
                "encoder %s: its scripted form disagrees with the eager form; using the eager form",
                self.version,
            )
            return None
        return scripted


@contextlib.contextmanager
def torchscript() -> Iterator[None]:
    """torch 2.14 marks torch.jit deprecated (FutureWarning) in favour of torch.export, which has
    no Python-free runner short of AOTInductor's compiled packages (a C++ toolchain at publish
    time). Used knowingly: a torch that cannot load the stored form falls back to the eager one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        yield


class EmbeddingPath(nn.Module):
    """uint8 NxCxSxS -> float32 NxD, rows L2-normalised: normalisation as one multiply-add in the
    network's dtype (x * scale + offset), channels-last, the network, then L2 normalisation."""

    def __init__(
        self, network: nn.Module, scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.network = network
        self.dtype = dtype
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.offset, images.float(), self.scale).to(self.dtype)  # NxCxSxS
        x = x.contiguous(memory_format=torch.channels_last)
        return F.normalize(self.network(x).float(), dim=1)  # NxD


def form_agrees(
    path: nn.Module,
    form: Callable[[torch.Tensor], torch.Tensor],
    channels: int,
    size: int,
    device: torch.device,
) -> bool:
    """Whether a stored `form` (TorchScript, ONNX Runtime) reproduces `path` on seeded random
    images, within SCRIPT_AGREEMENT."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 256, (3, channels, size, size), dtype=torch.uint8, generator=generator).to(
        device
    )
    with torch.inference_mode(), torch.jit.optimized_execution(False):
        difference = (path(probe) - form(probe)).abs().max().item()
    return difference <= SCRIPT_AGREEMENT


def script_embedding(encoder: InferenceEncoder) -> bytes:
    """The TorchScript form of `encoder`'s embedding path (traced, checked, serialised)."""
    path = encoder.path()
    example = torch.zeros(
        SCRIPT_EXAMPLE_BATCH, encoder.in_channels, encoder.input_size, encoder.input_size, dtype=torch.uint8
    ).to(encoder.device)
    with FX_TRACE_LOCK.read(), torch.inference_mode(), torchscript():
        traced = torch.jit.trace(path, example, check_trace=False)
    if not form_agrees(path, traced, encoder.in_channels, encoder.input_size, encoder.device):
        raise EncoderError("the traced embedding path disagrees with the eager one")
    buffer = io.BytesIO()
    with torchscript():
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def inference_record(record: dict[str, Any], dtype: str = "float32") -> dict[str, Any]:
    """The inference form of an encoder record, folded, in `dtype` (no tolerance measured yet)."""
    network = build_embedding_network(record["network"])
    network.load_state_dict(record["state_dict"])
    folded, pairs = fold_batchnorm(network)
    state = {
        k: v.detach().to(torch.float32 if k.startswith(FLOAT32_PREFIXES) else getattr(torch, dtype)).clone()
        for k, v in folded.state_dict().items()
    }
    fields = {k: v for k, v in record.items() if k not in ("format", "state_dict")}
    return {
        **fields,
        "format": INFERENCE_FORMAT,
        "source_format": record.get("format"),
        "state_dict": state,
        "folded": [list(pair) for pair in pairs],
        "dtype": dtype,
        "agreement": None,
    }


def measure_agreement(
    exact: Encoder, fast: Encoder, images: torch.Tensor, queries: int = 500, k: int = 10
) -> Agreement:
    """Compare `fast` with `exact` on uint8 NxCxSxS images: cosines over all of them; top-k of the
    first `queries` images (held out) against the rest, as database."""
    reference = torch.from_numpy(exact.embed(images)).double()  # NxD
    candidate = torch.from_numpy(fast.embed(images)).double()  # NxD
    cosine = (reference * candidate).sum(dim=1)  # N (rows are unit vectors)
    queries = max(1, min(queries, images.shape[0] // 2))
    k = min(k, images.shape[0] - queries)

    def top(query: torch.Tensor, database: torch.Tensor) -> torch.Tensor:
        return torch.topk(query[:queries] @ database[queries:].T, k, dim=1).indices  # QxK

    truth = top(reference, reference)
    fast_fast, fast_mixed = top(candidate, candidate), top(candidate, reference)

    def overlap(found: torch.Tensor) -> torch.Tensor:
        return (found.unsqueeze(2) == truth.unsqueeze(1)).any(dim=2).double().mean(dim=1)  # Q

    same = overlap(fast_fast)
    return Agreement(
        images=int(images.shape[0]),
        queries=queries,
        mean_cosine=float(cosine.mean()),
        min_cosine=float(cosine.min()),
        top10_overlap=float(same.mean()),
        top10_overlap_mixed=float(overlap(fast_mixed).mean()),
        top10_identical=float((same == 1.0).double().mean()),
    )


def build_inference_encoder(
    record: dict[str, Any],
    calibration: torch.Tensor | None,
    tolerance: Tolerance = TOLERANCE,
    allow_bf16: bool = True,
) -> dict[str, Any]:
    """The inference record to deploy: folded fp32 with its TorchScript and ONNX forms, or bf16 with
    its TorchScript form when the CPU computes bf16 natively, the embeddings of the held-out
    `calibration` images (uint8 NxCxSxS) stay within `tolerance` and it runs faster here.
    Without calibration images (or with fewer than MIN_CALIBRATION_IMAGES) no reduced precision is
    trusted."""
    exact = Encoder(record)
    fp32 = inference_record(record, "float32")
    if calibration is not None:
        agreement = measure_agreement(exact, InferenceEncoder(fp32), calibration)
        fp32["agreement"] = {**asdict(agreement), "tolerance": asdict(tolerance)}
    candidates = [with_forms(fp32)]
    enough = calibration is not None and calibration.shape[0] >= MIN_CALIBRATION_IMAGES
    if enough and allow_bf16 and native_bf16():
        bf16 = inference_record(record, "bfloat16")
        agreement = measure_agreement(exact, InferenceEncoder(bf16), calibration)
        bf16["agreement"] = {**asdict(agreement), "tolerance": asdict(tolerance)}
        if agreement.within(tolerance):
            candidates.append(with_forms(bf16))
    return fastest_form(candidates)


def with_forms(record: dict[str, Any]) -> dict[str, Any]:
    """`record` with the stored forms of its embedding path: TorchScript (`scripted`) and, in fp32,
    ONNX (`onnx`), each added only when it exports and computes what the eager path does: a speed-up
    must never stop a publish."""
    encoder = InferenceEncoder(record)
    forms: dict[str, Any] = {}
    try:
        forms["scripted"] = script_embedding(encoder)
    except (EncoderError, RuntimeError) as exc:
        log.warning("encoder %s: no TorchScript form (%s)", record.get("version"), exc)
    if record["dtype"] == "float32" and onnx_runner.available():
        try:
            forms["onnx"] = onnx_embedding(encoder)
        except Exception as exc:  # the exporter raises its own error types, not only RuntimeError
            log.warning("encoder %s: no ONNX form (%s)", record.get("version"), exc)
    if not forms:
        log.warning("encoder %s: it is served eagerly", record.get("version"))
    return {**record, **forms}


def onnx_embedding(encoder: InferenceEncoder) -> bytes:
    """The ONNX form of `encoder`'s embedding path (exported, checked in ONNX Runtime)."""
    example = torch.zeros(
        SCRIPT_EXAMPLE_BATCH, encoder.in_channels, encoder.input_size, encoder.input_size, dtype=torch.uint8
    )
    with FX_TRACE_LOCK.read():
        model = onnx_runner.export_onnx(encoder.path(), example)
    if not form_agrees(
        encoder.path(), OnnxRunner(model), encoder.in_channels, encoder.input_size, encoder.device
    ):
        raise EncoderError("the ONNX embedding path disagrees with the eager one")
    return model


def fastest_form(candidates: list[dict[str, Any]], budget_s: float = 3.0) -> dict[str, Any]:
    """The candidate record, with `runtime` set, whose stored form embeds fastest here: each form
    that loads is timed on one thread at TIMED_BATCHES, alternating, median of the rounds that fit in
    `budget_s` (at least 3); the figures go into the record as `timings_ms`. The eager form is not
    a contender (timed alone it can win, but beside the event loop it waits for the GIL at every
    layer): it serves only where nothing was stored."""
    forms = [
        (index, runtime, InferenceEncoder({**record, "runtime": runtime}))
        for index, record in enumerate(candidates)
        for runtime in ("onnxruntime", "torchscript")
    ]
    forms = [(i, runtime, encoder) for i, runtime, encoder in forms if encoder.runtime == runtime]
    if not forms:
        return {**candidates[0], "runtime": "eager"}
    samples: dict[tuple[int, str], list[float]] = {(i, runtime): [] for i, runtime, _ in forms}
    threads = torch.get_num_threads()
    try:
        for _, _, encoder in forms:
            encoder.threads = 1
        start, rounds = time.perf_counter(), 0
        generator = torch.Generator().manual_seed(0)
        first = forms[0][2]
        batches = [
            torch.randint(
                0,
                256,
                (n, first.in_channels, first.input_size, first.input_size),
                dtype=torch.uint8,
                generator=generator,
            )
            for n in TIMED_BATCHES
        ]
        for _, _, encoder in forms:  # warm: first calls allocate and plan
            encoder.embed(batches[0])
        while rounds < 3 or (time.perf_counter() - start < budget_s and rounds < 15):
            for i, runtime, encoder in forms:
                began = time.perf_counter()
                for batch in batches:
                    encoder.embed(batch)
                samples[(i, runtime)].append((time.perf_counter() - began) * 1e3)
            rounds += 1
    finally:
        torch.set_num_threads(threads)
    medians = {key: float(np.median(values)) for key, values in samples.items()}
    best_index, best_runtime = min(medians, key=medians.__getitem__)
    timings = {
        f"{runtime} {candidates[i]['dtype']}": round(ms, 3) for (i, runtime), ms in sorted(medians.items())
    }
    return {**candidates[best_index], "runtime": best_runtime, "timings_ms": timings}


def write_inference_encoder(
    encoder_path: str | os.PathLike,
    calibration: torch.Tensor | None,
    out: str | os.PathLike | None = None,
    tolerance: Tolerance = TOLERANCE,
) -> dict[str, Any]:
    """Write the inference form next to `encoder_path` (or to `out`); returns its record."""
    record = read_encoder_record(encoder_path)
    inference = build_inference_encoder(record, calibration, tolerance)
    save_encoder(
        Path(out) if out is not None else Path(encoder_path).with_name(INFERENCE_ENCODER_FILE), inference
    )
    return inference


def stored_inference_record(encoder_path: str | os.PathLike, version: str) -> dict[str, Any] | None:
    """The inference file next to `encoder_path` when it is of the model `version`, else None."""
    sibling = Path(encoder_path).with_name(INFERENCE_ENCODER_FILE)
    if not sibling.is_file():
        return None
    data = torch.load(sibling, map_location="cpu", weights_only=False)
    if isinstance(data, dict) and data.get("format") == INFERENCE_FORMAT and data.get("version") == version:
        return data
    return None


def ensure_inference_encoder(encoder_path: str | os.PathLike) -> dict[str, Any] | None:
    """The inference file next to `encoder_path`, written now when none of the same model is there:
    fp32 with its compiled forms (no held-out images here, so no reduced precision; a refresh or
    `python -m training.inference --data ...` measures that). For a model the service bootstraps
    from, so that it serves through ONNX Runtime or TorchScript rather than the eager graph (which
    waits for the GIL at every layer beside the event loop). None when it cannot be written (a
    read-only directory): the service then folds the model at load."""
    version = read_encoder_record(encoder_path)["version"]
    stored = stored_inference_record(encoder_path, version)
    if stored is not None:
        return stored
    try:
        return write_inference_encoder(encoder_path, None)
    except OSError as exc:
        log.warning("encoder %s: no deploy form written next to it (%s); it is folded at load", version, exc)
        return None


def load_deploy_encoder(
    encoder_path: str | os.PathLike, device: str | torch.device = "cpu"
) -> InferenceEncoder:
    """What the service runs for the encoder at `encoder_path`: its inference file when one of the
    same model sits next to it, else the folded fp32 graph (exact, built here in milliseconds)."""
    record = read_encoder_record(encoder_path)
    stored = stored_inference_record(encoder_path, record["version"])
    return InferenceEncoder(stored if stored is not None else inference_record(record, "float32"), device)


def calibration_images(data_spec: str, encoder_path: str | os.PathLike, count: int = 2000) -> torch.Tensor:
    """A seeded random `count` images of a `--data` spec, prepared for the encoder."""
    from training.data.datasets import load_dataset

    record = read_encoder_record(encoder_path)
    dataset = load_dataset(data_spec, record["input_size"], subset=count, in_channels=record["in_channels"])
    return dataset.images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.inference", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("encoder", type=Path, help="an encoder file (or a training checkpoint)")
    parser.add_argument(
        "--data",
        help="held-out images to check the bf16 tolerance on (e.g. fashion-mnist:test); "
        "without it the form stays fp32 (folded, exact)",
    )
    parser.add_argument("--count", type=int, default=2000, help="calibration images (2000)")
    parser.add_argument(
        "--out", type=Path, help=f"output file (default: {INFERENCE_ENCODER_FILE} next to the encoder)"
    )
    args = parser.parse_args(argv)
    try:
        calibration = calibration_images(args.data, args.encoder, args.count) if args.data else None
        record = write_inference_encoder(args.encoder, calibration, args.out)
    except (EncoderError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    agreement = record.get("agreement") or {}
    print(
        f"{record['version']}: {record['dtype']}, {len(record['folded'])} batchnorms folded, served by "
        f"{record['runtime']} ("
        + ", ".join(f"{name} {ms} ms" for name, ms in record.get("timings_ms", {}).items())
        + ")"
        + (
            f"; mean cosine {agreement['mean_cosine']:.5f}, min {agreement['min_cosine']:.4f}, "
            f"top-10 overlap {agreement['top10_overlap']:.4f} "
            f"(vs an fp32 database {agreement['top10_overlap_mixed']:.4f})"
            if agreement
            else ""
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The trained encoder as the rest of the system sees it: a small, self-describing file and an
inference wrapper. `index/` copies the file into each index version and `service/` loads it
from there, so that a published index and the model that embeds queries for it always match.

Encoder file (`torch.save` of a dict, also the "encoder" entry of a training checkpoint):
  format        "ssl-retrieval/encoder/v1"
  method        e.g. "moco-v2"
  network       spec for `training.models.build_embedding_network` (arch, its kwargs, head, grid,
                scales, whitening)
  state_dict    weights of that network
  embed_dim     D, the embedding size
  input_size    S: images are resized (shorter side) and centre-cropped to SxS
  train_size    the training crop, only where it differs from input_size (`at_input_size`)
  in_channels   1 (greyscale) or 3 (RGB)
  mean, std     per-channel normalisation applied to [0, 1] pixels
  version       a stable string naming these weights (method, short content hash)
  metrics       what training measured (kNN accuracy, epochs, ...), for model cards and manifests
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from index.encoder_file import ENCODER_FORMAT, EncoderError, read_encoder_record
from training.data.images import load_uint8
from training.models import EmbeddingNetwork, build_embedding_network
from training.models.whitening import Whitening
from training.precision import autocast_dtype

# Reading the file is index's (the bottom layer); re-exported for training's and service's callers.
__all__ = [
    "ENCODER_FORMAT",
    "Encoder",
    "EncoderError",
    "at_input_size",
    "make_encoder_record",
    "read_encoder_record",
    "save_encoder",
    "training_size",
    "with_embedding_grid",
    "with_embedding_scales",
    "with_whitening",
]


def weights_version(
    method: str,
    state_dict: dict[str, torch.Tensor],
    grid: int = 1,
    embedding_size: int | None = None,
    scales: Sequence[float] = (1.0,),
) -> str:
    """`method-<12 hex>`: a hash of the weights (and of the embedding's pooling grid when it is not
    the global pool, of its scales when there are several, and of the input size when it is not the
    training crop: the same weights then embed differently), so equal encoders give equal versions."""
    digest = hashlib.sha256()
    if grid != 1:
        digest.update(f"grid={grid}".encode())
    if tuple(scales) != (1.0,):
        digest.update(f"scales={[float(s) for s in scales]}".encode())
    if embedding_size is not None:
        digest.update(f"input={embedding_size}".encode())
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return f"{method}-{digest.hexdigest()[:12]}"


def make_encoder_record(
    method: str,
    network_spec: dict[str, Any],
    network: nn.Module,
    embed_dim: int,
    input_size: int,
    in_channels: int,
    mean: list[float],
    std: list[float],
    metrics: dict[str, Any] | None = None,
    train_size: int | None = None,
) -> dict[str, Any]:
    """`train_size`: the training crop, where the encoder embeds at another `input_size`."""
    state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    resized = {"train_size": int(train_size)} if train_size not in (None, input_size) else {}
    return {
        "format": ENCODER_FORMAT,
        "method": method,
        "network": network_spec,
        "state_dict": state,
        "embed_dim": int(embed_dim),
        "input_size": int(input_size),
        "in_channels": int(in_channels),
        "mean": list(map(float, mean)),
        "std": list(map(float, std)),
        "version": weights_version(
            method,
            state,
            int(network_spec.get("grid", 1)),
            int(input_size) if resized else None,
            network_spec.get("scales", (1.0,)),
        ),
        "metrics": dict(metrics or {}),
        **resized,
    }


def with_embedding_grid(record: dict[str, Any], grid: int) -> dict[str, Any]:
    """The same encoder (same weights) with its retrieval embedding pooled to `grid` x `grid`
    (training.models.EmbeddingNetwork); embed_dim and version follow. A whitening fitted on the old
    pooling no longer applies and is dropped (`python -m training.whiten` fits a new one).
    ValueError if the grid cannot apply."""
    spec = {k: v for k, v in record["network"].items() if k not in ("grid", "whitening")}
    if grid != 1:
        spec["grid"] = int(grid)
    return with_network_spec(record, spec)


def with_embedding_scales(record: dict[str, Any], scales: Sequence[float]) -> dict[str, Any]:
    """The same encoder (same weights) embedding each image at these `scales` of its input size
    (a multi-scale descriptor, training.models.EmbeddingNetwork; (1.0,): one size); version follows.
    A whitening fitted on other scales no longer applies and is dropped (`with_whitening` fits a new
    one). ValueError if the scales cannot apply."""
    spec = {k: v for k, v in record["network"].items() if k not in ("scales", "whitening")}
    if tuple(scales) != (1.0,):
        spec["scales"] = [float(s) for s in scales]
    return with_network_spec(record, spec)


def with_network_spec(record: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The record's weights (without any whitening's) in the network `spec` builds; validates it."""
    network = build_embedding_network(spec)
    state = {k: v for k, v in record["state_dict"].items() if not k.startswith("whitening.")}
    network.load_state_dict(state)
    return {
        **record,
        "network": spec,
        "state_dict": state,
        "embed_dim": network.out_dim,
        "version": record_version(record, state, spec),
    }


def normaliser(mean: Sequence[float], std: Sequence[float], device: torch.device) -> Callable:
    """uint8 NxCxHxW -> float (x / 255 - mean) / std: every path from pixels into a network."""
    shape = (1, len(mean), 1, 1)
    mean_t = torch.tensor(list(mean), device=device).view(shape)
    std_t = torch.tensor(list(std), device=device).view(shape)
    return lambda images: (images.to(device, non_blocking=True).float() / 255.0 - mean_t) / std_t


def network_embedder(
    network: Callable[[torch.Tensor], torch.Tensor],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 batch -> L2-normalised float32 BxD outputs of `network` (put it in eval mode first)."""
    normalise = normaliser(mean, std, device)

    @torch.no_grad()
    def embed(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            features = network(normalise(images))
        return F.normalize(features.float(), dim=1)

    return embed


@torch.inference_mode()
def embedding_features(
    network: nn.Module,
    images: torch.Tensor,
    mean: list[float],
    std: list[float],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    batch_size: int = 512,
) -> torch.Tensor:
    """L2-normalised float32 NxD features of an `EmbeddingNetwork` before its whitening (uint8
    NxCxSxS images): what a whitening is fitted on."""
    embed = network_embedder(network.features, mean, std, device, amp_dtype)
    was_training = network.training
    network.eval()
    try:
        return torch.cat([embed(images[s : s + batch_size]).cpu() for s in range(0, len(images), batch_size)])
    finally:
        network.train(was_training)


def training_size(record: dict[str, Any]) -> int:
    """The crop the encoder was trained at (`input_size` unless it embeds at another size)."""
    return int(record.get("train_size", record["input_size"]))


def record_version(record: dict[str, Any], state: dict[str, torch.Tensor], spec: dict[str, Any]) -> str:
    size = int(record["input_size"])
    resized = size if size != training_size(record) else None
    return weights_version(
        record["method"], state, int(spec.get("grid", 1)), resized, spec.get("scales", (1.0,))
    )


def at_input_size(record: dict[str, Any], size: int) -> dict[str, Any]:
    """The same weights embedding images resized to `size` instead of the training crop. Random
    resized crops show a network objects larger than whole images do, so embedding at a larger size
    than it trained at matches what it learnt (FixRes, Touvron et al. 2019). A whitening fitted at
    the old size stays in the record: refit it (`with_whitening`, `python -m training.whiten
    --input-size`)."""
    if size < 1:
        raise ValueError(f"input size must be positive, got {size}")
    resized = {**record, "input_size": int(size), "train_size": training_size(record)}
    if size == resized["train_size"]:
        del resized["train_size"]
    return {**resized, "version": record_version(resized, resized["state_dict"], resized["network"])}


def unwhitened_network(record: dict[str, Any]) -> EmbeddingNetwork:
    """The encoder's network without any whitening it has: what a whitening is fitted on."""
    network = build_embedding_network({k: v for k, v in record["network"].items() if k != "whitening"})
    network.load_state_dict({k: v for k, v in record["state_dict"].items() if not k.startswith("whitening.")})
    return network


def with_whitening(
    record: dict[str, Any], images: torch.Tensor, power: float, amp: str = "auto"
) -> dict[str, Any]:
    """The same encoder with PCA whitening (training.models.whitening) fitted on its embeddings of
    `images` (uint8 NxCxSxS at its input size, no labels), replacing any whitening it had; embed_dim
    and version follow."""
    network = unwhitened_network(record)
    device = torch.device("cpu")
    features = embedding_features(
        network, images, record["mean"], record["std"], device, autocast_dtype(amp, device)
    )
    network.whitening = Whitening.fitted(features, power)
    spec = {k: v for k, v in record["network"].items() if k != "whitening"}
    spec["whitening"] = network.whitening.spec
    state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    return {
        **record,
        "network": spec,
        "state_dict": state,
        "embed_dim": network.out_dim,
        "version": record_version(record, state, spec),
    }


def save_encoder(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Atomic write (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    buffer = io.BytesIO()
    torch.save(record, buffer)
    with open(tmp, "wb") as f:
        f.write(buffer.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def use_threads(count: int | None) -> None:
    """Run this thread's torch operations on `count` intra-op threads (None: as they are)."""
    if count is not None and torch.get_num_threads() != count:
        torch.set_num_threads(count)


def multiply_accumulates(network: nn.Module, run: Callable[[], object]) -> int:
    """Multiply-accumulates of `network`'s convolutions and linear layers while `run()` passes
    through it: output elements x (input channels / groups) x kernel area, and output elements x
    input features."""
    total = 0

    def count(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.modules.conv._ConvNd):
            total += output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        else:
            total += output.numel() * module.in_features

    layers = (nn.modules.conv._ConvNd, nn.Linear)
    handles = [m.register_forward_hook(count) for m in network.modules() if isinstance(m, layers)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return total


class Encoder:
    """Inference wrapper: images in, L2-normalised float32 embeddings out."""

    def __init__(self, record: dict[str, Any], device: str | torch.device = "cpu", amp: str = "none") -> None:
        """`amp`: "none" (fp32, what the service uses), "bf16", or "auto" (bf16 where the device
        computes it natively, training/precision.py): the fast path of training.embed/evaluate."""
        self.record = record
        self.device = torch.device(device)
        self.amp_dtype = autocast_dtype(amp, self.device)
        self.network = build_embedding_network(record["network"])
        self.network.load_state_dict(record["state_dict"])
        self.network.to(self.device).eval()
        self.embed_dim: int = record["embed_dim"]
        self.input_size: int = record["input_size"]
        self.in_channels: int = record["in_channels"]
        self.version: str = record["version"]
        self.method: str = record["method"]
        self.metrics: dict[str, Any] = record.get("metrics", {})
        self._normalise = normaliser(record["mean"], record["std"], self.device)
        # Intra-op threads for this encoder's passes, set in the thread that runs one (OpenMP keeps a
        # count per calling thread); None leaves that thread's as it is. The service sizes it to
        # the encoder (service.engine.intra_op_threads).
        self.threads: int | None = None

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", amp: str = "none") -> Encoder:
        return cls(read_encoder_record(path), device, amp)

    @functools.cached_property
    def macs_per_image(self) -> int:
        """Multiply-accumulates of one image's pass (convolutions and linear layers, counted on a
        blank image): how much work a pass is, which decides how many threads are worth waking."""
        blank = torch.zeros(1, self.in_channels, self.input_size, self.input_size, dtype=torch.uint8)
        with torch.inference_mode():
            return multiply_accumulates(self.network, lambda: self._eager_pass(blank.to(self.device)))

    def _eager_pass(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NxCxSxS -> NxD through the network's own modules (what `macs_per_image` hooks)."""
        return self.network(self._normalise(images))

    def prepare(self, source: bytes | str | os.PathLike, max_pixels: int | None = None) -> torch.Tensor:
        """Decode one image (bytes or path) into the uint8 CxSxS tensor `embed` takes."""
        return load_uint8(source, self.in_channels, self.input_size, max_pixels)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """images: uint8 NxCxSxS (as from `prepare`). Returns float32 NxD, rows L2-normalised."""
        use_threads(self.threads)
        out = []
        for start in range(0, images.shape[0], batch_size):
            batch = self._normalise(images[start : start + batch_size])
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                features = self.network(batch)
            out.append(F.normalize(features.float(), dim=1).cpu())
        if not out:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return torch.cat(out).numpy()

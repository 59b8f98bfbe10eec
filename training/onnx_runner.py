"""The embedding path in ONNX Runtime: exported once at publish, run by the service.

A small encoder's pass is mostly per-operator overhead in torch: the demo encoder (29 MMACs per
image) takes 3-4.5 ms for one image through TorchScript on one thread, 0.7 ms in ONNX Runtime,
whose kernels (MLAS) are planned once per session (bench/RESULTS.md, "ONNX Runtime"). Its `run`
releases the GIL for the whole pass, as the TorchScript form does.

The graph is exported from the fp32 folded path (uint8 NxCxSxS -> float32 NxD, L2-normalised), with
a dynamic batch. Exporting uses torch's TorchScript-based exporter: 0.1 s against 2-5 s for the
torch.export one, which matters at every publish; both are torch's, and a torch without the old one
raises here, which the caller treats as "no ONNX form" (the TorchScript or eager form serves).
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

try:  # optional at run time: without it the TorchScript form serves
    import onnxruntime
except ImportError:  # pragma: no cover - the project installs it
    onnxruntime = None

INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
OPSET = 17


def available() -> bool:
    """Whether ONNX Runtime can be imported here."""
    return onnxruntime is not None


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """torch 2.14 warns that the TorchScript-based exporter is deprecated: used knowingly (above)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        yield


def export_onnx(path: nn.Module, example: torch.Tensor) -> bytes:
    """The ONNX model of `path` (uint8 NxCxSxS -> NxD), traced at `example`'s shape, any batch."""
    buffer = io.BytesIO()
    with quiet_exporter(), torch.inference_mode():
        torch.onnx.export(
            path.eval(),
            (example,),
            buffer,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
        )
    return buffer.getvalue()


class OnnxRunner:
    """Runs an exported embedding path; one ONNX Runtime session per intra-op thread count (the
    service sizes threads per encoder after loading it). Sessions run concurrently from many
    threads, as ONNX Runtime allows."""

    def __init__(self, model: bytes) -> None:
        if onnxruntime is None:
            raise RuntimeError("onnxruntime is not installed")
        self.model = model
        self._sessions: dict[int, onnxruntime.InferenceSession] = {}
        self._lock = threading.Lock()
        self.session(1)  # a model that does not load fails here, not at the first search

    @property
    def thread_counts(self) -> list[int]:
        """The intra-op thread counts that have a session already."""
        with self._lock:
            return sorted(self._sessions)

    def session(self, threads: int) -> onnxruntime.InferenceSession:
        with self._lock:
            if threads not in self._sessions:
                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
                options.log_severity_level = 3  # errors only: it warns about unused initialisers
                self._sessions[threads] = onnxruntime.InferenceSession(
                    self.model, options, providers=["CPUExecutionProvider"]
                )
            return self._sessions[threads]

    def __call__(self, images: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        """images: uint8 NxCxSxS (CPU) -> float32 NxD."""
        session = self.session(threads if threads is not None else torch.get_num_threads())
        pixels = np.ascontiguousarray(images.numpy())
        (embeddings,) = session.run([OUTPUT_NAME], {INPUT_NAME: pixels})
        return torch.from_numpy(embeddings)

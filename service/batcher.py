"""A micro-batcher for embeddings: concurrent requests share one forward pass.

Requests queue while a batch is running; when it finishes, everything queued (up to `max_batch`)
goes as the next batch. A lone request therefore starts at once (no added latency at
concurrency 1) and under load batches form by themselves, without a fixed waiting window.
An optional `max_wait_s` holds a batch open a little longer to collect more requests.

`max_in_flight` batches may run at once, each on its own executor thread: the engine sets it to
the thread pool's size when a forward pass runs on one intra-op thread (a small encoder,
`service.engine.intra_op_threads`), so that under load every core computes a batch of its own,
and to 1 when one pass already spreads over the cores.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
import torch

from training.encoder import Encoder


@dataclass
class _Request:
    encoder: Encoder
    images: torch.Tensor  # uint8 NxCxSxS
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class EmbeddingBatcher:
    def __init__(
        self, executor: Executor, max_batch: int = 64, max_wait_s: float = 0.0, max_in_flight: int = 1
    ) -> None:
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_in_flight = max_in_flight
        self._queue: list[_Request] = []
        self._workers: set[asyncio.Task] = set()  # each runs one batch at a time until the queue is empty
        self.batches_run = 0  # for tests and metrics: how many forward passes served the requests

    async def embed(self, encoder: Encoder, images: torch.Tensor) -> np.ndarray:
        """float32 NxD embeddings of uint8 NxCxSxS images, computed off the event loop."""
        request = _Request(encoder, images)
        self._queue.append(request)
        # done(), not a done-callback: a worker that has just returned is done at once, while its
        # callbacks wait for the loop's next turn (a request then would find no live worker).
        self._workers = {worker for worker in self._workers if not worker.done()}
        if len(self._workers) < self.max_in_flight:
            self._workers.add(asyncio.create_task(self._drain()))
        return await request.future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            if self.max_wait_s > 0 and len(self._queue) < self.max_batch:
                await asyncio.sleep(self.max_wait_s)
            batch = self._take_batch()
            encoder = batch[0].encoder
            sizes = [r.images.shape[0] for r in batch]
            try:
                vectors = await loop.run_in_executor(self.executor, _embed_all, encoder, batch)
            except Exception as exc:  # hand the error to every waiting request
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            self.batches_run += 1
            start = 0
            for request, size in zip(batch, sizes, strict=True):
                if not request.future.done():
                    request.future.set_result(vectors[start : start + size])
                start += size

    def _take_batch(self) -> list[_Request]:
        """Requests for the same encoder (a swap may leave two in the queue), up to max_batch images."""
        encoder = self._queue[0].encoder
        batch, rest, count = [], [], 0
        for request in self._queue:
            if request.encoder is encoder and (
                not batch or count + request.images.shape[0] <= self.max_batch
            ):
                batch.append(request)
                count += request.images.shape[0]
            else:
                rest.append(request)
        self._queue = rest
        return batch


def _embed_all(encoder: Encoder, batch: list[_Request]) -> np.ndarray:
    images = torch.cat([r.images for r in batch]) if len(batch) > 1 else batch[0].images
    return encoder.embed(images)

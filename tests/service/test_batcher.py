"""The micro-batcher: concurrent embeddings share forward passes and get exactly their own rows."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from service.batcher import EmbeddingBatcher
from training.encoder import Encoder


def test_concurrent_requests_share_batches_and_get_their_own_rows(encoder_file) -> None:
    encoder = Encoder.load(encoder_file)
    images = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8)
    expected = encoder.embed(images)  # 12xD, one forward pass

    async def run() -> tuple[list[np.ndarray], int]:
        with ThreadPoolExecutor(2) as pool:
            batcher = EmbeddingBatcher(pool, max_batch=64)
            # 1 + 2 + 3 + ... images per request, all submitted at once.
            sizes, start, requests = [1, 2, 3, 6], 0, []
            for size in sizes:
                requests.append(batcher.embed(encoder, images[start : start + size]))
                start += size
            return await asyncio.gather(*requests), batcher.batches_run

    results, batches = asyncio.run(run())
    assert [r.shape[0] for r in results] == [1, 2, 3, 6]
    np.testing.assert_allclose(np.concatenate(results), expected, atol=1e-5)
    assert batches < 4  # the first request ran alone, the rest queued behind it and went together


def test_max_batch_splits_and_errors_reach_every_waiter(encoder_file) -> None:
    encoder = Encoder.load(encoder_file)

    async def run() -> tuple[int, list]:
        with ThreadPoolExecutor(1) as pool:
            batcher = EmbeddingBatcher(pool, max_batch=4)
            good = [batcher.embed(encoder, torch.zeros(3, 1, 28, 28, dtype=torch.uint8)) for _ in range(4)]
            await asyncio.gather(*good)
            bad = [batcher.embed(encoder, torch.zeros(1, 2, 28, 28, dtype=torch.uint8)) for _ in range(3)]
            outcomes = await asyncio.gather(*bad, return_exceptions=True)
            return batcher.batches_run, outcomes

    batches, outcomes = asyncio.run(run())
    assert batches == 4  # 3 + 3 > 4: every request of 3 images needs its own pass
    assert all(isinstance(o, RuntimeError) for o in outcomes)  # wrong channel count, reported to all

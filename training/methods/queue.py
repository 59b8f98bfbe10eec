"""A FIFO queue of embeddings in registered buffers (MoCo's negatives, NNCLR's support set)."""

from __future__ import annotations

import torch

from training.distributed import concat_all_gather


@torch.no_grad()
def enqueue(queue: torch.Tensor, queue_ptr: torch.Tensor, rows: torch.Tensor) -> None:
    """Write every rank's `rows` (rank order) over the oldest entries of `queue` (KxC), wrapping
    around K; `queue_ptr` (a 1-element int64 buffer) is where the next row goes."""
    rows = concat_all_gather(rows)  # (N*world)xC
    size, total = queue.shape[0], rows.shape[0]
    skipped = max(0, total - size)  # more rows than slots: only the newest K survive
    ptr = int(queue_ptr)
    positions = (ptr + skipped + torch.arange(total - skipped, device=rows.device)) % size
    queue.index_copy_(0, positions, rows[skipped:].to(queue.dtype))
    queue_ptr[0] = (ptr + total) % size

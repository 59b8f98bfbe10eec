"""InfoNCE as MoCo computes it: plain cross-entropy over logits whose positive is a known column.

v1/v2 (queue):   logits = [q·k+, q·queue] / tau, the positive is column 0.
v3 (in-batch):   logits = q·k_all / tau over the keys of every rank, the positive of row i is
                 key N*rank + i; the loss is scaled by 2*tau (MoCo v3, makes it less tau-sensitive).
q, k and the queue rows are L2-normalised by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.losses.result import ContrastiveResult


def queue_infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> ContrastiveResult:
    """q, k: NxC; queue: KxC negatives (MoCo v1/v2)."""
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # Nx1
    l_neg = torch.einsum("nc,kc->nk", q, queue)  # NxK
    logits = torch.cat([l_pos, l_neg], dim=1).float() / tau  # Nx(1+K)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return ContrastiveResult(F.cross_entropy(logits, labels), logits, labels)


def in_batch_infonce(q: torch.Tensor, k_all: torch.Tensor, tau: float, rank: int = 0) -> ContrastiveResult:
    """q: NxC local queries; k_all: (N*world)xC keys of all ranks in rank order (MoCo v3 `ctr`)."""
    logits = torch.einsum("nc,mc->nm", q, k_all).float() / tau  # Nx(N*world)
    n = logits.shape[0]
    labels = torch.arange(n, dtype=torch.long, device=logits.device) + n * rank
    return ContrastiveResult(F.cross_entropy(logits, labels) * (2 * tau), logits, labels)

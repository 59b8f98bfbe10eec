"""SimCLR's NT-Xent: for each of the 2N views, a softmax over the other 2N-1 views (self-similarity
masked out) whose positive is the other view of the same image; averaged over all 2N anchors.

With `gather=True` under torch.distributed the candidates are the views of every rank
(all-gathered with gradient), so each rank's anchors see 2*N*world - 1 others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from training.distributed import all_gather_with_grad, get_rank, get_world_size
from training.losses.result import ContrastiveResult

PairLoss = Callable[[torch.Tensor, torch.Tensor, float, bool], ContrastiveResult]


def pair_logits(
    z1: torch.Tensor, z2: torch.Tensor, tau: float, gather: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent's scores: 2Nx2NW cosine / tau of each view against every view (self masked to -inf)
    and the 2N positions of the positives. z1, z2: NxC projections of the two views."""
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    n = z1.shape[0]
    world, rank = (get_world_size(), get_rank()) if gather else (1, 0)
    z1_all = all_gather_with_grad(z1) if world > 1 else z1  # (N*world)xC
    z2_all = all_gather_with_grad(z2) if world > 1 else z2
    anchors = torch.cat([z1, z2], dim=0)  # 2NxC
    candidates = torch.cat([z1_all, z2_all], dim=0)  # 2NWxC: [all first views, all second views]
    logits = (anchors @ candidates.T).float() / tau  # 2Nx2NW
    total = n * world
    local = torch.arange(n, device=logits.device) + n * rank  # my images' positions among total
    self_index = torch.cat([local, local + total])
    labels = torch.cat([local + total, local])  # view 1 <-> view 2 of the same image
    rows = torch.arange(2 * n, device=logits.device)
    logits = logits.index_put((rows, self_index), torch.tensor(float("-inf"), device=logits.device))
    return logits, labels


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.5, gather: bool = True) -> ContrastiveResult:
    """z1, z2: NxC projections of the two views (normalised here: cosine similarity)."""
    logits, labels = pair_logits(z1, z2, tau, gather)
    return ContrastiveResult(F.cross_entropy(logits, labels), logits, labels)


def multi_crop_nt_xent(
    full: Sequence[torch.Tensor],
    local: Sequence[torch.Tensor],
    tau: float = 0.5,
    gather: bool = True,
    pair_loss: PairLoss = nt_xent,
) -> ContrastiveResult:
    """NT-Xent averaged over the positive pairs of multi-crop (SwAV, Caron et al. 2020): every pair
    of full-size views, and every local view with every full-size view (local views are never
    each other's positives). Each pair is `pair_loss` over its own 2N views, as CMC's full graph.

    full: two or more NxC projections of the full-size views; local: NxC projections of the local
    ones. With two full views and no local ones this is `pair_loss(full[0], full[1])` (`nt_xent`, or
    another loss over the same pair, e.g. `training.losses.debiased`). The result's
    logits and labels are the full pair's (its instance accuracy is the paper's).
    """
    if len(full) < 2:
        raise ValueError(f"multi-crop needs at least two full-size views, got {len(full)}")
    pairs = [(a, b) for i, a in enumerate(full) for b in full[i + 1 :]]
    pairs += [(f, v) for v in local for f in full]
    results = [pair_loss(a, b, tau, gather) for a, b in pairs]
    loss = torch.stack([result.loss for result in results]).mean()
    return ContrastiveResult(loss, results[0].logits, results[0].labels)

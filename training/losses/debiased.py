"""Debiased (Chuang et al. 2020) and hard-negative (Robinson et al. 2021) NT-Xent.

NT-Xent treats every other view of the batch as a negative, but about tau+ of them (1/C for C
balanced classes) show an image of the anchor's own class. DCL estimates the sum over true negatives
by taking tau+ positives' worth out of the negatives' sum:

    Ng = max((S - tau+ * M * exp(s+ / tau)) / (1 - tau+), M * exp(-1 / tau))
    loss = -log(exp(s+ / tau) / (exp(s+ / tau) + Ng))

with M = 2NW - 2 negatives of the anchor and S their sum of exp(s / tau). HCL (beta > 0) replaces
S by M times the mean of exp(s / tau) under weights proportional to exp(beta * s / tau), so the
negatives nearest the anchor count more. tau+ = 0, beta = 0 is NT-Xent.
"""

from __future__ import annotations

import math

import torch

from training.losses.ntxent import pair_logits
from training.losses.result import ContrastiveResult


def debiased_nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    tau: float = 0.5,
    gather: bool = True,
    tau_plus: float = 0.1,
    beta: float = 0.0,
) -> ContrastiveResult:
    """z1, z2: NxC projections of the two views. tau_plus in [0, 1): the class prior; beta >= 0:
    the hardness concentration."""
    if not 0 <= tau_plus < 1 or beta < 0:
        raise ValueError(f"need 0 <= tau_plus < 1 and beta >= 0, got {tau_plus} and {beta}")
    logits, labels = pair_logits(z1, z2, tau, gather)  # 2Nx2NW, self at -inf
    rows = torch.arange(len(logits), device=logits.device)
    positive = logits[rows, labels]  # 2N
    negatives = logits.index_put((rows, labels), torch.tensor(float("-inf"), device=logits.device))
    count = logits.shape[1] - 2  # M: every view but the anchor and its positive
    if beta > 0:  # log(M * sum(w * e^s) / sum(w)), w = e^(beta s)
        log_sum = (
            math.log(count)
            + torch.logsumexp((1 + beta) * negatives, dim=1)
            - torch.logsumexp(beta * negatives, dim=1)
        )
    else:
        log_sum = torch.logsumexp(negatives, dim=1)  # 2N: log S
    # the rest in units of e^shift, so nothing overflows at small tau
    shift = torch.maximum(positive, log_sum).detach()
    positive_exp, sum_exp = torch.exp(positive - shift), torch.exp(log_sum - shift)
    floor = count * torch.exp(-1 / tau - shift)
    estimate = torch.maximum((sum_exp - tau_plus * count * positive_exp) / (1 - tau_plus), floor)
    loss = (torch.log(positive_exp + estimate) + shift - positive).mean()
    return ContrastiveResult(loss, logits, labels)

"""InstDisc's losses over a memory bank of N instance features (Wu et al. 2018, lemniscate.pytorch).

Non-parametric softmax: P(i|v) = exp(v_i·v/tau) / Z,  Z = sum_j exp(v_j·v/tau).

NCE (the approximation for large N): noise is uniform, P_n = 1/N, with m noise samples per
datum, and  h(i, v) = P(i|v) / (P(i|v) + m P_n).  The loss per sample is
    -log h(i, v_i) - sum_{j in m noise} log(1 - h(j, v_j)),
Z estimated once by Monte Carlo, Z ~= N * mean(exp(v_j·v/tau)) over the first batch's samples, then
kept fixed (as in lemniscate's NCEAverage).

Proximal regularisation (paper Sec. 3.4): + lambda * ||v_i^t - v_i^{t-1}||^2 on the positives, where
v_i^t is this step's feature and v_i^{t-1} the memory entry from the previous visit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.losses.result import ContrastiveResult

EPS = 1e-7  # lemniscate's guard against log(0)


def sample_noise_indices(
    batch: int, m: int, bank_size: int, positives: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Bx(1+m) int64: column 0 the positive, then m indices drawn uniformly from the bank."""
    device = generator.device if generator is not None else positives.device
    noise = torch.randint(0, bank_size, (batch, m), generator=generator, device=device).to(positives.device)
    return torch.cat([positives.view(-1, 1), noise], dim=1)


def estimate_normaliser(scores: torch.Tensor, tau: float, bank_size: int) -> torch.Tensor:
    """Monte Carlo Z = N * mean(exp(s/tau)) over sampled dot products s (any shape)."""
    return torch.exp(scores.detach().float() / tau).mean() * bank_size


def model_probabilities(scores: torch.Tensor, tau: float, normaliser: torch.Tensor | float) -> torch.Tensor:
    """P(j|v) = exp(s_j/tau) / Z for every score (any shape); Z is not re-normalised per row."""
    return torch.exp(scores.float() / tau) / normaliser


def noise_push_weight(
    scores: torch.Tensor, tau: float, normaliser: torch.Tensor | float, bank_size: int
) -> torch.Tensor:
    """B: sum over the m noise samples of h(j, v), the weight (in units of 1/tau) with which NCE
    pushes v away from them; the pull towards the positive weighs 1 - h(i, v) <= 1."""
    p = model_probabilities(scores[:, 1:], tau, normaliser)
    noise_mass = (scores.shape[1] - 1) / bank_size
    return (p / (p + noise_mass)).sum(dim=1)


def nce_loss(
    scores: torch.Tensor, tau: float, normaliser: torch.Tensor | float, bank_size: int
) -> ContrastiveResult:
    """scores: Bx(1+m) dot products v_j·v with the positive in column 0."""
    m = scores.shape[1] - 1
    p = model_probabilities(scores, tau, normaliser)  # Bx(1+m), P(j|v)
    noise_mass = m / bank_size  # m * P_n
    log_h_pos = torch.log(p[:, 0] / (p[:, 0] + noise_mass + EPS))  # B
    log_one_minus_h_neg = torch.log(noise_mass / (p[:, 1:] + noise_mass + EPS))  # Bxm
    loss = -(log_h_pos.sum() + log_one_minus_h_neg.sum()) / scores.shape[0]
    labels = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return ContrastiveResult(loss, scores.detach() / tau, labels)


def full_softmax_loss(
    features: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor, tau: float
) -> ContrastiveResult:
    """The exact non-parametric softmax over all N bank entries (small N). features: BxD, bank: NxD."""
    logits = (features @ bank.T).float() / tau  # BxN
    return ContrastiveResult(F.cross_entropy(logits, indices), logits, indices)


def proximal_term(
    features: torch.Tensor, previous: torch.Tensor, weight: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """lambda * (1/B) sum_b ||v_b^t - v_b^{t-1}||^2 (previous: the bank's entries, no gradient).

    mask (B bool) keeps only samples that have a previous feature; the others contribute 0.
    """
    squared = (features - previous.detach()).pow(2).sum(dim=1)  # B
    if mask is not None:
        squared = squared * mask.to(squared.dtype)
    return weight * squared.mean()

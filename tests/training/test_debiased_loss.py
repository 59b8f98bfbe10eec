"""Debiased (Chuang et al. 2020) and hard-negative (Robinson et al. 2021) NT-Xent against their
formulas written out anchor by anchor."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses.debiased import debiased_nt_xent
from training.losses.ntxent import multi_crop_nt_xent, nt_xent


def views(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def by_hand(z1: torch.Tensor, z2: torch.Tensor, tau: float, tau_plus: float, beta: float) -> float:
    """The papers' estimator: Ng = max((M * sum(w e^s) / sum(w) - tau+ M e^s+) / (1 - tau+), M e^(-1/tau)),
    w = e^(beta s); loss = -log(e^s+ / (e^s+ + Ng)), s = cosine / tau, averaged over the 2N anchors."""
    n = len(z1)
    rows = [F.normalize(v, dim=0) for v in list(z1) + list(z2)]
    total = 0.0
    for a in range(2 * n):
        positive = (a + n) % (2 * n)
        s_pos = float(rows[a] @ rows[positive]) / tau
        s_neg = [float(rows[a] @ rows[k]) / tau for k in range(2 * n) if k not in (a, positive)]
        m = len(s_neg)
        weights = [math.exp(beta * s) for s in s_neg]
        reweighted = m * sum(w * math.exp(s) for w, s in zip(weights, s_neg, strict=True)) / sum(weights)
        ng = max((reweighted - tau_plus * m * math.exp(s_pos)) / (1 - tau_plus), m * math.exp(-1 / tau))
        total += -math.log(math.exp(s_pos) / (math.exp(s_pos) + ng))
    return total / (2 * n)


@pytest.mark.parametrize(("tau", "tau_plus", "beta"), [(0.5, 0.1, 0.0), (0.2, 0.1, 1.0), (0.2, 0.0, 0.5)])
def test_debiased_nt_xent_matches_the_formula(tau, tau_plus, beta):
    z1, z2 = views(5, 8, seed=1) * 3.0, views(5, 8, seed=2)
    result = debiased_nt_xent(z1, z2, tau, tau_plus=tau_plus, beta=beta)
    assert result.loss.item() == pytest.approx(by_hand(z1, z2, tau, tau_plus, beta), rel=1e-6)


def test_the_floor_holds_where_the_correction_would_go_negative():
    # identical views: every positive is the largest score, so tau+ M e^s+ exceeds the negatives' sum
    z = views(4, 6, seed=3)
    result = debiased_nt_xent(z, z.clone(), 0.5, tau_plus=0.5)
    count = 2 * 4 - 2
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + count * math.exp(-2.0)))  # s+ = 1/tau
    assert result.loss.item() == pytest.approx(expected, abs=1e-6)  # float32 scores
    assert result.loss.item() == pytest.approx(by_hand(z, z.clone(), 0.5, 0.5, 0.0), abs=1e-6)


def test_no_correction_is_nt_xent_and_small_tau_stays_finite():
    z1, z2 = views(6, 8, seed=4), views(6, 8, seed=5)
    plain = nt_xent(z1, z2, 0.2).loss.item()
    assert debiased_nt_xent(z1, z2, 0.2, tau_plus=0.0).loss.item() == pytest.approx(plain, rel=1e-6)
    # at tau 0.005 e^(s/tau) overflows float32; the loss is computed relative to the row's largest term
    small = debiased_nt_xent(z1.float(), z2.float(), 0.005, tau_plus=0.1, beta=1.0).loss
    assert torch.isfinite(small)


def test_gradient_reaches_both_views_and_multi_crop_takes_the_loss():
    z1, z2 = views(4, 6, seed=6).requires_grad_(), views(4, 6, seed=7).requires_grad_()
    debiased_nt_xent(z1, z2, 0.2, tau_plus=0.1, beta=1.0).loss.backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
    g1, g2, local = views(3, 5, seed=8), views(3, 5, seed=9), views(3, 5, seed=10)

    def loss(a, b, tau, gather):
        return debiased_nt_xent(a, b, tau, gather, tau_plus=0.1)

    expected = sum(by_hand(a, b, 0.2, 0.1, 0.0) for a, b in [(g1, g2), (g1, local), (g2, local)]) / 3
    assert multi_crop_nt_xent([g1, g2], [local], 0.2, pair_loss=loss).loss.item() == pytest.approx(expected)


def test_bad_settings_are_refused():
    z = views(2, 4, seed=11)
    with pytest.raises(ValueError, match="tau_plus"):
        debiased_nt_xent(z, z, 0.5, tau_plus=1.0)
    with pytest.raises(ValueError, match="beta"):
        debiased_nt_xent(z, z, 0.5, beta=-1.0)

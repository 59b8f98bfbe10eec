"""Each loss against the paper's formula written out with explicit loops on small fixed tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses.infonce import in_batch_infonce, queue_infonce
from training.losses.nce import (
    estimate_normaliser,
    full_softmax_loss,
    nce_loss,
    noise_push_weight,
    proximal_term,
    sample_noise_indices,
)
from training.losses.ntxent import multi_crop_nt_xent, nt_xent


def unit(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(sum(x * y for x, y in zip(a.tolist(), b.tolist(), strict=True)))


def test_queue_infonce_matches_formula():
    q, k, queue, tau = unit(4, 8, seed=1), unit(4, 8, seed=2), unit(6, 8, seed=3), 0.07
    result = queue_infonce(q, k, queue, tau)
    expected = 0.0
    for i in range(4):
        positive = math.exp(dot(q[i], k[i]) / tau)
        negatives = sum(math.exp(dot(q[i], queue[j]) / tau) for j in range(6))
        expected += -math.log(positive / (positive + negatives)) / 4  # L_q = -log exp(q.k+/t) / sum
    assert result.loss.item() == pytest.approx(expected, rel=1e-6)
    assert result.logits.shape == (4, 7) and torch.equal(result.labels, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("rank", [0, 1])
def test_in_batch_infonce_matches_formula_with_rank_offset(rank):
    q, k_all, tau = unit(3, 5, seed=4), unit(6, 5, seed=5), 0.2  # world 2, N 3
    result = in_batch_infonce(q, k_all, tau, rank)
    expected = 0.0
    for i in range(3):
        positive = 3 * rank + i
        denominator = sum(math.exp(dot(q[i], k_all[j]) / tau) for j in range(6))
        expected += -math.log(math.exp(dot(q[i], k_all[positive]) / tau) / denominator) / 3
    assert result.loss.item() == pytest.approx(2 * tau * expected, rel=1e-6)
    assert result.labels.tolist() == [3 * rank + i for i in range(3)]


def test_nt_xent_matches_formula():
    n, tau = 4, 0.5
    z1, z2 = unit(n, 6, seed=6) * 3.0, unit(n, 6, seed=7) * 0.5  # un-normalised input is normalised
    result = nt_xent(z1, z2, tau)
    views = [F.normalize(v, dim=0) for v in list(z1) + list(z2)]  # 2N views, positive of a is (a+N) % 2N
    expected = 0.0
    for a in range(2 * n):
        positive = (a + n) % (2 * n)
        denominator = sum(math.exp(dot(views[a], views[k]) / tau) for k in range(2 * n) if k != a)
        expected += -math.log(math.exp(dot(views[a], views[positive]) / tau) / denominator)
    assert result.loss.item() == pytest.approx(expected / (2 * n), rel=1e-6)
    assert result.logits.shape == (2 * n, 2 * n)
    assert torch.isinf(result.logits.diagonal()).all()


def pair_nt_xent_by_hand(a: torch.Tensor, b: torch.Tensor, tau: float) -> float:
    """NT-Xent of one pair of views written out: 2N anchors, the other 2N-1 views as candidates."""
    n = a.shape[0]
    views = [F.normalize(v, dim=0) for v in list(a) + list(b)]
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        denominator = sum(math.exp(dot(views[i], views[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(dot(views[i], views[positive]) / tau) / denominator)
    return total / (2 * n)


def test_multi_crop_nt_xent_averages_the_full_and_full_local_pairs():
    n, tau = 3, 0.2
    g1, g2 = unit(n, 5, seed=1), unit(n, 5, seed=2)
    locals_ = [unit(n, 5, seed=3) * 2.0, unit(n, 5, seed=4)]
    result = multi_crop_nt_xent([g1, g2], locals_, tau)
    # pairs: (g1, g2), then each local with each full view; never local with local
    pairs = [(g1, g2)] + [(g, v) for v in locals_ for g in (g1, g2)]
    expected = sum(pair_nt_xent_by_hand(a, b, tau) for a, b in pairs) / len(pairs)
    assert result.loss.item() == pytest.approx(expected, rel=1e-6)
    local_pair = sum(pair_nt_xent_by_hand(a, b, tau) for a, b in pairs[:1] + [(locals_[0], locals_[1])])
    assert result.loss.item() != pytest.approx(local_pair / 2, rel=1e-3)  # local-local is not a pair
    torch.testing.assert_close(result.logits, nt_xent(g1, g2, tau).logits)  # accuracy: the full pair's


def test_multi_crop_nt_xent_without_local_views_is_nt_xent():
    g1, g2 = unit(4, 6, seed=8), unit(4, 6, seed=9)
    expected = nt_xent(g1, g2, 0.5).loss.item()
    assert multi_crop_nt_xent([g1, g2], [], 0.5).loss.item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least two full-size views"):
        multi_crop_nt_xent([g1], [g2], 0.5)


def test_nt_xent_gradient_flows_to_both_views():
    z1, z2 = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    nt_xent(z1, z2, 0.5).loss.backward()
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def test_nce_loss_matches_formula():
    bank_size, m, tau, z = 50, 5, 0.07, 12.5
    scores = torch.tensor(
        [[0.9, 0.1, -0.2, 0.3, 0.0, 0.5], [0.4, 0.4, -0.9, 0.2, 0.7, -0.1]], dtype=torch.float64
    )
    result = nce_loss(scores, tau, z, bank_size)
    p_n = 1.0 / bank_size
    expected = 0.0
    for row in scores.tolist():
        probabilities = [math.exp(s / tau) / z for s in row]
        h = [p / (p + m * p_n) for p in probabilities]  # h(i, v) = P(i|v) / (P(i|v) + m P_n)
        expected += -(math.log(h[0]) + sum(math.log(1 - hj) for hj in h[1:]))
    assert result.loss.item() == pytest.approx(expected / 2, rel=1e-5)


def test_noise_push_weight_is_the_sum_of_noise_posteriors():
    bank_size, tau, z = 50, 0.07, 12.5
    scores = torch.tensor([[0.9, 0.1, -0.2, 0.8], [0.4, 0.95, -0.9, 0.2]], dtype=torch.float64)
    m = scores.shape[1] - 1
    expected = []
    for row in scores.tolist():
        probabilities = [math.exp(s / tau) / z for s in row[1:]]
        expected.append(sum(p / (p + m / bank_size) for p in probabilities))
    torch.testing.assert_close(
        noise_push_weight(scores, tau, z, bank_size).double(), torch.tensor(expected, dtype=torch.float64)
    )
    # near-duplicates (s = 0.8, 0.95) each push with weight ~1: more than the positive's pull can be
    assert (noise_push_weight(scores, tau, z, bank_size) > 1).all()


def test_normaliser_is_monte_carlo_estimate():
    scores = torch.tensor([[0.1, 0.2], [0.3, -0.4]])
    expected = 100 * sum(math.exp(s / 0.07) for s in [0.1, 0.2, 0.3, -0.4]) / 4
    assert estimate_normaliser(scores, 0.07, 100).item() == pytest.approx(expected, rel=1e-5)


def test_noise_indices_positive_first_and_in_range():
    positives = torch.tensor([3, 7, 1])
    generator = torch.Generator().manual_seed(0)
    indices = sample_noise_indices(3, 1000, 10, positives, generator)
    assert indices.shape == (3, 1001) and torch.equal(indices[:, 0], positives)
    assert indices[:, 1:].min() >= 0 and indices[:, 1:].max() <= 9
    assert torch.bincount(indices[:, 1:].flatten(), minlength=10).min() > 200  # ~300 each: uniform


def test_full_softmax_matches_formula():
    features, bank, tau = unit(3, 4, seed=8), unit(7, 4, seed=9), 0.07
    indices = torch.tensor([2, 0, 6])
    result = full_softmax_loss(features, bank, indices, tau)
    expected = 0.0
    for b in range(3):
        denominator = sum(math.exp(dot(features[b], bank[j]) / tau) for j in range(7))
        expected += -math.log(math.exp(dot(features[b], bank[indices[b]]) / tau) / denominator) / 3
    assert result.loss.item() == pytest.approx(expected, rel=1e-6)


def test_proximal_term_matches_formula():
    current, previous = unit(3, 4, seed=10), unit(3, 4, seed=11)
    expected = sum(
        sum((a - b) ** 2 for a, b in zip(c.tolist(), p.tolist(), strict=True))
        for c, p in zip(current, previous, strict=True)
    )
    assert proximal_term(current, previous, 50.0).item() == pytest.approx(50.0 * expected / 3, rel=1e-6)


def test_proximal_term_mask_drops_unvisited_samples():
    current, previous = unit(3, 4, seed=12), unit(3, 4, seed=13)
    mask = torch.tensor([True, False, True])
    full = [float(((c - p) ** 2).sum()) for c, p in zip(current, previous, strict=True)]
    expected = 2.0 * (full[0] + full[2]) / 3
    assert proximal_term(current, previous, 2.0, mask).item() == pytest.approx(expected, rel=1e-6)

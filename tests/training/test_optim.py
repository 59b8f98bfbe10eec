"""LARS and adaptive gradient clipping against their formulas, written out per element."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from training.optim.agc import adaptive_gradient_clip_, unitwise_norm
from training.optim.lars import LARS


def norm(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


def test_lars_two_steps_match_formula():
    w0, g = [3.0, -4.0], [0.5, 1.0]  # ||w|| = 5
    weight = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    bias = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    lr, mu, wd, eta = 0.5, 0.9, 0.1, 0.001
    optimiser = LARS(
        [{"params": [weight]}, {"params": [bias], "exclude_from_wd_and_lars": True, "weight_decay": 0.0}],
        lr=lr,
        momentum=mu,
        weight_decay=wd,
        eta=eta,
    )
    w, v, b, vb = list(w0), [0.0, 0.0], 1.0, 0.0
    for _ in range(2):
        weight.grad = torch.tensor(g, dtype=torch.float64)
        bias.grad = torch.tensor([2.0], dtype=torch.float64)
        optimiser.step()
        decayed = [gi + wd * wi for gi, wi in zip(g, w, strict=True)]
        trust = eta * norm(w) / norm(decayed)
        v = [mu * vi + lr * trust * di for vi, di in zip(v, decayed, strict=True)]
        w = [wi - vi for wi, vi in zip(w, v, strict=True)]
        vb = mu * vb + lr * 2.0  # excluded: plain momentum SGD, no decay, no trust ratio
        b -= vb
    assert weight.tolist() == pytest.approx(w, rel=1e-12)
    assert bias.item() == pytest.approx(b, rel=1e-12)


def test_lars_trust_ratio_is_one_for_zero_weights():
    weight = nn.Parameter(torch.zeros(3))
    weight.grad = torch.ones(3)
    LARS([weight], lr=0.1, momentum=0.0).step()
    torch.testing.assert_close(weight.detach(), torch.full((3,), -0.1))


def test_agc_clips_per_unit_with_formula_and_skips_named_layers():
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0], [1e-5, 0.0]]))  # unit norms 5 and ~0 (-> eps)
        layer.bias.copy_(torch.tensor([1.0, 0.0]))
    layer.weight.grad = torch.tensor([[0.3, 0.4], [0.0, 0.001]])  # norms 0.5 (clipped), 0.001
    layer.bias.grad = torch.tensor([0.001, 0.0])  # whole-tensor unit, below 0.01 * 1
    adaptive_gradient_clip_(layer, clip=0.01)
    # unit 0: max 0.05 < 0.5 -> scaled to norm 0.05; unit 1: max 0.01 * 1e-3 = 1e-5 < 0.001
    torch.testing.assert_close(layer.weight.grad[0], torch.tensor([0.03, 0.04]))
    torch.testing.assert_close(layer.weight.grad[1], torch.tensor([0.0, 1e-5]))
    torch.testing.assert_close(layer.bias.grad, torch.tensor([0.001, 0.0]))

    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    for param in model.parameters():
        param.grad = torch.full_like(param, 100.0)
    adaptive_gradient_clip_(model, skip=["2.weight", "2.bias"])
    assert torch.equal(model[2].weight.grad, torch.full((1, 2), 100.0))
    assert (unitwise_norm(model[0].weight.grad) <= 0.01 * unitwise_norm(model[0].weight) + 1e-6).all()


def test_unitwise_norm_of_a_conv_is_per_filter():
    weight = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    norms = unitwise_norm(weight)
    assert norms.shape == (2, 1, 1, 1)
    assert norms[1].item() == pytest.approx(norm(weight[1].flatten().tolist()), rel=1e-6)

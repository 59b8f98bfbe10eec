"""The weighted kNN classifier (Wu et al. 2018) equals a direct numpy-loop computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from index.knn import KNNClassifier
from index.vote import DEFAULT_K, DEFAULT_TAU


def direct_knn(base: np.ndarray, labels: np.ndarray, query: np.ndarray, k: int, tau: float, classes: int):
    """Loop version of the paper: cosine similarities, top-k, w_c = sum exp(s_i / tau) 1(c_i = c)."""
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    sims = [float(unit(query) @ unit(b)) for b in base]
    order = sorted(range(len(base)), key=lambda i: -sims[i])[:k]
    weights = [0.0] * classes
    for i in order:
        if labels[i] >= 0:
            weights[labels[i]] += math.exp(sims[i] / tau)
    total = sum(weights)
    return [w / total for w in weights] if total else weights


@pytest.mark.parametrize(("k", "tau"), [(5, 0.07), (12, 0.5), (40, 1.0)])
def test_predict_equals_direct_computation(k, tau):
    rng = np.random.default_rng(k)
    base = rng.standard_normal((40, 6)).astype(np.float32)
    labels = rng.integers(0, 4, 40)
    labels[::7] = -1  # unlabelled neighbours are ignored
    queries = rng.standard_normal((9, 6)).astype(np.float32)
    classifier = KNNClassifier.from_vectors(base, labels, k=k, tau=tau, num_classes=4)
    probs = classifier.predict(queries)
    expected = np.array([direct_knn(base, labels, q, k, tau, 4) for q in queries])
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_defaults_are_the_papers():
    classifier = KNNClassifier.from_vectors(np.eye(3, dtype=np.float32), np.array([0, 1, 2]))
    assert (classifier.k, classifier.tau) == (DEFAULT_K, DEFAULT_TAU) == (200, 0.07)


def test_evaluate_top1_top5_against_direct_argmax():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((8, 16)).astype(np.float32)
    base_labels = rng.integers(0, 8, 300)
    base = centres[base_labels] + rng.normal(0, 0.9, (300, 16)).astype(np.float32)
    query_labels = rng.integers(0, 8, 60)
    queries = centres[query_labels] + rng.normal(0, 0.9, (60, 16)).astype(np.float32)
    classifier = KNNClassifier.from_vectors(base, base_labels, k=20, tau=0.1, num_classes=8)
    result = classifier.evaluate(queries, query_labels)
    direct = np.array([direct_knn(base, base_labels, q, 20, 0.1, 8) for q in queries])
    ranked = np.argsort(-direct, axis=1, kind="stable")
    assert result["top1"] == pytest.approx(np.mean(ranked[:, 0] == query_labels))
    assert result["top5"] == pytest.approx(
        np.mean([y in r[:5] for y, r in zip(query_labels, ranked, strict=True)])
    )
    assert 0.3 < result["top1"] <= result["top5"] <= 1.0


def test_query_without_labelled_neighbours_gets_zero_probabilities():
    base = np.eye(4, dtype=np.float32)
    classifier = KNNClassifier.from_vectors(base, np.array([-1, -1, 0, 1]), k=2, num_classes=2)
    probs = classifier.predict(np.array([[1, 0.5, 0, 0]], np.float32))
    np.testing.assert_array_equal(probs, [[0.0, 0.0]])

"""dsa.md §3 norms and §7 indexer training objective."""

import numpy as np
import pytest

from dsa_hybrid import reference


def test_rms_norm_and_layer_norm():
    x = np.array([[3.0, 4.0]])
    np.testing.assert_allclose(reference.rms_norm(x, eps=0.0), x / np.sqrt(12.5))
    np.testing.assert_allclose(reference.rms_norm(x, np.array([2.0, 1.0]), eps=0.0), x / np.sqrt(12.5) * [2, 1])
    y = reference.layer_norm(np.array([[1.0, 2.0, 3.0]]), np.array([1.0, 1.0, 2.0]), np.array([0.0, 1.0, 0.0]), eps=0.0)
    np.testing.assert_allclose(y, [[-np.sqrt(1.5), 1.0, 2 * np.sqrt(1.5)]])


def test_kl_loss_is_zero_iff_distributions_match():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((3, 6))
    q = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    probs = np.repeat(q[:, None, :] / 2, 2, axis=1)  # two heads summing to q
    assert reference.indexer_kl_loss(probs, scores) == pytest.approx(0.0, abs=1e-12)
    assert reference.indexer_kl_loss(probs, scores[:, ::-1]) > 0.01


def test_kl_loss_restricted_to_selected_set():
    scores = np.array([[0.0, 1.0, 2.0, -np.inf]])
    probs = np.array([[[0.2, 0.3, 0.5, 0.0]]])
    sel = np.array([[1, 2, -1]])
    # Restricted to {1, 2}: P = (0.375, 0.625), Q = softmax(1, 2).
    p = np.array([0.3, 0.5]) / 0.8
    qd = np.exp([1.0, 2.0]) / np.exp([1.0, 2.0]).sum()
    assert reference.indexer_kl_loss(probs, scores, sel) == pytest.approx(float(np.sum(p * np.log(p / qd))))

"""`dsa_hybrid.train.losses` against the float64 oracle (`reference.indexer_kl_loss`, dsa.md §7) and
exact invariants; `indexer_scores` against `reference.indexer_scores` (dsa.md §4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_hybrid import reference as ref
from dsa_hybrid.train import attention_target, indexer_kl_loss, indexer_scores, lm_loss, selection_mask


def _problem(seed: int, T: int = 7, h: int = 3, L: int = 11):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((T, h, L))
    visible = np.arange(L)[None, :] <= (np.arange(T) + L - T)[:, None]
    logits = np.where(visible[:, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    scores = np.where(visible, 2 * rng.standard_normal((T, L)), -np.inf)
    return probs, scores, rng


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_kl_loss_equals_the_oracle(seed: int) -> None:
    probs, scores, rng = _problem(seed)
    want = ref.indexer_kl_loss(probs, scores)
    got = indexer_kl_loss(jnp.asarray(probs, jnp.float32), jnp.asarray(scores, jnp.float32), normalised=False)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
    target = attention_target(jnp.asarray(probs, jnp.float32))
    np.testing.assert_allclose(
        float(indexer_kl_loss(target, jnp.asarray(scores, jnp.float32))), want, rtol=1e-5, atol=1e-6
    )
    # Restricted to a selected set (the sparse stage), −1 padded, one row selecting nothing visible.
    T, L = scores.shape
    sel = np.stack([rng.permutation(L)[:5] for _ in range(T)]).astype(np.int32)
    sel[rng.random(sel.shape) < 0.3] = -1
    sel[0] = -1
    with np.errstate(invalid="ignore", divide="ignore"):  # the oracle's empty row is 0/0 (its terms are 0)
        want = ref.indexer_kl_loss(probs, scores, sel)
    got = indexer_kl_loss(
        jnp.asarray(probs, jnp.float32), jnp.asarray(scores, jnp.float32), jnp.asarray(sel), normalised=False
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


def test_the_kl_loss_is_zero_at_the_target_and_its_gradient_finite() -> None:
    probs, scores, _ = _problem(3)
    target = attention_target(jnp.asarray(probs, jnp.float32))
    # softmax(log P) = P wherever P > 0 (−inf where P = 0, which the loss must tolerate).
    logp = jnp.where(target > 0, jnp.log(jnp.where(target > 0, target, 1.0)), -jnp.inf)
    assert abs(float(indexer_kl_loss(target, logp))) < 1e-5
    g = jax.grad(lambda s: indexer_kl_loss(target, s))(jnp.asarray(scores, jnp.float32))
    assert np.all(np.isfinite(np.asarray(g)))
    # d KL / d I = softmax(I) − P per row, zero where not visible.
    s = jnp.asarray(scores, jnp.float32)
    np.testing.assert_allclose(np.asarray(g), np.asarray(jax.nn.softmax(s, -1) - target), atol=1e-6)


def test_selection_mask_and_lm_loss() -> None:
    sel = jnp.asarray([[2, -1, 0], [3, 3, -1]], jnp.int32)
    np.testing.assert_array_equal(
        np.asarray(selection_mask(sel, 4)), [[True, False, True, False], [False, False, False, True]]
    )
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 5))
    w = (rng.random((2, 5)) < 0.5).astype(np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(lm_loss(jnp.asarray(logits), jnp.asarray(targets))), nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        float(lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(w))), (nll * w).sum() / w.sum(), rtol=1e-5
    )


def test_indexer_scores_equal_the_oracle_and_are_causal() -> None:
    rng = np.random.default_rng(4)
    R, H, D, L = 5, 4, 16, 9
    q = rng.standard_normal((R, H, D)).astype(np.float32)
    w = rng.standard_normal((R, H)).astype(np.float32)
    k = rng.standard_normal((L, D)).astype(np.float32)
    pos = np.array([0, 3, 4, 8, 8], np.int32)
    got = np.asarray(indexer_scores(jnp.asarray(q), jnp.asarray(w), jnp.asarray(k), jnp.asarray(pos)))
    want = ref.indexer_scores(q, w, k)
    visible = np.arange(L)[None, :] <= pos[:, None]
    np.testing.assert_allclose(got[visible], want[visible], rtol=1e-5, atol=1e-5)
    assert np.all(np.isneginf(got[~visible]))


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match="target, scores"):
        indexer_kl_loss(jnp.zeros((3, 4)), jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match="target"):
        indexer_kl_loss(jnp.zeros((3, 4)), jnp.zeros((3, 4)), normalised=False)
    with pytest.raises(ValueError, match="selected"):
        indexer_kl_loss(jnp.zeros((3, 4)), jnp.zeros((3, 4)), jnp.zeros((2, 2), jnp.int32))

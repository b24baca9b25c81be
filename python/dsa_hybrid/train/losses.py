"""Training losses (dsa.md §7): the indexer's KL divergence and the language-model cross entropy.

All in JAX, differentiable, float32 (float64 under x64). `indexer_kl_loss` equals the oracle's
`reference.indexer_kl_loss` (tested), also where the restriction to a selected set leaves a row empty.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsa_hybrid.ops.checks import check_array, check_int, check_int_array, is_concrete


def attention_target(attn_probs: jax.Array) -> jax.Array:
    """The indexer's target `P` `[T, L]` from main attention probabilities `[T, h, L]`: summed over heads
    and L1-normalised over keys (a row with no mass stays 0). Not detached: wrap it in
    `jax.lax.stop_gradient` when the main model must not learn from the indexer's loss."""
    check_array("attn_probs", attn_probs)
    if attn_probs.ndim != 3:
        raise ValueError(f"attn_probs: expected [T, h, L], got {list(attn_probs.shape)}")
    p = attn_probs.sum(axis=1)
    total = p.sum(axis=-1, keepdims=True)
    return p / jnp.where(total > 0, total, 1.0)


def indexer_kl_loss(
    target: jax.Array, scores: jax.Array, selected: jax.Array | None = None, *, normalised: bool = True
) -> jax.Array:
    """`Σ_t KL(P[t] ‖ softmax(I[t]))` (dsa.md §7), a float scalar.

    Args:
        target: `P`, either already `[T, L]` (rows summing to 1, `attention_target`) or, with
            `normalised=False`, main attention probabilities `[T, h, L]` (summed over heads and
            L1-normalised here, as the oracle takes them).
        scores: indexer scores `I` `[T, L]`, −inf where a key is not visible.
        selected: optional int `[T, K]` positions (−1 padded): both distributions are restricted to
            this set and `P` renormalised over it (the sparse training stage).

    Terms with `P = 0` contribute 0 (also where the log-softmax is −inf); a row with no mass in the set
    contributes 0. Differentiable in `scores` (and in `target`, which callers normally detach).
    """
    check_array("target", target)
    check_array("scores", scores)
    if not normalised:
        if target.ndim != 3:
            raise ValueError(f"target: expected attention probabilities [T, h, L], got {list(target.shape)}")
        target = target.sum(axis=1)
    if target.ndim != 2 or scores.shape != target.shape:
        raise ValueError(
            f"target, scores: expected two [T, L] arrays, got {list(target.shape)} and {list(scores.shape)}"
        )
    p, s = target, scores
    if selected is not None:
        check_int_array("selected", selected, 2)
        if selected.shape[0] != s.shape[0]:
            raise ValueError(f"selected: expected [{s.shape[0]}, K], got {list(selected.shape)}")
        mask = selection_mask(selected, s.shape[1])
        p = jnp.where(mask, p, 0.0)
        s = jnp.where(mask, s, -jnp.inf)
    total = p.sum(axis=-1, keepdims=True)
    p = p / jnp.where(total > 0, total, 1.0)
    log_q = jax.nn.log_softmax(jnp.where(jnp.isfinite(s).any(-1, keepdims=True), s, 0.0), axis=-1)
    has = p > 0
    terms = jnp.where(has, p * (jnp.log(jnp.where(has, p, 1.0)) - jnp.where(has, log_q, 0.0)), 0.0)
    return terms.sum()


def selection_mask(selected: jax.Array, length: int) -> jax.Array:
    """bool `[T, length]`: which positions each row's `selected` `[T, K]` (−1 padded) names (entries
    outside `[0, length)` name nothing)."""
    check_int_array("selected", selected, 2)
    length = check_int("length", length, 0)
    ok = (selected >= 0) & (selected < length)
    rows = jnp.broadcast_to(jnp.arange(selected.shape[0])[:, None], selected.shape)
    mask = jnp.zeros((selected.shape[0], length), bool)
    return mask.at[rows, jnp.where(ok, selected, length)].set(True, mode="drop")


def lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross entropy: `logits` `[..., V]`, int `targets` `[...]`, optional `weights`
    `[...]` (e.g. 1 on answer tokens only; the mean is weighted, 0 when all weights are 0). Target ids
    outside `[0, V)` raise `ValueError` when `targets` is concrete; under `jit` they make the loss NaN."""
    check_array("logits", logits)
    if logits.ndim < 1:
        raise ValueError("logits: expected [..., V], got a scalar")
    check_int_array("targets", targets, logits.ndim - 1)
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets: expected {list(logits.shape[:-1])}, got {list(targets.shape)}")
    if is_concrete(targets) and targets.size:
        lo, hi = int(np.min(np.asarray(targets))), int(np.max(np.asarray(targets)))
        if lo < 0 or hi >= logits.shape[-1]:
            raise ValueError(f"targets: ids must lie in [0, {logits.shape[-1]}), got min {lo}, max {hi}")
    if weights is not None:
        check_array("weights", weights)
        if tuple(weights.shape) != tuple(targets.shape):
            raise ValueError(f"weights: expected {list(targets.shape)}, got {list(weights.shape)}")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if weights is None:
        return nll.mean()
    w = weights.astype(nll.dtype)
    return (nll * w).sum() / jnp.maximum(w.sum(), 1e-9)

"""The training stages (dsa.md §7): a few-second run whose losses fall, and each stage trains exactly
the weights it should (the warm-up only the indexer; in the sparse stage the KL loss reaches only the
indexer and the LM loss only the main model)."""

from __future__ import annotations

import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_hybrid.layers.dsa_attention import INDEXER_PARAMS
from dsa_hybrid.models.causal_lm import ModelParams
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.train import RecallTask, indexer_mask, plot_history, stage_loss, train

TASK = RecallTask(n_keys=4, n_values=4, n_filler=8, pairs=4, queries=4)
CFG = DSAConfig.tiny().replace(n_routed_experts=0, index_topk=8, vocab_size=TASK.vocab_size, num_hidden_layers=1)
L = 32


def _batches(seed: int = 0):
    rng = np.random.default_rng(seed)
    return lambda _i: TASK.batch(rng, 8, L)


def _leaves(params: ModelParams, indexer: bool) -> list[np.ndarray]:
    mask = jax.tree_util.tree_leaves(indexer_mask(params))
    return [np.asarray(x) for x, m in zip(jax.tree_util.tree_leaves(params), mask, strict=True) if m == indexer]


def test_a_short_run_lowers_the_losses_and_writes_the_curves(tmp_path) -> None:
    params = ModelParams.random(CFG, seed=0, std=0.02)
    out = io.StringIO()
    trained, h_dense = train(
        params, CFG, _batches(), stage="dense", steps=40, learning_rate=3e-3, log_every=5, stream=out
    )
    lm = h_dense.losses["lm"]
    assert lm[-1] < 0.6 * lm[0], lm  # from ~ln(vocab) to about ln(n_values) and below
    assert "train dense" in out.getvalue() and "40/40" in out.getvalue()
    # The dense stage leaves the indexer alone; the warm-up then trains only the indexer.
    for a, b in zip(_leaves(params, True), _leaves(trained, True), strict=True):
        np.testing.assert_array_equal(a, b)
    warmed, h_warm = train(
        trained, CFG, _batches(1), stage="warmup", steps=30, learning_rate=3e-3, log_every=5, progress=False
    )
    kl = h_warm.losses["kl"]
    assert kl[-1] < 0.7 * kl[0], kl
    for a, b in zip(_leaves(trained, False), _leaves(warmed, False), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(trained, True), _leaves(warmed, True), strict=True))
    if plot_history([h_dense, h_warm], str(tmp_path / "losses.png")):
        assert (tmp_path / "losses.png").stat().st_size > 1000


def test_in_the_sparse_stage_each_loss_reaches_only_its_own_weights() -> None:
    params = ModelParams.random(CFG, seed=1)
    batch = tuple(jnp.asarray(a) for a in _batches(2)(0))

    @jax.jit
    def grads(p):
        def part(name: str):
            return jax.grad(lambda q: stage_loss(q, CFG, batch, "sparse", 8)[1][name])(p)

        return part("kl"), part("lm")

    g_kl, g_lm = grads(params)
    kl_main = _leaves(g_kl, False)
    lm_idx = _leaves(g_lm, True)
    assert all(np.all(g == 0) for g in kl_main)  # the indexer's input is detached from the main model
    assert all(np.all(g == 0) for g in lm_idx)  # top-k selection passes no gradient to the indexer
    assert any(np.any(g != 0) for g in _leaves(g_kl, True))
    assert any(np.any(g != 0) for g in _leaves(g_lm, False))


def test_indexer_mask_marks_the_indexer_weights() -> None:
    params = ModelParams.random(CFG)
    mask = indexer_mask(params)
    attn = mask.blocks[0].attn
    assert all(getattr(attn, n) is True for n in INDEXER_PARAMS)
    assert attn.q_a is False and mask.embed is False
    assert dataclasses.replace(mask, embed=True).embed is True


def test_bad_arguments_name_themselves() -> None:
    params = ModelParams.random(CFG)
    with pytest.raises(ValueError, match="stage"):
        train(params, CFG, _batches(), stage="nope", steps=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        train(params, CFG, _batches(), stage="dense", steps=0)

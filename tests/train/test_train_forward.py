"""`train.forward_train` computes what the serving forward computes (the same model, cache-free), and
its modes select what they say."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_hybrid.models.causal_lm import ModelParams, create_caches, forward
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.train import forward_train

CFG = DSAConfig.tiny().replace(n_routed_experts=0, index_topk=8, vocab_size=64)
L = 24
_fwd = jax.jit(forward_train, static_argnames=("cfg", "mode", "k", "query_block"))


@pytest.fixture(scope="module")
def model():
    params = ModelParams.random(CFG, seed=3)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, L)).astype(np.int32)
    return params, tokens


def _serving_logits(params: ModelParams, tokens: np.ndarray) -> np.ndarray:
    """The package's forward (paged caches, exact float32 indexer, top-`index_topk`), one sequence."""
    page = 8
    caches = create_caches(CFG, L // page, page, latent_kind="f32", indexer="exact")
    pos = jnp.arange(L, dtype=jnp.int32)
    table = jnp.repeat(jnp.arange(L // page, dtype=jnp.int32)[None], L, 0)
    logits, _ = forward(params, CFG, jnp.asarray(tokens), pos, pos, table, caches, backend="xla")
    return np.asarray(logits)


def test_sparse_mode_equals_the_serving_forward_with_the_exact_indexer(model) -> None:
    params, tokens = model
    got, aux = _fwd(params, CFG, jnp.asarray(tokens), mode="sparse")
    np.testing.assert_allclose(np.asarray(got[1]), _serving_logits(params, tokens[1]), rtol=2e-4, atol=2e-4)
    sel = np.asarray(aux[0].selected)  # [B, L, k]: row t selects min(t + 1, k) visible positions
    assert sel.shape == (2, L, CFG.index_topk)
    for t in range(L):
        picked = sel[0, t][sel[0, t] >= 0]
        assert len(picked) == min(t + 1, CFG.index_topk) and np.all(picked <= t)


def test_dense_equals_sparse_with_every_position_and_window_keeps_the_last_k(model) -> None:
    params, tokens = model
    t = jnp.asarray(tokens)
    dense, aux_d = _fwd(params, CFG, t, mode="dense", query_block=7)  # blocks of 7 queries
    everything, _ = _fwd(params, CFG, t, mode="sparse", k=L)
    np.testing.assert_allclose(np.asarray(dense), np.asarray(everything), rtol=2e-5, atol=2e-5)
    target = np.asarray(aux_d[0].target)
    np.testing.assert_allclose(target.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(target[0], 1) == 0.0)  # causal
    _, aux_w = _fwd(params, CFG, t, mode="window", k=5, aux_rows=jnp.asarray([2, 20]))
    np.testing.assert_array_equal(np.asarray(aux_w[1].selected)[0], [[2, 1, 0, -1, -1], [20, 19, 18, 17, 16]])
    _, aux_r = _fwd(params, CFG, t, mode="random", k=5, aux_rows=jnp.asarray([20]))
    picked = np.asarray(aux_r[0].selected)[0, 0]
    assert len(set(picked.tolist())) == 5 and picked.max() <= 20


def test_bad_arguments_name_themselves(model) -> None:
    params, tokens = model
    with pytest.raises(ValueError, match="mode"):
        forward_train(params, CFG, jnp.asarray(tokens), mode="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tokens"):
        forward_train(params, CFG, jnp.asarray(tokens[0]))
    with pytest.raises(ValueError, match="k"):
        forward_train(params, CFG, jnp.asarray(tokens), mode="sparse", k=0)

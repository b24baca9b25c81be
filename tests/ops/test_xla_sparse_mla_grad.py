"""The memory-lean backward of `sparse_mla`'s XLA path (`jax.custom_vjp`) and of `sparse_attention`:
against `jax.grad` of dense attention under the same mask, against finite differences in float64, and
its edge cases (invalid entries, empty rows, duplicates, blocks, bf16 caches, saved residuals)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from dsa_hybrid.ops import sparse_mla as sm
from dsa_hybrid.ops.latent_cache import LatentCache
from dsa_hybrid.ops.sparse_mla import attend, sparse_attention, sparse_mla

SCALE = 0.3


def _problem(seed: int, N: int = 48, T: int = 9, K: int = 12, h: int = 3, D: int = 40):
    """Unique indices per row, some −1 and some ≥ N (invalid), one row all invalid (empty)."""
    rng = np.random.default_rng(seed)
    kv = rng.standard_normal((N, D)).astype(np.float32)
    q = (rng.standard_normal((T, h, D)) / 3).astype(np.float32)
    idx = np.stack([rng.permutation(N + 8)[:K] - 4 for _ in range(T)]).astype(np.int32)  # −4..−1, ≥ N: invalid
    idx[2] = -1
    return q, kv, idx


def _mask(idx: np.ndarray, N: int) -> np.ndarray:
    m = np.zeros((idx.shape[0], N), bool)
    for t, row in enumerate(idx):
        m[t, row[(row >= 0) & (row < N)]] = True
    return m


def _dense(q: jax.Array, kv: jax.Array, mask: np.ndarray, d_v: int) -> tuple[jax.Array, jax.Array]:
    """Dense attention over all `N` rows under `mask`, differentiated by plain autodiff."""
    lg = SCALE * jnp.einsum("thd,nd->thn", q, kv, precision="highest")
    lg = jnp.where(mask[:, None], lg, -jnp.inf)
    lse = jax.nn.logsumexp(lg, -1)
    p = jnp.where(mask[:, None], jnp.exp(lg - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    return jnp.einsum("thn,nv->thv", p, kv[:, :d_v], precision="highest"), lse


def _objective(out: jax.Array, lse: jax.Array) -> jax.Array:
    """Uses both outputs (so the LSE cotangent is checked too); empty rows' +inf LSE left out."""
    return jnp.sum(jnp.sin(3 * out)) + 0.1 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradients_equal_dense_attention_under_the_same_mask(seed: int) -> None:
    q, kv, idx = _problem(seed)
    d_v = 32
    mask = _mask(idx, kv.shape[0])

    def lean(q, kv):
        return _objective(*sparse_attention(q, kv, jnp.asarray(idx), scale=SCALE, d_v=d_v))

    def dense(q, kv):
        return _objective(*_dense(q, kv, mask, d_v))

    got, want = jax.jit(jax.grad(lean, (0, 1)))(q, kv), jax.jit(jax.grad(dense, (0, 1)))(q, kv)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    # The empty row gets a zero query gradient; rows no query selects get a zero gradient.
    assert np.all(np.asarray(got[0])[2] == 0.0)
    assert np.all(np.asarray(got[1])[~mask.any(0)] == 0.0)


def test_the_f32_cache_path_gives_the_same_gradients_as_the_row_array() -> None:
    q, kv, idx = _problem(3)
    N, D = kv.shape
    d_v = 24
    cache = LatentCache.create(4, 16, kind="f32", latent_dim=d_v, rope_dim=D - d_v)  # 64 slots ≥ N
    cache = cache.write(jnp.arange(N), kv[:, :d_v], kv[:, d_v:])
    lengths = jnp.asarray(np.random.default_rng(0).integers(0, idx.shape[1] + 1, idx.shape[0]), jnp.int32)
    slots = jnp.asarray(np.where(idx >= N, idx + cache.num_slots, idx))  # invalid in both

    def via_cache(q, cache):
        out, lse = sparse_mla(q, cache, slots, scale=SCALE, d_v=d_v, topk_length=lengths, backend="xla")
        return _objective(out, lse)

    def via_rows(q, kv):
        out, lse = sparse_attention(q, kv, jnp.asarray(idx), scale=SCALE, d_v=d_v, topk_length=lengths)
        return _objective(out, lse)

    gq, gc = jax.jit(jax.grad(via_cache, (0, 1)))(q, cache)
    wq, wkv = jax.jit(jax.grad(via_rows, (0, 1)))(q, kv)
    np.testing.assert_allclose(np.asarray(gq), np.asarray(wq), rtol=1e-6, atol=1e-6)
    rows = np.asarray(gc.data).reshape(-1, D)
    np.testing.assert_allclose(rows[:N], np.asarray(wkv), rtol=1e-6, atol=1e-6)
    assert np.all(rows[N:] == 0.0)  # slots past the written ones are never selected


def test_gradients_match_finite_differences_in_float64() -> None:
    q, kv, idx = _problem(4, N=20, T=5, K=6, h=2, D=12)
    with jax.enable_x64(True):
        q64, kv64 = jnp.asarray(q, jnp.float64), jnp.asarray(kv, jnp.float64)

        def f(q, kv):
            return _objective(*sparse_attention(q, kv, jnp.asarray(idx), scale=SCALE, d_v=8))

        assert f(q64, kv64).dtype == jnp.float64
        check_grads(jax.jit(f), (q64, kv64), order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-7)


def test_a_slot_selected_twice_gets_both_contributions() -> None:
    rng = np.random.default_rng(5)
    kv = rng.standard_normal((6, 8)).astype(np.float32)
    q = rng.standard_normal((1, 2, 8)).astype(np.float32)
    twice = jnp.asarray([[0, 3, 3, -1]], jnp.int32)
    copy = jnp.concatenate([jnp.asarray(kv), jnp.asarray(kv[3:4])])  # row 6 is a copy of row 3
    apart = jnp.asarray([[0, 3, 6, -1]], jnp.int32)

    def f(kv, idx):
        return _objective(*sparse_attention(jnp.asarray(q), kv, idx, scale=SCALE))

    grad = jax.jit(jax.grad(f))
    g_twice = np.asarray(grad(jnp.asarray(kv), twice))
    g_apart = np.asarray(grad(copy, apart))
    np.testing.assert_allclose(g_twice[3], g_apart[3] + g_apart[6], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_twice[0], g_apart[0], rtol=1e-5, atol=1e-6)


def test_long_prefills_are_differentiated_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    q, kv, idx = _problem(6, T=23)

    def grads():
        # A fresh jit per call: the block sizes are read when the function is traced.
        f = jax.jit(jax.grad(lambda q, kv: _objective(*sparse_attention(q, kv, jnp.asarray(idx), scale=SCALE)), (0, 1)))
        return f(q, kv)

    whole = grads()
    K, D = idx.shape[1], kv.shape[1]
    monkeypatch.setattr(sm, "_GATHER_BUDGET", 4 * K * D)  # forward blocks of 4 rows, 7 with padding
    monkeypatch.setattr(sm, "_BACKWARD_BUDGET", 5 * K * D)  # backward blocks of 5 rows
    blocked = grads()
    for a, b in zip(whole, blocked, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_bf16_caches_give_query_gradients_and_no_cache_gradient() -> None:
    q, kv, idx = _problem(7)
    N, D = kv.shape
    d_v = 24
    cache = LatentCache.create(4, 16, kind="bf16", latent_dim=d_v, rope_dim=D - d_v)
    cache = cache.write(jnp.arange(N), kv[:, :d_v], kv[:, d_v:])
    stored = cache.rows(jnp.arange(N))  # the bf16-rounded rows, float32
    slots = jnp.asarray(np.where(idx >= N, idx + cache.num_slots, idx))  # invalid in both

    def via_cache(q):
        return _objective(*sparse_mla(q, cache, slots, scale=SCALE, d_v=d_v, backend="xla"))

    def via_rows(q):
        return _objective(*sparse_attention(q, stored, jnp.asarray(idx), scale=SCALE, d_v=d_v))

    np.testing.assert_allclose(
        np.asarray(jax.jit(jax.grad(via_cache))(q)), np.asarray(jax.jit(jax.grad(via_rows))(q)), rtol=1e-6, atol=1e-6
    )
    # bf16 queries: the gradient comes back in the query's dtype.
    assert jax.jit(jax.grad(via_cache))(jnp.asarray(q, jnp.bfloat16)).dtype == jnp.bfloat16


def test_the_backward_saves_no_gathered_rows() -> None:
    """What the forward keeps for the backward: O(T·h·D) (q, out, lse) instead of plain autodiff's
    gathered rows O(T·K·D). Shapes only (`eval_shape`): nothing is computed."""
    N, T, K, h, D, d_v = 2048, 256, 256, 4, 96, 64
    q = jax.ShapeDtypeStruct((T, h, D), jnp.float32)
    kv = jax.ShapeDtypeStruct((N, D), jnp.float32)
    idx = jax.ShapeDtypeStruct((T, K), jnp.int32)

    def lean(q, kv, idx):
        return sparse_attention(q, kv, idx, scale=0.1, d_v=d_v)

    def plain(q, kv, idx):
        return attend(q, kv[jnp.clip(idx, 0, N - 1)], (idx >= 0) & (idx < N), 0.1, d_v)

    def saved_bytes(f) -> int:
        def residuals(q, kv, idx):
            return jax.tree_util.tree_leaves(jax.vjp(lambda a, b: f(a, b, idx), q, kv)[1])

        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.eval_shape(residuals, q, kv, idx))

    gathered = T * K * D * 4
    assert saved_bytes(plain) >= gathered
    assert saved_bytes(lean) < gathered / 8


def test_bad_arguments_name_themselves() -> None:
    q, kv, idx = _problem(8)
    with pytest.raises(ValueError, match="q, kv"):
        sparse_attention(jnp.asarray(q), jnp.asarray(kv[:, :-1]), jnp.asarray(idx), scale=SCALE)
    with pytest.raises(ValueError, match="d_v"):
        sparse_attention(jnp.asarray(q), jnp.asarray(kv), jnp.asarray(idx), scale=SCALE, d_v=0)
    with pytest.raises(ValueError, match="indices"):
        sparse_attention(jnp.asarray(q), jnp.asarray(kv), jnp.asarray(idx[:-1]), scale=SCALE)

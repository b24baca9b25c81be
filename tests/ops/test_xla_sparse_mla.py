"""`sparse_mla` (XLA path) against `reference.sparse_mla` over bf16 and FP8 latent caches (dsa.md §3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mla_problems import K_MAX, T_MAX, cache_from_kv, problems

from dsa_hybrid import reference as ref
from dsa_hybrid import testing
from dsa_hybrid.ops.latent_cache import LatentCache
from dsa_hybrid.ops.sparse_mla import dense_mla, sparse_mla


@given(problems(), st.booleans())
def test_xla_path_matches_the_reference(problem, use_topk_length: bool) -> None:
    p, kind, page_size = problem
    cache, stored = cache_from_kv(p.kv, p.d_v, page_size, kind)
    T, K = p.indices.shape
    N = p.kv.shape[0]
    # The oracle's out-of-range indices (>= N) must stay out of range in the padded cache.
    slots = np.where(p.indices >= N, p.indices - N + cache.num_slots, p.indices)
    lengths = np.full(T_MAX, K_MAX, np.int32)
    if use_topk_length:
        lengths[:T] = np.random.default_rng(T * K).integers(0, K + 1, T)
    want_idx = np.where(np.arange(K)[None, :] < lengths[:T, None], p.indices, -1)
    want_out, want_lse = ref.sparse_mla(p.q, stored[:N], want_idx, p.scale, p.d_v)
    # Pad to the fixed shapes: extra rows and entries are −1 (skipped), extra query rows are dropped.
    q = np.zeros((T_MAX, *p.q.shape[1:]), np.float32)
    q[:T] = p.q
    padded = np.full((T_MAX, K_MAX), -1, np.int32)
    padded[:T, :K] = slots
    out, lse = _jit_sparse_mla(
        jnp.asarray(q), cache, jnp.asarray(padded), scale=p.scale, d_v=p.d_v, topk_length=jnp.asarray(lengths)
    )
    testing.assert_mla_close(np.asarray(out)[:T], np.asarray(lse)[:T], want_out, want_lse, dtype=np.float32)


_jit_sparse_mla = jax.jit(
    lambda q, cache, slots, topk_length, scale, d_v: sparse_mla(
        q, cache, slots, scale=scale, d_v=d_v, topk_length=topk_length, backend="xla"
    ),
    static_argnames=("scale", "d_v"),
)


def test_long_prefills_are_processed_in_blocks() -> None:
    """More rows than one gather block holds: the blocked path equals the one-shot reference."""
    rng = np.random.default_rng(0)
    N, T, K, h = 256, 70, 1024, 2
    kv = rng.standard_normal((N, 576)).astype(np.float32)
    cache, stored = cache_from_kv(kv, 512, 64, "bf16")
    q = rng.standard_normal((T, h, 576)).astype(np.float32) / 24
    idx = rng.integers(-1, N, (T, K)).astype(np.int32)
    out, lse = sparse_mla(jnp.asarray(q), cache, jnp.asarray(idx), scale=0.1, backend="xla")
    testing.assert_mla_close(
        np.asarray(out), np.asarray(lse), *ref.sparse_mla(q, stored, idx, 0.1, 512), dtype=np.float32
    )


def test_selecting_everything_equals_dense_causal_attention() -> None:
    rng = np.random.default_rng(3)
    L, h = 40, 4
    kv = rng.standard_normal((L, 576)).astype(np.float32)
    cache, stored = cache_from_kv(kv, 512, 8, "fp8")
    q = jnp.asarray(rng.standard_normal((5, h, 576)).astype(np.float32) / 10)
    pos = np.array([0, 7, 8, 20, 39])
    slots = np.where(np.arange(L)[None, :] <= pos[:, None], np.arange(L)[None, :], -1).astype(np.int32)
    s_out, s_lse = sparse_mla(q, cache, jnp.asarray(slots), scale=0.1352338, backend="xla")
    d_out, d_lse = dense_mla(q, cache, jnp.asarray(pos), scale=0.1352338)
    np.testing.assert_allclose(np.asarray(s_out), np.asarray(d_out), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(s_lse), np.asarray(d_lse), rtol=1e-5)
    r_out, r_lse = ref.dense_mla(np.asarray(q), stored, pos, 0.1352338, 512)
    testing.assert_mla_close(np.asarray(d_out), np.asarray(d_lse), r_out, r_lse, dtype=np.float32)


def test_bf16_queries() -> None:
    rng = np.random.default_rng(4)
    kv = rng.standard_normal((64, 576)).astype(np.float32)
    cache, stored = cache_from_kv(kv, 512, 64, "bf16")
    q = jnp.asarray(rng.standard_normal((3, 8, 576)), jnp.bfloat16)
    idx = jnp.asarray(rng.integers(0, 64, (3, 32)), jnp.int32)
    out, lse = sparse_mla(q, cache, idx, scale=0.1, backend="xla")
    want = ref.sparse_mla(np.asarray(q.astype(jnp.float32)), stored, np.asarray(idx), 0.1, 512)
    testing.assert_mla_close(np.asarray(out), np.asarray(lse), *want, dtype=np.float32)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(q=jnp.ones((2, 4, 100))), ValueError, r"q: expected \[T, h, 576\]"),
        (dict(q=jnp.ones((2, 4, 576), jnp.float16)), TypeError, "q: expected float32 or bfloat16"),
        (dict(slots=jnp.zeros((3, 8), jnp.int32)), ValueError, r"slots: expected \[2, K\]"),
        (dict(slots=jnp.zeros((2, 8))), TypeError, "slots: expected integers"),
        (dict(d_v=600), ValueError, "d_v: must be in"),
        (dict(topk_length=jnp.zeros(3, jnp.int32)), ValueError, "topk_length"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(cache=np.zeros((4, 576))), TypeError, "cache: expected a LatentCache"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    args = dict(q=jnp.ones((2, 4, 576)), cache=LatentCache.create(1, 16), slots=jnp.zeros((2, 8), jnp.int32))
    args.update(kwargs)
    q, cache, slots = args.pop("q"), args.pop("cache"), args.pop("slots")
    with pytest.raises(error, match=match):
        sparse_mla(q, cache, slots, scale=0.1, **args)


@pytest.mark.parametrize("splits", [2, 4])
def test_split_k_with_an_lse_merge_changes_nothing(splits: int) -> None:
    rng = np.random.default_rng(5)
    kv = rng.standard_normal((128, 576)).astype(np.float32)
    cache, stored = cache_from_kv(kv, 512, 64, "bf16")
    q = jnp.asarray(rng.standard_normal((3, 4, 576)).astype(np.float32) / 24)
    idx = rng.integers(0, 128, (3, 64)).astype(np.int32)
    idx[0, :40] = -1  # whole slices of row 0 are empty
    idx[2] = -1  # row 2 is empty
    out, lse = sparse_mla(q, cache, jnp.asarray(idx), scale=0.1, backend="xla", num_splits=splits)
    want = ref.sparse_mla(np.asarray(q), stored, idx, 0.1, 512)
    testing.assert_mla_close(np.asarray(out), np.asarray(lse), *want, dtype=np.float32)
    with pytest.raises(ValueError, match="num_splits"):
        sparse_mla(q, cache, jnp.asarray(idx), scale=0.1, num_splits=5)

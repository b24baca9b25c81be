"""The Pallas TPU kernel of `sparse_mla`, run on CPU in TPU interpret mode (DMAs, semaphores and SMEM
simulated; races detected; uninitialised memory reads NaN) against `reference.sparse_mla`.
The interpreter is slow: shapes stay small (a few seconds per case)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interpret_state
from jax.experimental.pallas import tpu as pltpu
from mla_problems import cache_from_kv, problems

from dsa_hybrid import reference as ref
from dsa_hybrid import testing
from dsa_hybrid.ops.latent_cache import LatentCache
from dsa_hybrid.ops.sparse_mla import prefix_mla, sparse_mla
from dsa_hybrid.ops.tpu.sparse_mla import sparse_mla_tpu

STRICT = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan", out_of_bounds_reads="raise")


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    yield
    pltpu.reset_tpu_interpret_mode_state()


def _cache(rng: np.random.Generator, kind: str, n: int, page_size: int, latent: int, rope: int):
    kv = rng.standard_normal((n, latent + rope)).astype(np.float32)
    cache = LatentCache.create(n // page_size, page_size, kind=kind, latent_dim=latent, rope_dim=rope)
    cache = cache.write(jnp.arange(n), jnp.asarray(kv[:, :latent]), jnp.asarray(kv[:, latent:]))
    return cache, np.asarray(cache.rows(jnp.arange(n)), np.float64)


def _no_races() -> bool:
    return interpret_state.races is not None and not interpret_state.races.races_found


@pytest.mark.parametrize(
    ("kind", "q_dtype", "latent", "rope", "heads"),
    [
        ("bf16", np.float32, 64, 32, 4),
        ("fp8", np.float32, 128, 64, 2),
        ("bf16", "bfloat16", 512, 64, 8),
        ("fp8", "bfloat16", 512, 64, 16),  # the deployed widths: four byte planes, one tile each
        ("fp8", np.float32, 1024, 64, 2),  # byte planes spanning two tiles
    ],
)
def test_kernel_matches_the_reference(kind: str, q_dtype, latent: int, rope: int, heads: int) -> None:
    rng = np.random.default_rng(0)
    N, T, K = 64, 3, 20
    cache, stored = _cache(rng, kind, N, 16, latent, rope)
    q = (rng.standard_normal((T, heads, latent + rope)) / 8).astype(np.float32)
    idx = rng.permutation(N + 8)[: T * K].reshape(T, K).astype(np.int32) - 4  # −4..N+3: invalid at both ends
    idx[1] = -1  # an empty row
    lengths = np.array([K, K, 13], np.int32)
    qj = jnp.asarray(q, jnp.bfloat16 if q_dtype == "bfloat16" else jnp.float32)
    out, lse = sparse_mla(
        qj,
        cache,
        jnp.asarray(idx),
        scale=0.1352338,
        topk_length=jnp.asarray(lengths),
        backend="pallas_tpu",
        interpret=STRICT,
    )
    assert _no_races()
    want_idx = np.where((idx < N) & (np.arange(K)[None, :] < lengths[:, None]), idx, -1)
    want = ref.sparse_mla(np.asarray(qj.astype(jnp.float32)), stored, want_idx, 0.1352338, latent)
    dtype = np.float32 if q_dtype == np.float32 else testing.bfloat16
    testing.assert_mla_close(np.asarray(out), np.asarray(lse), *want, dtype=dtype)


def test_several_grid_steps_and_chunks_agree_with_the_xla_path() -> None:
    """Tokens spread over three grid steps, each token over three chunks; row order permuted."""
    rng = np.random.default_rng(1)
    N, T, K = 96, 5, 24
    cache, _ = _cache(rng, "fp8", N, 32, 128, 16)
    q = jnp.asarray(rng.standard_normal((T, 2, 144)).astype(np.float32) / 8)
    idx = np.stack([rng.permutation(N)[:K] for _ in range(T)]).astype(np.int32)
    xla_out, xla_lse = sparse_mla(q, cache, jnp.asarray(idx), scale=0.2, backend="xla")
    perm = idx[:, rng.permutation(K)]
    out, lse = sparse_mla_tpu(
        q, cache, jnp.asarray(perm), None, scale=0.2, d_v=128, tokens_per_step=2, chunk=8, interpret=STRICT
    )
    assert _no_races()
    np.testing.assert_allclose(np.asarray(out), np.asarray(xla_out), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(xla_lse), rtol=2e-6)


def test_pallas_backend_needs_a_tpu_or_interpret_mode() -> None:
    if jax.default_backend() == "tpu":
        pytest.skip("on a TPU the kernel runs natively")
    with pytest.raises(RuntimeError, match="needs a TPU"):
        sparse_mla(
            jnp.ones((1, 1, 576)),
            LatentCache.create(1, 16),
            jnp.zeros((1, 8), jnp.int32),
            scale=0.1,
            backend="pallas_tpu",
        )


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_dense_prefix_path_reads_whole_pages(kind: str) -> None:
    """Rows that select every visible token: page-wise reads (XLA and kernel) equal the row gather."""
    rng = np.random.default_rng(2)
    page, pages_per_seq = 8, 4
    cache, _ = _cache(rng, kind, 64, page, 128, 32)
    # Two sequences with scattered pages; rows at several positions, one of them empty, one padded table.
    tables = np.array([[5, 2, 7, 0], [3, 6, -1, -1], [5, 2, 7, 0], [3, 6, -1, -1]], np.int32)
    lengths = np.array([29, 16, 1, 0], np.int32)
    q = jnp.asarray(rng.standard_normal((4, 2, 160)).astype(np.float32) / 8)
    pos = np.arange(pages_per_seq * page)
    slots = np.where(pos[None, :] < lengths[:, None], np.maximum(tables, 0)[:, pos // page] * page + pos % page, -1)
    want_out, want_lse = sparse_mla(q, cache, jnp.asarray(slots.astype(np.int32)), scale=0.3, backend="xla")
    args = (q, cache, jnp.asarray(tables), jnp.asarray(lengths))
    for out, lse in (
        prefix_mla(*args, scale=0.3, backend="xla"),
        prefix_mla(*args, scale=0.3, backend="pallas_tpu", interpret=STRICT),
    ):
        np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=2e-5, atol=2e-6)
        np.testing.assert_array_equal(np.isinf(np.asarray(lse)), np.isinf(np.asarray(want_lse)))
        np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), rtol=2e-6)
    assert _no_races()


def test_split_k_on_the_kernel() -> None:
    rng = np.random.default_rng(6)
    cache, stored = _cache(rng, "bf16", 64, 16, 64, 16)
    q = jnp.asarray(rng.standard_normal((2, 2, 80)).astype(np.float32) / 8)
    idx = rng.integers(-1, 64, (2, 32)).astype(np.int32)
    out, lse = sparse_mla(q, cache, jnp.asarray(idx), scale=0.3, backend="pallas_tpu", num_splits=2, interpret=STRICT)
    assert _no_races()
    testing.assert_mla_close(
        np.asarray(out), np.asarray(lse), *ref.sparse_mla(np.asarray(q), stored, idx, 0.3, 64), dtype=np.float32
    )


@settings(max_examples=4)
@given(problems())
def test_kernel_under_hypothesis(problem) -> None:
    """Random heads, widths, K, page sizes, cache formats, invalid and out-of-range slots, empty rows."""
    p, kind, page_size = problem
    cache, stored = cache_from_kv(p.kv, p.d_v, page_size, kind)
    N = p.kv.shape[0]
    slots = np.where(p.indices >= N, p.indices - N + cache.num_slots, p.indices).astype(np.int32)
    out, lse = sparse_mla_tpu(
        jnp.asarray(p.q), cache, jnp.asarray(slots), None, scale=p.scale, d_v=p.d_v, chunk=16, interpret=STRICT
    )
    assert _no_races()
    want = ref.sparse_mla(p.q, stored[:N], p.indices, p.scale, p.d_v)
    testing.assert_mla_close(np.asarray(out), np.asarray(lse), *want, dtype=np.float32)

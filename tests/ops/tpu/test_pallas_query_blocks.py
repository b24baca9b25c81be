"""Query-block sparse MLA (`ops/tpu/query_blocks.py`): the union plan against numpy sets, the byte count
against a hand count, and the kernel in TPU interpret mode (races detected, uninitialised memory NaN,
out-of-bounds reads raising) against the XLA path and `reference`. Shapes stay small: the interpreter is
slow."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interpret_state
from jax.experimental.pallas import tpu as pltpu

from dsa_hybrid import reference as ref
from dsa_hybrid import testing
from dsa_hybrid.ops.latent_cache import LatentCache
from dsa_hybrid.ops.sparse_mla import sparse_mla
from dsa_hybrid.ops.tpu.query_blocks import default_block, query_block_reads, sparse_mla_blocks_tpu, union_plan

STRICT = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan", out_of_bounds_reads="raise")


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    yield
    pltpu.reset_tpu_interpret_mode_state()


def _selections(rng: np.random.Generator, T: int, K: int, N: int, share: float) -> np.ndarray:
    """Rows that select `share` of a common set plus their own slots, without repeats in a row, with −1
    and out-of-range entries mixed in."""
    base = rng.permutation(N)[:K]
    idx = np.empty((T, K), np.int32)
    for t in range(T):
        own = rng.permutation(N)[:K]
        row = np.where(rng.random(K) < share, base, own)
        row = np.where(rng.random(K) < 0.1, rng.choice([-1, N + 5], K), row)
        _, first = np.unique(row, return_index=True)
        keep = np.zeros(K, bool)
        keep[first] = True
        idx[t] = np.where(keep, row, -1)
    return idx


def test_union_plan_is_the_set_union_and_membership() -> None:
    rng = np.random.default_rng(0)
    T, K, N, block = 6, 10, 40, 3
    idx = _selections(rng, T, K, N, 0.5)
    valid = (idx >= 0) & (idx < N)
    union, count, member = map(np.asarray, union_plan(jnp.asarray(idx), jnp.asarray(valid), block, 8, N))
    assert union.shape == (2, 32) and member.shape == (2, block, 32)
    for b in range(2):
        rows = idx[b * block : (b + 1) * block]
        want = np.unique(rows[(rows >= 0) & (rows < N)])
        assert count[b] == len(want)
        np.testing.assert_array_equal(union[b, : count[b]], want)
        assert np.all((union[b] >= 0) & (union[b] < N))  # fill slots are in range too
        for r in range(block):
            got = set(union[b][member[b, r]].tolist())
            assert got == set(rows[r][(rows[r] >= 0) & (rows[r] < N)].tolist())


def test_reads_shrink_by_the_overlap() -> None:
    """Rows that all select the same K slots: the per-row kernel fetches them `block` times, the
    query-block kernel once."""
    cache = LatentCache.create(4, 64, kind="fp8")
    T, K, block = 8, 128, 8
    idx = jnp.asarray(np.tile(np.random.default_rng(1).permutation(256)[:K], (T, 1)).astype(np.int32))
    per_row, per_block = query_block_reads(idx, idx >= 0, cache, block=block, chunk=128)
    assert per_row == T * K * 1536 and per_block == K * 1536
    assert default_block(16) == 8 and default_block(8) == 16 and default_block(128) == 1


@pytest.mark.parametrize(
    ("kind", "q_dtype", "latent", "rope", "heads", "block"),
    [("fp8", np.float32, 128, 64, 2, 2), ("bf16", "bfloat16", 64, 32, 2, 3), ("bf16", np.float32, 64, 0, 1, 4)],
)
def test_kernel_matches_the_xla_path_and_the_reference(kind, q_dtype, latent: int, rope: int, heads: int, block: int):
    rng = np.random.default_rng(2)
    N, page, T, K = 64, 16, 5, 12
    kv = rng.standard_normal((N, latent + rope)).astype(np.float32)
    cache = LatentCache.create(N // page, page, kind=kind, latent_dim=latent, rope_dim=rope)
    cache = cache.write(jnp.arange(N), jnp.asarray(kv[:, :latent]), jnp.asarray(kv[:, latent:]))
    stored = np.asarray(cache.rows(jnp.arange(N)), np.float64)
    q = jnp.asarray(rng.standard_normal((T, heads, latent + rope)) / 8, jnp.bfloat16 if q_dtype == "bfloat16" else None)
    idx = _selections(rng, T, K, N, 0.6)
    idx[2] = -1  # an empty row
    lengths = np.array([K, K, K, 7, K], np.int32)
    args = (q, cache, jnp.asarray(idx))
    out, lse = sparse_mla_blocks_tpu(
        *args, jnp.asarray(lengths), scale=0.3, d_v=latent, block=block, chunk=8, interpret=STRICT
    )
    assert interpret_state.races is not None and not interpret_state.races.races_found
    xla_out, xla_lse = sparse_mla(*args, scale=0.3, topk_length=jnp.asarray(lengths), backend="xla")
    np.testing.assert_array_equal(np.isinf(np.asarray(lse)), np.isinf(np.asarray(xla_lse)))
    if q_dtype == np.float32:  # bf16 queries run the MXU in bf16: compared with the reference below
        np.testing.assert_allclose(np.asarray(out), np.asarray(xla_out), rtol=2e-5, atol=2e-6)
    want_idx = np.where((idx < N) & (np.arange(K)[None, :] < lengths[:, None]), idx, -1)
    want = ref.sparse_mla(np.asarray(q.astype(jnp.float32)), stored, want_idx, 0.3, latent)
    dtype = np.float32 if q_dtype == np.float32 else testing.bfloat16
    testing.assert_mla_close(np.asarray(out), np.asarray(lse), *want, dtype=dtype)


def test_bad_arguments() -> None:
    cache = LatentCache.create(1, 16)
    with pytest.raises(ValueError, match="slots"):
        sparse_mla_blocks_tpu(jnp.ones((2, 1, 576)), cache, jnp.zeros((3, 8), jnp.int32), None, scale=0.1, d_v=512)
    with pytest.raises(ValueError, match="block"):
        sparse_mla_blocks_tpu(
            jnp.ones((2, 1, 576)), cache, jnp.zeros((2, 8), jnp.int32), None, scale=0.1, d_v=512, block=0
        )
    with pytest.raises(ValueError, match="d_v"):
        jax.eval_shape(
            lambda: sparse_mla_blocks_tpu(
                jnp.ones((2, 1, 576)), cache, jnp.zeros((2, 8), jnp.int32), None, scale=0.1, d_v=576, interpret=True
            )
        )

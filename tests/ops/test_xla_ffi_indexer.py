"""The Rust host indexer inside `jit` (`select_topk_device(..., backend="cpu_kernel")`, `ops.cpu_kernels.
indexer_select_cpu`): on an `IndexerPages`' two arrays it selects exactly what the host's `select_paged`
selects on the same bytes (so the oracle's selection up to float32 ties, `tests/ops/test_xla_indexer.py`),
for every query dtype, thread count and padding row; "auto" picks it for FP8 pages on a CPU. (Bad input:
`test_xla_ffi_indexer_bad_input.py`.)"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from indexer_problems import Problem, problems, small_paged_problem

import dsa_hybrid as dh
from dsa_hybrid.ops import cpu_kernels
from dsa_hybrid.ops.indexer import ExactIndexerKeys, IndexerPages, select_topk_device

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the FFI kernel is registered for CPU only")

_kernel = jax.jit(
    functools.partial(select_topk_device, backend="cpu_kernel"),
    static_argnames=("k", "quantize_queries", "query_dtype", "threads"),
)


def tables_of(cache: dh.IndexerKeyCache, seq_ids: np.ndarray, width: int | None = None) -> np.ndarray:
    tabs = [cache.block_table(int(s)) for s in seq_ids]
    out = np.full((len(tabs), max(width or 0, *(t.size for t in tabs))), -1, np.int32)
    for i, t in enumerate(tabs):
        out[i, : t.size] = t
    return out


@settings(max_examples=25, deadline=None)
@given(
    problems(),
    st.sampled_from(["float32", "bfloat16", "auto"]),
    st.booleans(),
    st.sampled_from([1, 2]),
    st.integers(0, 2),
)
def test_the_kernel_selects_what_the_host_selects(
    p: Problem, query_dtype: str, quantize: bool, threads: int, padding: int
) -> None:
    tables = tables_of(p.cache, p.seq_ids, width=int(p.positions.max()) // p.cache.block_size + 3)
    positions = p.positions.astype(np.int32)
    want = p.cache.select_paged(
        tables, positions, p.q, p.w, p.k, quantize_queries=quantize, query_dtype=query_dtype, threads=threads
    )
    # Padding rows, as the engine and the XLA path make them: position −1, or position 0 and no pages.
    q, w = p.q, p.w
    if padding:
        extra = np.full((padding, tables.shape[1]), -1, np.int32)
        tables = np.concatenate([tables, extra])
        positions = np.concatenate([positions, np.array([-1, 0][:padding], np.int32)])
        q = np.concatenate([q, np.ones((padding, *q.shape[1:]), np.float32)])
        w = np.concatenate([w, np.ones((padding, w.shape[1]), np.float32)])
    pages = IndexerPages.from_host_pages(p.cache.pages(), p.cache.block_size, p.cache.head_dim)
    got = np.asarray(
        _kernel(
            jnp.asarray(q), jnp.asarray(w), pages, jnp.asarray(tables), jnp.asarray(positions), p.k,
            quantize_queries=quantize, query_dtype=query_dtype, threads=threads,
        )
    )  # fmt: skip
    np.testing.assert_array_equal(got[: len(want)], want)
    assert np.all(got[len(want) :] == -1)  # padding rows select nothing


def test_auto_picks_the_kernel_for_fp8_pages_on_a_cpu_only() -> None:
    rng = np.random.default_rng(1)
    cache, pages, q, w, tables, pos = small_paged_problem(rng)

    def hlo(pg, backend: str = "auto") -> str:
        f = jax.jit(lambda q, w, pg, t, p: select_topk_device(q, w, pg, t, p, 8, backend=backend))
        return f.lower(q, w, pg, tables, pos).as_text()

    assert cpu_kernels.INDEXER_TARGET in hlo(pages)
    assert cpu_kernels.INDEXER_TARGET not in hlo(pages, "xla")
    assert cpu_kernels.INDEXER_TARGET not in hlo(ExactIndexerKeys.create(12, 16, 32))  # float32 keys: XLA
    odd = IndexerPages.create(24, 8, 32)  # pages of 8 keys: the host indexer takes multiples of 16
    assert cpu_kernels.INDEXER_TARGET not in hlo(odd)
    got = jax.jit(lambda q, w, pg, t, p: select_topk_device(q, w, pg, t, p, 8))(q, w, pages, tables, pos)
    np.testing.assert_array_equal(np.asarray(got), cache.select_paged(tables, pos, q, w, 8))


def test_vmap_runs_the_call_per_element() -> None:
    rng = np.random.default_rng(2)
    cache, pages, q, w, tables, pos = small_paged_problem(rng)
    qs = np.stack([q, q[::-1].copy()])
    f = jax.vmap(lambda q: select_topk_device(q, w, pages, tables, pos, 8, backend="cpu_kernel"))
    got = np.asarray(f(jnp.asarray(qs)))
    for i in range(2):
        np.testing.assert_array_equal(got[i], cache.select_paged(tables, pos, qs[i], w, 8))


def test_the_layer_indexes_with_the_kernel_on_a_cpu() -> None:
    """`dsa_attention` with "auto" (and "cpu_kernel") calls the indexer kernel on FP8 pages on a CPU."""
    from dsa_hybrid import DSAConfig
    from dsa_hybrid.layers.dsa_attention import DSACaches, DSAParams, dsa_attention

    cfg = DSAConfig.tiny()
    params = DSAParams.random(cfg, seed=3)
    L, S = 2 * cfg.index_topk + 3, 16
    x = jnp.asarray(np.random.default_rng(4).standard_normal((L, cfg.hidden_size)), jnp.float32)
    pos = jnp.arange(L, dtype=jnp.int32)
    tables = jnp.tile(jnp.arange(-(-L // S), dtype=jnp.int32), (L, 1))
    caches = DSACaches.create(cfg, -(-L // S), S, latent_kind="f32")
    for backend in ("auto", "cpu_kernel"):
        run = jax.jit(lambda x, c, b=backend: dsa_attention(params, cfg, x, pos, pos, tables, c, backend=b))
        assert cpu_kernels.INDEXER_TARGET in run.lower(x, caches).as_text()
    xla = jax.jit(lambda x, c: dsa_attention(params, cfg, x, pos, pos, tables, c, backend="xla"))
    assert cpu_kernels.INDEXER_TARGET not in xla.lower(x, caches).as_text()

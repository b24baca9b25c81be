"""The Rust host indexer inside `jit` (`select_topk_device(..., backend="cpu_kernel")`, `ops.cpu_kernels.
indexer_select_cpu`): on an `IndexerPages`' two arrays it selects exactly what the host's `select_paged`
selects on the same bytes (so the oracle's selection up to float32 ties, `tests/ops/test_xla_indexer.py`),
for every query dtype, thread count and padding row; "auto" picks it for FP8 pages on a CPU; bad input
gets errors naming the argument, at trace time and from the handler itself."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from indexer_problems import Problem, problems

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


def small_problem(rng: np.random.Generator, S: int = 16, D: int = 32, H: int = 4):
    cache = dh.IndexerKeyCache(num_blocks=12, block_size=S, head_dim=D)
    for s, n in enumerate((70, 33)):
        cache.add_sequence(s)
        cache.append(s, rng.standard_normal((n, D)).astype(np.float32))
    seq = np.array([0, 1, 0])
    pos = np.array([69, 32, 5], np.int32)
    tables = tables_of(cache, seq, width=6)
    q = rng.standard_normal((3, H, D)).astype(np.float32)
    w = (rng.random((3, H)) * H**-0.5).astype(np.float32)
    pages = IndexerPages.from_host_pages(cache.pages(), S, D)
    return cache, pages, q, w, tables, pos


def test_auto_picks_the_kernel_for_fp8_pages_on_a_cpu_only() -> None:
    rng = np.random.default_rng(1)
    cache, pages, q, w, tables, pos = small_problem(rng)

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
    cache, pages, q, w, tables, pos = small_problem(rng)
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


def test_bad_input_gets_errors_naming_the_argument() -> None:
    rng = np.random.default_rng(5)
    cache, pages, q, w, tables, pos = small_problem(rng)
    sel = cpu_kernels.indexer_select_cpu
    c, s = pages.codes, pages.scales
    cases = [
        (lambda: sel(q[0], w, c, s, tables, pos, 8), ValueError, "^q:"),
        (lambda: sel(q.astype(np.int32), w, c, s, tables, pos, 8), TypeError, "^q:"),
        (lambda: sel(q, w[:, :3], c, s, tables, pos, 8), ValueError, "^weights:"),
        (lambda: sel(q, w, c.astype(jnp.float32), s, tables, pos, 8), ValueError, "^codes:"),
        (lambda: sel(q, w, c[..., :16], s, tables, pos, 8), ValueError, "^codes:"),
        (lambda: sel(q, w, c, s[:, :, :8], tables, pos, 8), ValueError, "^scales:"),
        (lambda: sel(q, w, c, s, tables[:2], pos, 8), ValueError, "^block_tables:"),
        (lambda: sel(q, w, c, s, tables.astype(np.float32), pos, 8), ValueError, "^block_tables:"),
        (lambda: sel(q, w, c, s, tables, pos[:2], 8), ValueError, "^positions:"),
        (lambda: sel(q, w, c, s, tables, pos, 0), ValueError, "^k:"),
        (lambda: sel(q, w, c, s, tables, pos, 8, threads=-1), ValueError, "^threads:"),
        (lambda: sel(q, w, c, s, tables, pos, 8, query_dtype="fp16"), ValueError, "^query_dtype:"),
        (lambda: sel(q, w, c[:, :8], s[:, :, :8], tables, pos, 8), ValueError, "^q: the host indexer takes"),
        (lambda: select_topk_device(q, w, ExactIndexerKeys.create(12, 16, 32), tables, pos, 8,
                                    backend="cpu_kernel"), ValueError, "^backend="),
    ]  # fmt: skip
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    # At run time (inside the jitted call): a hole in a row's pages, a page past the pool, a table too
    # narrow, a non-finite query. Nothing is written anywhere, so the pages are unchanged.
    before = pages.to_host_pages()
    hole, past, narrow = tables.copy(), tables.copy(), tables[:, :2].copy()
    hole[0, 2] = -1
    past[0, 1] = 99
    nan_q = q.copy()
    nan_q[1, 0, 0] = np.nan
    for args, match in [
        ((q, w, pages, hole, pos), "block_tables: row 0 needs page 2"),
        ((q, w, pages, past, pos), "block_tables: row 0 needs page 1 .*block 99"),
        ((q, w, pages, narrow, pos), "block_tables: row 0 at position 69 needs 5 pages"),
        ((nan_q, w, pages, tables, pos), "q: non-finite value"),
    ]:
        with pytest.raises(Exception, match=match):
            np.asarray(_kernel(*args, 8))
    np.testing.assert_array_equal(pages.to_host_pages(), before)
    want = cache.select_paged(tables, pos, q, w, 8)
    np.testing.assert_array_equal(np.asarray(_kernel(q, w, pages, tables, pos, 8)), want)


def test_the_handler_checks_what_python_would() -> None:
    """Called directly (the Python checks bypassed), the handler refuses wrong dtypes, shapes and
    attributes with an INVALID_ARGUMENT error that starts with the buffer's or attribute's name."""
    rng = np.random.default_rng(6)
    _, pages, q, w, tables, pos = small_problem(rng)
    cpu_kernels.register()

    def call(*args, k=8, out_dtype=jnp.int32, **attrs):
        attrs = {"quantize": np.int64(1), "bf16": np.int64(0), "threads": np.int64(1)} | attrs
        f = jax.ffi.ffi_call(cpu_kernels.INDEXER_TARGET, jax.ShapeDtypeStruct((3, k), out_dtype))
        return np.asarray(jax.jit(lambda *a: f(*a, **attrs))(*args))

    good = (q, w, pages.codes, pages.scales, tables, pos)
    np.testing.assert_array_equal(call(*good), _kernel(q, w, pages, tables, pos, 8))
    for args, attrs, match in [
        ((q[..., :16], *good[1:]), {}, "codes: expected"),  # rows of 32 codes for queries of 16
        ((q, w, pages.codes.astype(jnp.int32), *good[3:]), {}, "codes: expected dtype uint8"),
        ((q, w, pages.codes, pages.scales[:, :, :8], *good[4:]), {}, "scales: expected"),
        ((q, w[:2], *good[2:]), {}, "weights: expected"),
        ((*good[:4], tables[:2], pos), {}, "block_tables and positions"),
        ((*good[:5], pos.astype(np.float32)), {}, "positions: expected dtype int32"),
        (good, {"quantize": np.int64(2)}, "quantize: expected 0 or 1"),
        (good, {"bf16": np.int64(-1)}, "bf16: expected 0 or 1"),
        (good, {"threads": np.int64(5000)}, "threads: must be in"),
        (good, {"threads": np.float32(1.0)}, "threads: expected a int64 scalar"),
    ]:
        with pytest.raises(Exception, match=match):
            call(*args, **attrs)
    with pytest.raises(Exception, match="out: expected dtype int32"):
        call(*good, out_dtype=jnp.float32)
    with pytest.raises(Exception, match="expected 6 arguments"):
        call(*good[:5])

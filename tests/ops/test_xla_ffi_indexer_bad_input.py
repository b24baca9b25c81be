"""Bad input of the FFI indexer path (`select_topk_device(..., backend="cpu_kernel")`,
`ops.cpu_kernels.indexer_select_cpu`): TypeError / ValueError naming the argument at trace time; at run
time XLA's INVALID_ARGUMENT error naming `block_tables` or `q`, the pages unchanged; and the Rust
handler's own checks, naming the buffer or attribute, when the Python checks are bypassed."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from indexer_problems import small_paged_problem

from dsa_hybrid.ops import cpu_kernels
from dsa_hybrid.ops.cpu_kernels import indexer_kernel_ok, indexer_select_cpu
from dsa_hybrid.ops.indexer import ExactIndexerKeys, select_topk_device

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the FFI kernel is registered for CPU only")

_kernel = jax.jit(functools.partial(select_topk_device, backend="cpu_kernel"), static_argnames=("k",))


def test_widths_the_host_indexer_does_not_take() -> None:
    assert indexer_kernel_ok(16, 64, 64) and indexer_kernel_ok(1, 16, 16) and indexer_kernel_ok(256, 128, 16)
    assert not indexer_kernel_ok(0, 64, 64) and not indexer_kernel_ok(257, 64, 64)  # heads
    assert not indexer_kernel_ok(16, 48, 64) and not indexer_kernel_ok(16, 0, 64)  # head_dim: a power of two
    assert not indexer_kernel_ok(16, 64, 8) and not indexer_kernel_ok(16, 64, 0)  # pages: a multiple of 16 keys
    with pytest.raises(ValueError, match="^query_dtype:"):
        cpu_kernels.indexer_query_bf16("fp8", True)
    assert not cpu_kernels.indexer_query_bf16("float32", True) and cpu_kernels.indexer_query_bf16("bfloat16", False)


def test_bad_input_gets_errors_naming_the_argument() -> None:
    rng = np.random.default_rng(5)
    cache, pages, q, w, tables, pos = small_paged_problem(rng)
    c, s = pages.codes, pages.scales
    cases = [
        (lambda: indexer_select_cpu(q[0], w, c, s, tables, pos, 8), ValueError, "^q:"),
        (lambda: indexer_select_cpu(q.astype(np.int32), w, c, s, tables, pos, 8), TypeError, "^q:"),
        (lambda: indexer_select_cpu(q, w[:, :3], c, s, tables, pos, 8), ValueError, "^weights:"),
        (lambda: indexer_select_cpu(q, w, c.astype(jnp.float32), s, tables, pos, 8), ValueError, "^codes:"),
        (lambda: indexer_select_cpu(q, w, c[..., :16], s, tables, pos, 8), ValueError, "^codes:"),
        (lambda: indexer_select_cpu(q, w, c, s[:, :, :8], tables, pos, 8), ValueError, "^scales:"),
        (lambda: indexer_select_cpu(q, w, c, s, tables[:2], pos, 8), ValueError, "^block_tables:"),
        (lambda: indexer_select_cpu(q, w, c, s, tables.astype(np.float32), pos, 8), ValueError, "^block_tables:"),
        (lambda: indexer_select_cpu(q, w, c, s, tables, pos[:2], 8), ValueError, "^positions:"),
        (lambda: indexer_select_cpu(q, w, c, s, tables, pos, 0), ValueError, "^k:"),
        (lambda: indexer_select_cpu(q, w, c, s, tables, pos, 8, threads=-1), ValueError, "^threads:"),
        (lambda: indexer_select_cpu(q, w, c, s, tables, pos, 8, query_dtype="fp16"), ValueError, "^query_dtype:"),
        (lambda: indexer_select_cpu(q, w, c[:, :8], s[:, :, :8], tables, pos, 8), ValueError, "^q: the host"),
        (lambda: select_topk_device(q, w, pages, tables, pos, 8, query_dtype="fp8"), ValueError, "^query_dtype:"),
        (lambda: select_topk_device(q, w, pages, tables, pos, 8, backend="xla", threads=-2), ValueError, "^threads:"),
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
    _, pages, q, w, tables, pos = small_paged_problem(rng)
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

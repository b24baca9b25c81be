"""`sparse_mla(..., backend="cpu_kernel")`: the Rust sparse-MLA kernel as an XLA FFI custom call inside
`jit` on the CPU backend (ops/cpu_kernels.py, rust/src/ffi.rs), against the XLA path and the float64
oracle (dsa.md §3): −1 / out-of-range / past-`topk_length` slots skipped, empty rows 0 / +inf, the cache
read in place, named errors, and the XLA path's backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_hybrid import _core, testing
from dsa_hybrid import reference as ref
from dsa_hybrid.ops import cpu_kernels
from dsa_hybrid.ops.latent_cache import LatentCache
from dsa_hybrid.ops.sparse_mla import prefix_mla, sparse_mla

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the FFI kernel is registered for CPU only")


def f32_cache(rng: np.random.Generator, pages: int, page_size: int, latent: int, rope: int) -> LatentCache:
    data = (rng.standard_normal((pages, page_size, latent + rope)) / 4).astype(np.float32)
    return LatentCache(jnp.asarray(data), None, None, "f32", latent, rope)


def problem(rng: np.random.Generator, T: int, K: int, N: int) -> np.ndarray:
    """int32 `[T, K]` slots: in range, −1, past the cache (N..N+2), duplicates; row 1 (if any) empty."""
    slots = rng.integers(-1, N + 3, (T, K)).astype(np.int32)
    slots[:, : K // 3] = rng.integers(0, min(N, 5), (T, K // 3))  # duplicates
    if T > 1:
        slots[1] = np.where(rng.random(K) < 0.5, -1, N + 1)
    return slots


def _run(backend: str):
    return jax.jit(
        lambda q, c, s, n, scale, d_v: sparse_mla(q, c, s, scale=scale, d_v=d_v, topk_length=n, backend=backend),
        static_argnames=("scale", "d_v"),
    )


_kernel, _xla = _run("cpu_kernel"), _run("xla")


@pytest.mark.parametrize(
    "T, h, latent, rope, d_v, K, page_size, lengths, q_dtype",
    [
        (1, 8, 128, 32, 128, 256, 64, False, jnp.float32),  # DSAConfig.small() widths, decode
        (5, 16, 64, 16, 40, 70, 8, True, jnp.float32),
        (3, 1, 16, 0, 16, 1, 4, False, jnp.float32),  # no rope part, K = 1
        (17, 3, 32, 8, 8, 33, 16, True, jnp.bfloat16),
        (4, 20, 24, 8, 32, 61, 2, True, jnp.float32),  # d_v past the latent width (into the rope columns)
    ],
)
def test_kernel_matches_the_xla_path_and_the_oracle_under_jit(T, h, latent, rope, d_v, K, page_size, lengths, q_dtype):
    rng = np.random.default_rng(T * 1000 + K)
    cache = f32_cache(rng, 7, page_size, latent, rope)
    N = cache.num_slots
    q = jnp.asarray(rng.standard_normal((T, h, latent + rope)).astype(np.float32), q_dtype)
    slots = problem(rng, T, K, N)
    n = rng.integers(0, K + 1, T).astype(np.int32) if lengths else np.full(T, K, np.int32)
    args = (q, cache, jnp.asarray(slots), jnp.asarray(n))
    out, lse = _kernel(*args, scale=0.3, d_v=d_v)
    x_out, x_lse = _xla(*args, scale=0.3, d_v=d_v)
    assert out.shape == (T, h, d_v) and lse.shape == (T, h) and out.dtype == lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(x_out), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(x_lse), rtol=2e-5, atol=2e-6)
    rows = np.asarray(cache.data, np.float64).reshape(N, -1)
    want_idx = np.where(np.arange(K)[None, :] < n[:, None], slots, -1)
    want_out, want_lse = ref.sparse_mla(np.asarray(q, np.float64), rows, want_idx, 0.3, d_v)
    testing.assert_mla_close(np.asarray(out), np.asarray(lse), want_out, want_lse, dtype=np.float32)
    if T > 1:  # the empty row
        assert np.all(np.asarray(out)[1] == 0) and np.all(np.isposinf(np.asarray(lse)[1]))


def test_auto_calls_the_kernel_on_cpu_for_float32_caches_only() -> None:
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 4, 48)).astype(np.float32))
    slots = jnp.asarray(problem(rng, 2, 9, 32))
    f32 = f32_cache(rng, 4, 8, 32, 16)
    bf16 = LatentCache.create(4, 8, kind="bf16", latent_dim=32, rope_dim=16)

    def hlo(cache: LatentCache, backend: str) -> str:
        f = jax.jit(lambda q, c, s: sparse_mla(q, c, s, scale=0.2, backend=backend))
        return f.lower(q, cache, slots).as_text()

    assert cpu_kernels.TARGET in hlo(f32, "auto")
    assert cpu_kernels.TARGET in hlo(f32, "cpu_kernel")
    assert cpu_kernels.TARGET not in hlo(f32, "xla")  # "xla" stays the XLA formulation
    assert cpu_kernels.TARGET not in hlo(bf16, "auto")
    tables = jnp.asarray([[0, 1, -1], [2, -1, -1]], jnp.int32)
    lengths = jnp.asarray([11, 5], jnp.int32)
    pre = jax.jit(lambda q, c: prefix_mla(q, c, tables, lengths, scale=0.2)).lower(q, f32).as_text()
    assert cpu_kernels.TARGET in pre


def test_the_cache_is_read_in_place() -> None:
    """The kernel reads the latent rows at the address of the cache's own buffer: no copy is made."""
    rng = np.random.default_rng(2)
    cache = f32_cache(rng, 64, 64, 128, 32)  # 4096 slots, 2.6 MB
    q = jnp.asarray(rng.standard_normal((3, 8, 160)).astype(np.float32))
    slots = jnp.asarray(problem(rng, 3, 40, cache.num_slots))
    f = jax.jit(lambda q, c, s: sparse_mla(q, c, s, scale=0.2, backend="cpu_kernel"))
    for _ in range(2):
        jax.block_until_ready(f(q, cache, slots))
        assert _core.ffi_last_kv_address() == cache.data.unsafe_buffer_pointer()
    other = f32_cache(rng, 64, 64, 128, 32)
    jax.block_until_ready(f(q, other, slots))
    assert _core.ffi_last_kv_address() == other.data.unsafe_buffer_pointer()


def test_threads_splits_and_prefix_give_the_same_results() -> None:
    rng = np.random.default_rng(3)
    cache = f32_cache(rng, 6, 8, 64, 16)
    q = jnp.asarray(rng.standard_normal((5, 16, 80)).astype(np.float32))
    slots = jnp.asarray(problem(rng, 5, 24, cache.num_slots))

    def run(backend: str, **kw):
        return jax.jit(lambda q, c, s: sparse_mla(q, c, s, scale=0.25, backend=backend, **kw))(q, cache, slots)

    one, two, split = run("cpu_kernel"), run("cpu_kernel", threads=2), run("cpu_kernel", num_splits=3)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the kernel's bits do not depend on threads
    for a, b in zip(one, split, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    tables = jnp.asarray([[0, 1, 2], [3, -1, -1], [5, 4, 0], [2, 2, -1], [1, 0, 3]], jnp.int32)
    lengths = jnp.asarray([17, 8, 24, 0, 3], jnp.int32)

    def pre(backend: str):
        return jax.jit(lambda q, c: prefix_mla(q, c, tables, lengths, scale=0.25, backend=backend))(q, cache)

    k, x = pre("cpu_kernel"), pre("xla")
    for a, b in zip(k, x, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    assert np.all(np.isposinf(np.asarray(k[1])[3]))


def test_grad_uses_the_xla_backward_and_vmap_runs_per_element() -> None:
    rng = np.random.default_rng(4)
    cache = f32_cache(rng, 3, 8, 16, 8)
    q = jnp.asarray(rng.standard_normal((3, 2, 24)).astype(np.float32))
    slots = jnp.asarray(problem(rng, 3, 10, cache.num_slots))

    def loss(backend: str):
        def f(q, c):
            out, lse = sparse_mla(q, c, slots, scale=0.3, backend=backend)
            return jnp.sum(out * out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

        return jax.jit(jax.grad(f, argnums=(0, 1)))

    (dq_k, dc_k), (dq_x, dc_x) = loss("cpu_kernel")(q, cache), loss("xla")(q, cache)
    np.testing.assert_allclose(np.asarray(dq_k), np.asarray(dq_x), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dc_k.data), np.asarray(dc_x.data), rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(dq_k)).max() > 0
    qs = jnp.stack([q, 2 * q])
    attend = jax.jit(lambda qq: sparse_mla(qq, cache, slots, scale=0.3, backend="cpu_kernel"))
    batched = jax.jit(jax.vmap(attend))(qs)
    for i in range(2):
        one = attend(qs[i])
        np.testing.assert_array_equal(np.asarray(batched[0][i]), np.asarray(one[0]))
        np.testing.assert_array_equal(np.asarray(batched[1][i]), np.asarray(one[1]))

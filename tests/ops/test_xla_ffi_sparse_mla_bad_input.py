"""Bad input of the FFI sparse-MLA path (`sparse_mla(..., backend="cpu_kernel")`, `ops.cpu_kernels`):
TypeError / ValueError naming the argument at trace time, and the Rust handler's own checks (an XLA
INVALID_ARGUMENT error naming the buffer or attribute) when the Python checks are bypassed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_hybrid.ops import cpu_kernels
from dsa_hybrid.ops.latent_cache import LatentCache
from dsa_hybrid.ops.sparse_mla import sparse_mla

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the FFI kernel is registered for CPU only")


def f32_cache(rng: np.random.Generator, pages: int, page_size: int, latent: int, rope: int) -> LatentCache:
    data = (rng.standard_normal((pages, page_size, latent + rope)) / 4).astype(np.float32)
    return LatentCache(jnp.asarray(data), None, None, "f32", latent, rope)


def slots_for(rng: np.random.Generator, T: int, K: int, N: int) -> jax.Array:
    return jnp.asarray(rng.integers(-1, N + 3, (T, K)).astype(np.int32))


def test_bad_input_raises_errors_naming_the_argument() -> None:
    rng = np.random.default_rng(5)
    cache = f32_cache(rng, 2, 8, 16, 8)
    q = jnp.asarray(rng.standard_normal((2, 2, 24)).astype(np.float32))
    slots = slots_for(rng, 2, 5, cache.num_slots)
    bf16 = LatentCache.create(2, 8, kind="bf16", latent_dim=16, rope_dim=8)
    with pytest.raises(ValueError, match="^backend: 'cpu_kernel' needs a float32"):
        sparse_mla(q, bf16, slots, scale=0.3, backend="cpu_kernel")
    with pytest.raises(ValueError, match="^backend:"):
        sparse_mla(q, cache, slots, scale=0.3, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^threads:"):
        sparse_mla(q, cache, slots, scale=0.3, backend="cpu_kernel", threads=-1)
    with pytest.raises(TypeError, match="^threads:"):
        sparse_mla(q, cache, slots, scale=0.3, backend="cpu_kernel", threads=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^q:"):
        sparse_mla(q[:, :, :20], cache, slots, scale=0.3, backend="cpu_kernel")
    with pytest.raises(ValueError, match="^slots:"):
        sparse_mla(q, cache, slots[:1], scale=0.3, backend="cpu_kernel")
    kv = cache.data
    with pytest.raises(TypeError, match="^kv:"):
        cpu_kernels.sparse_mla_cpu(q, kv.astype(jnp.bfloat16), slots, scale=0.3, d_v=16)
    with pytest.raises(ValueError, match="^kv:"):
        cpu_kernels.sparse_mla_cpu(q, kv[..., :20], slots, scale=0.3, d_v=16)
    with pytest.raises(TypeError, match="^slots:"):
        cpu_kernels.sparse_mla_cpu(q, kv, slots.astype(jnp.float32), scale=0.3, d_v=16)
    with pytest.raises(ValueError, match="^d_v:"):
        cpu_kernels.sparse_mla_cpu(q, kv, slots, scale=0.3, d_v=25)
    with pytest.raises(ValueError, match="^scale:"):
        cpu_kernels.sparse_mla_cpu(q, kv, slots, scale=float("nan"), d_v=16)
    # int64 slots: out-of-int32 entries are skipped, the rest read as int32.
    wide = np.asarray(slots, np.int64)
    wide[0, 0] = 2**40
    with jax.enable_x64(True):
        got = cpu_kernels.sparse_mla_cpu(q, kv, jnp.asarray(wide), scale=0.3, d_v=16)
    want = cpu_kernels.sparse_mla_cpu(
        q, kv, jnp.asarray(np.where(wide > 2**31, -1, wide), jnp.int32), scale=0.3, d_v=16
    )
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))


def test_the_handler_refuses_what_the_python_checks_would_have_caught() -> None:
    """Called directly (past the Python checks), the Rust handler still checks every buffer and
    attribute and reports an XLA error naming it, instead of reading out of bounds."""
    cpu_kernels.register()
    q = jnp.zeros((2, 3, 8), jnp.float32)
    kv = jnp.zeros((4, 8), jnp.float32)
    slots = jnp.zeros((2, 5), jnp.int32)

    def call(q, kv, slots, out_shape=(2, 3, 8), lse_shape=(2, 3), **attrs):
        attrs = {"scale": np.float32(0.5), "threads": np.int64(1), **attrs}
        res = (jax.ShapeDtypeStruct(out_shape, jnp.float32), jax.ShapeDtypeStruct(lse_shape, jnp.float32))
        return jax.block_until_ready(jax.ffi.ffi_call(cpu_kernels.TARGET, res)(q, kv, slots, **attrs))

    out, lse = call(q, kv, slots)
    assert np.all(np.asarray(out) == 0)
    np.testing.assert_allclose(np.asarray(lse), np.log(5), rtol=1e-6)  # five zero logits per row
    for args, kw, name in [
        ((q, kv.astype(jnp.int32), slots), {}, "kv:"),
        ((q, jnp.zeros((4, 7), jnp.float32), slots), {}, "kv:"),
        ((q.astype(jnp.bfloat16), kv, slots), {}, "q:"),
        ((q, kv, slots[:1]), {}, "slots:"),
        ((q, kv, slots), {"out_shape": (2, 3, 9)}, "out:"),
        ((q, kv, slots), {"lse_shape": (2, 2)}, "lse:"),
        ((q, kv, slots), {"threads": np.int64(-2)}, "threads:"),
        ((q, kv, slots), {"scale": np.int32(1)}, "scale:"),
        ((q, kv, slots), {"scale": np.float32(np.inf)}, "scale:"),
    ]:
        with pytest.raises(jax.errors.JaxRuntimeError, match=f"INVALID_ARGUMENT: {name}"):
            call(*args, **kw)


def test_target_is_cpu_takes_any_pytrees() -> None:
    """Like `ops.target_device`: only concrete jax.Array leaves count; anything else is ignored."""
    assert cpu_kernels.target_is_cpu("not an array", 3, {"a": None}) is True
    assert cpu_kernels.target_is_cpu(jnp.zeros(2)) is True
    with jax.default_device(jax.devices("cpu")[0]):
        assert cpu_kernels.target_is_cpu() is True

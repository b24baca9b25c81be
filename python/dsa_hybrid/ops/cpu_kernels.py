"""The Rust core's fused sparse-MLA CPU kernel inside `jit`: an XLA FFI custom call on the CPU backend.

`sparse_mla_cpu(q, kv, slots, scale=..., d_v=...)` runs `dsa_hybrid.host.sparse_mla_host`'s kernel
(rust/src/mla.rs) as the custom call `dsa_hybrid_sparse_mla_f32` (rust/src/ffi.rs): XLA hands the kernel
its own buffers, so the latent rows are read where XLA keeps them (no copy of the cache, no Python
callback, no host round trip) and `out` / `lse` are written into XLA's result buffers. It is what
`ops.sparse_mla.sparse_mla(..., backend="cpu_kernel")` calls, and what `backend="auto"` picks when the
target is a CPU and the cache is a float32 `LatentCache`.

The handler is registered with XLA for platform "cpu" on first use (`register`). This module is the one
place in `ops` that loads the extension `dsa_hybrid._core` (for the handler's PyCapsule); it imports
nothing else of the host side.

Transformations: `jax.vmap` runs the call once per batch element (`vmap_method="sequential"`); the call
has no derivative of its own (`ops.sparse_mla` gives its kernel path the XLA path's backward).
"""

from __future__ import annotations

import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsa_hybrid import _core
from dsa_hybrid.ops.checks import check_int, check_scale
from dsa_hybrid.ops.target import target_device

TARGET = "dsa_hybrid_sparse_mla_f32"
_MAX_THREADS = 1024
_lock = threading.Lock()
_registered = False


def register() -> None:
    """Register the Rust core's XLA FFI handlers for platform "cpu" (`jax.ffi.register_ffi_target`,
    api_version 1). Idempotent and thread-safe; called on first use by `sparse_mla_cpu`."""
    global _registered
    with _lock:
        if _registered:
            return
        for name, capsule in _core.ffi_targets().items():
            jax.ffi.register_ffi_target(name, capsule, platform="cpu", api_version=1)
        _registered = True


def target_is_cpu(*args: Any) -> bool:
    """Whether the computation on `args` targets the CPU backend (`ops.target.target_device`: the concrete
    arguments' device, else the mesh / default device in context)."""
    dev = target_device(*args)
    platform = getattr(dev, "platform", None)
    if platform is not None:
        return bool(platform == "cpu")
    return str(getattr(dev, "device_kind", "")).lower() == "cpu"


def sparse_mla_cpu(
    q: jax.Array, kv: jax.Array, slots: jax.Array, *, scale: float, d_v: int, threads: int = 1
) -> tuple[jax.Array, jax.Array]:
    """Sparse MLA attention (dsa.md §3) by the Rust kernel, as an XLA custom call (CPU backend only).

    Args:
        q: `[T, h, D]` absorbed queries, float32 or bfloat16 (widened to float32 exactly).
        kv: float32 latent rows `[..., D]`: `[N, D]`, or a float32 `LatentCache`'s `data`
            `[num_pages, page_size, D]` (row `slot` = `page · page_size + offset`), read in place.
        slots: int32 `[T, K]` rows of `kv` per query token; entries < 0 or ≥ N are skipped.
        scale: the softmax scale, finite and > 0. d_v: value width, the first `d_v` columns, in `[1, D]`.
        threads: the kernel's worker threads: 1 (default) runs on XLA's calling thread, `n` on a pool of
            `n` (0: one per core), at most 1024.

    Returns `(out float32 [T, h, d_v], lse float32 [T, h])`: a row with no valid slot has `out = 0` and
    `lse = +inf`. Jit-able (`scale`, `d_v`, `threads` static). Raises TypeError / ValueError naming the
    argument for a wrong dtype, shape, `scale`, `d_v` or `threads` (at trace time).
    """
    if q.ndim != 3:
        raise ValueError(f"q: expected [T, h, D], got {list(q.shape)}")
    if q.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(f"q: expected float32 or bfloat16, got {q.dtype}")
    T, h, D = q.shape
    if kv.ndim < 2 or kv.shape[-1] != D:
        raise ValueError(f"kv: expected float32 rows [..., {D}] (q's width), got {list(kv.shape)}")
    if kv.dtype != jnp.float32:
        raise TypeError(f"kv: expected float32, got {kv.dtype}")
    if slots.ndim != 2 or slots.shape[0] != T:
        raise ValueError(f"slots: expected [{T}, K], got {list(slots.shape)}")
    if not jnp.issubdtype(slots.dtype, jnp.integer):
        raise TypeError(f"slots: expected integers, got {slots.dtype}")
    scale = check_scale("scale", scale)
    d_v = check_int("d_v", d_v, 1, D)
    threads = check_int("threads", threads, 0, _MAX_THREADS)
    if slots.dtype != jnp.int32:
        # Wider integers: entries outside int32 are out of range anyway (skipped as −1).
        n_rows = min(int(np.prod(kv.shape[:-1], dtype=np.int64)), 2**31 - 1)
        in_range = (slots >= 0) & (slots < n_rows)
        slots = jnp.where(in_range, slots, -1).astype(jnp.int32)
    register()
    call = jax.ffi.ffi_call(
        TARGET,
        (jax.ShapeDtypeStruct((T, h, d_v), jnp.float32), jax.ShapeDtypeStruct((T, h), jnp.float32)),
        vmap_method="sequential",
    )
    out, lse = call(q.astype(jnp.float32), kv, slots, scale=np.float32(scale), threads=np.int64(threads))
    return out, lse


__all__: list[str] = ["TARGET", "register", "sparse_mla_cpu", "target_is_cpu"]

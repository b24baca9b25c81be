"""The Rust core's CPU kernels inside `jit`: XLA FFI custom calls on the CPU backend.

Two kernels: the fused sparse MLA attention (`sparse_mla_cpu`) and the indexer's score + top-k over
the device's FP8 pages (`indexer_select_cpu`).

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

`indexer_select_cpu(q, weights, codes, scales, block_tables, positions, k)` runs the host indexer's
`select_paged` (rust/src/select.rs: Hadamard rotation and FP8 quantization of the queries, the SIMD
scoring kernels, the top-k) as the custom call `dsa_hybrid_indexer_select` on an `IndexerPages`' two
arrays, read in place: what `ops.indexer.select_topk_device(..., backend="cpu_kernel")` calls, and what
its "auto" picks for FP8 pages on a CPU target. Its selections are the host placement's bit for bit.
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
INDEXER_TARGET = "dsa_hybrid_indexer_select"
# The host indexer's limits (rust/src/score.rs MAX_HEADS, rust/src/indexer_cache.rs page sizes).
INDEXER_MAX_HEADS = 256
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


def indexer_kernel_ok(heads: int, head_dim: int, page_size: int) -> bool:
    """Whether `indexer_select_cpu` takes these widths: up to 256 heads, a power-of-two `head_dim`, a
    page size that is a positive multiple of 16 (the host cache's own rule)."""
    return (
        1 <= heads <= INDEXER_MAX_HEADS
        and head_dim > 0
        and head_dim & (head_dim - 1) == 0
        and page_size > 0
        and page_size % 16 == 0
    )


def indexer_query_bf16(query_dtype: str, quantize: bool) -> bool:
    """Whether the host indexer scores in bfloat16 for `query_dtype` ("auto", "float32", "bfloat16"):
    "auto" is bf16 for FP8-quantized queries where this CPU runs it faster
    (`cpu_features()["indexer_query_dtype"]`, which `DSA_HYBRID_QUERY_DTYPE` pins), as `select_paged`'s."""
    if query_dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"query_dtype: expected 'auto', 'float32' or 'bfloat16', got {query_dtype!r}")
    if query_dtype == "auto":
        return quantize and _core.cpu_features()["indexer_query_dtype"] == "bfloat16"
    return query_dtype == "bfloat16"


def indexer_select_cpu(
    q: jax.Array,
    weights: jax.Array,
    codes: jax.Array,
    scales: jax.Array,
    block_tables: jax.Array,
    positions: jax.Array,
    k: int,
    *,
    quantize_queries: bool = True,
    query_dtype: str = "auto",
    threads: int = 1,
) -> jax.Array:
    """The indexer's top-`k` per query row (dsa.md §4, §5) by the Rust core, as an XLA custom call (CPU
    backend only): exactly `IndexerKeyCache.select_paged` on the same pages.

    Args:
        q: `[T, H, D]` post-RoPE indexer queries (float32, or a float widened to it); weights: `[T, H]`
            head weights (× H^-0.5). The kernel rotates (and with `quantize_queries` FP8-quantizes) them.
        codes: uint8 `[P, S, D]`, scales: float32 `[P, 1, S]`: an `IndexerPages`' arrays, read in place.
        block_tables: int32 `[T, W]` (−1 padded); positions: int32 `[T]`, row `t` sees keys `0 ..
            positions[t]`. A padding row (negative position, or a table starting with −1) selects nothing.
        k: entries per row. query_dtype: "auto" (as the host's), "float32" or "bfloat16".
        threads: worker threads (1, the default: XLA's calling thread; 0 one per core; at most 1024).

    Returns int32 `[T, k]` positions, ascending, −1 padded. Jit-able (`k`, `quantize_queries`,
    `query_dtype`, `threads` static). TypeError / ValueError naming the argument for a wrong dtype,
    shape or option at trace time; at run time a page a row needs that is −1 (after its first) or
    outside `[0, P)`, or a non-finite query, fails the call with the argument's name in the message.
    """
    if q.ndim != 3:
        raise ValueError(f"q: expected [T, H, D], got {list(q.shape)}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"q: expected floats, got {q.dtype}")
    T, H, D = q.shape
    if weights.shape != (T, H) or not jnp.issubdtype(weights.dtype, jnp.floating):
        raise ValueError(f"weights: expected floats [{T}, {H}], got {weights.dtype} {list(weights.shape)}")
    if codes.ndim != 3 or codes.shape[2] != D or codes.dtype != jnp.uint8:
        raise ValueError(f"codes: expected uint8 [pages, page_size, {D}], got {codes.dtype} {list(codes.shape)}")
    P, S = codes.shape[:2]
    if scales.shape != (P, 1, S) or scales.dtype != jnp.float32:
        raise ValueError(f"scales: expected float32 [{P}, 1, {S}], got {scales.dtype} {list(scales.shape)}")
    if block_tables.ndim != 2 or block_tables.shape[0] != T or not jnp.issubdtype(block_tables.dtype, jnp.integer):
        got = f"{block_tables.dtype} {list(block_tables.shape)}"
        raise ValueError(f"block_tables: expected integers [{T}, W], got {got}")
    if positions.shape != (T,) or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"positions: expected integers [{T}], got {positions.dtype} {list(positions.shape)}")
    if not indexer_kernel_ok(H, D, S):
        raise ValueError(
            f"q: the host indexer takes 1-{INDEXER_MAX_HEADS} heads, a power-of-two head_dim and pages of a "
            f"multiple of 16 keys; got {H} heads, head_dim {D}, page_size {S}"
        )
    k = check_int("k", k, 1)
    threads = check_int("threads", threads, 0, _MAX_THREADS)
    bf16 = indexer_query_bf16(query_dtype, quantize_queries)
    if block_tables.dtype != jnp.int32:  # wider entries past the pages stay past them (refused)
        block_tables = jnp.where(block_tables < 0, -1, jnp.minimum(block_tables, P))
    if positions.dtype != jnp.int32:  # past int32 no table is wide enough (refused)
        positions = jnp.clip(positions, -1, 2**31 - 1)
    register()
    call = jax.ffi.ffi_call(INDEXER_TARGET, jax.ShapeDtypeStruct((T, k), jnp.int32), vmap_method="sequential")
    return call(
        q.astype(jnp.float32),
        weights.astype(jnp.float32),
        codes,
        scales,
        block_tables.astype(jnp.int32),
        positions.astype(jnp.int32),
        quantize=np.int64(quantize_queries),
        bf16=np.int64(bf16),
        threads=np.int64(threads),
    )


__all__: list[str] = [
    "INDEXER_TARGET",
    "TARGET",
    "indexer_kernel_ok",
    "indexer_query_bf16",
    "indexer_select_cpu",
    "register",
    "sparse_mla_cpu",
    "target_is_cpu",
]

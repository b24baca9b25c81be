"""`sparse_mla`: attention of each query token over its own top-k latent entries (dsa.md §3), on the device.

Backends: `"xla"` (gather + einsum; runs on CPU, GPU and TPU), `"pallas_tpu"` (the TPU kernel) and
`"cpu_kernel"` (the Rust core's fused CPU kernel as an XLA FFI custom call, `ops.cpu_kernels`: a CPU
target and a float32 `LatentCache`, read in place); `"auto"` picks Pallas when the target is a TPU, the
CPU kernel when the target is a CPU and the cache is float32 ("f32"), and XLA otherwise. The target is
the device the call is built for (`ops.target`: the arguments' devices when concrete, else the mesh /
default device), not the process's backend, so a CPU host compiles the Pallas path for a TPU ahead of
time. All compute `reference.sparse_mla`:
invalid slots (−1, ≥ the cache's slot count, or past a row's `topk_length`) are skipped; a row with no
valid slot returns `out = 0` and `lse = +inf`; the order of a row's slots does not matter.

Training: the XLA path of `sparse_mla` (and `sparse_attention`, the same attention over a plain row
array) has a memory-lean backward (`jax.custom_vjp`): the forward saves only `q`, the slots, `out` and
`lse`; the backward gathers each block of rows again and recomputes the softmax from the saved LSE, as
FlashMLA's backward does, instead of keeping every gathered row and intermediate as plain autodiff
would. Gradients flow to `q` and to the latent rows (a float32 `LatentCache` or the row array; bf16 /
FP8 caches hold integer words and get none); invalid entries get no gradient, empty rows zero
gradients; a slot selected twice receives both contributions. The `"cpu_kernel"` path has the same
backward (its forward saves the same residuals), so differentiating it gives the XLA path's gradients.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp

from dsa_hybrid.ops import cpu_kernels
from dsa_hybrid.ops.checks import check_array, check_int, check_scale
from dsa_hybrid.ops.latent_cache import LatentCache
from dsa_hybrid.ops.target import resolve_backend, target_device_kind

Backend = Literal["auto", "xla", "pallas_tpu", "cpu_kernel"]
_HIGHEST = jax.lax.Precision.HIGHEST
# Rows gathered per XLA block: keep the float32 gather under ~128 MiB.
_GATHER_BUDGET = 1 << 25
# The backward gathers each block again and also builds its row gradients: smaller blocks (~32 MiB of
# float32 rows), so its transient memory stays a fraction of the forward's.
_BACKWARD_BUDGET = 1 << 23


def sparse_mla(
    q: jax.Array,
    cache: LatentCache,
    slots: jax.Array,
    *,
    scale: float,
    d_v: int | None = None,
    topk_length: jax.Array | None = None,
    backend: Backend = "auto",
    num_splits: int = 1,
    interpret: Any = False,
    threads: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Sparse MLA attention in absorbed form over a paged latent cache.

    Args:
        q: `[T, h, width]` absorbed queries `[q_nope·W_UK | q_pe]` (width = latent_dim + rope_dim, 576 for
            DeepSeek-V3.2), float32 or bfloat16. `T` flattens batch × tokens: decode, prefill and mixed
            batches share one call.
        cache: the `LatentCache` (bf16 or FP8).
        slots: int32 `[T, K]` cache slots of each row's selected tokens (e.g. `IndexerKeyCache.select(...,
            as_slots=True)` with the latent cache paged like the indexer cache).
        scale: softmax scale (`DSAConfig.softmax_scale`; 0.1352338 for DeepSeek-V3.2, not 576^-0.5).
        d_v: value width, the first `d_v` columns of a row (default: `cache.latent_dim`).
        topk_length: optional int32 `[T]`: row `t` uses only its first `topk_length[t]` slots.
        backend: "auto", "xla", "pallas_tpu" or "cpu_kernel" (module docstring; "cpu_kernel" needs a CPU
            target and a float32 cache, else ValueError / RuntimeError).
        num_splits: split each row's K slots into this many slices, attend to each as its own row, and
            merge the results by their LSE (exact up to rounding). For few-token long-context decode on
            TPU: more independent grid steps for the cores to share. K must divide evenly.
        interpret: for "pallas_tpu" off a TPU: `True` or `pltpu.InterpretParams(...)` runs the kernel in
            TPU interpret mode (slow; for tests). Without it, "pallas_tpu" needs a TPU.
        threads: the "cpu_kernel" path's worker threads (1, the default, runs on XLA's calling thread; 0:
            one per core; at most 1024); the other paths ignore it.

    Returns `(out float32 [T, h, d_v], lse float32 [T, h])`, `lse` the natural-log sum of exp of the scaled
    logits. Jit-able (`scale`, `d_v`, `backend` and `threads` static).
    """
    d_v = _check_query(q, cache, d_v, scale)
    _check_slots(q, slots, topk_length)
    threads = _check_threads(threads)
    if num_splits != 1:
        T, K = slots.shape
        if check_int("num_splits", num_splits, 1) < 1 or K % num_splits:
            raise ValueError(f"num_splits: must be >= 1 and divide K = {K}, got {num_splits}")
        valid = valid_mask(cache, slots, topk_length)
        split_slots = jnp.where(valid, slots, -1).reshape(T * num_splits, K // num_splits)
        out, lse = sparse_mla(
            jnp.repeat(q, num_splits, axis=0), cache, split_slots, scale=scale, d_v=d_v, backend=backend,
            interpret=interpret, threads=threads,
        )  # fmt: skip
        return merge_splits(out.reshape(T, num_splits, *out.shape[1:]), lse.reshape(T, num_splits, -1))
    chosen = _resolve_backend(backend, interpret, q, cache, slots)
    if chosen == "cpu_kernel":
        valid = valid_mask(cache, slots, topk_length)
        return _kernel_attention(float(scale), d_v, threads, q, cache, slots, valid)
    if chosen == "xla":
        return _sparse_mla_xla(q, cache, slots, topk_length, scale, d_v)
    from dsa_hybrid.ops.tpu import sparse_mla as sparse_attention_tpu

    return sparse_attention_tpu.sparse_mla_tpu(q, cache, slots, topk_length, scale=scale, d_v=d_v, interpret=interpret)


def merge_splits(out: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Combine attention over disjoint slices of a row's slots: `out` `[T, S, h, d_v]`, `lse` `[T, S, h]`
    (+inf marks an empty slice) → `[T, h, d_v]`, `[T, h]`, with the empty-row convention kept."""
    present = jnp.isfinite(lse)
    m = jnp.max(jnp.where(present, lse, -jnp.inf), axis=1, keepdims=True)  # [T, 1, h]
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(present, jnp.exp(jnp.where(present, lse, 0.0) - m), 0.0)  # [T, S, h]
    total = w.sum(axis=1)  # [T, h]
    empty = total == 0.0
    safe = jnp.where(empty, 1.0, total)
    merged = jnp.einsum("tsh,tshv->thv", w, out) / safe[..., None]
    return merged, jnp.where(empty, jnp.inf, jnp.log(safe) + m[:, 0])


def _check_query(q: Any, cache: Any, d_v: int | None, scale: Any = 1.0) -> int:
    """Check the cache, `q`, `d_v` and `scale` of an attention call; returns `d_v` (default: the latent width)."""
    if not isinstance(cache, LatentCache):
        raise TypeError(f"cache: expected a LatentCache, got {type(cache).__name__}")
    check_array("q", q)
    check_scale("scale", scale)
    d_v = cache.latent_dim if d_v is None else check_int("d_v", d_v, -(2**31), 2**31 - 1)
    if q.ndim != 3 or q.shape[2] != cache.width:
        raise ValueError(f"q: expected [T, h, {cache.width}], got {list(q.shape)}")
    if q.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(f"q: expected float32 or bfloat16, got {q.dtype}")
    if not 0 < d_v <= cache.width:
        raise ValueError(f"d_v: must be in (0, {cache.width}], got {d_v}")
    return d_v


def _check_slots(q: Any, slots: Any, topk_length: Any) -> None:
    check_array("slots", slots)
    if topk_length is not None:
        check_array("topk_length", topk_length)
    if slots.ndim != 2 or slots.shape[0] != q.shape[0] or slots.shape[1] < 1:
        raise ValueError(f"slots: expected [{q.shape[0]}, K] with K >= 1, got {list(slots.shape)}")
    if not jnp.issubdtype(slots.dtype, jnp.integer):
        raise TypeError(f"slots: expected integers, got {slots.dtype}")
    if topk_length is not None and (
        topk_length.shape != (q.shape[0],) or not jnp.issubdtype(topk_length.dtype, jnp.integer)
    ):
        raise ValueError(
            f"topk_length: expected integers of shape [{q.shape[0]}], got {topk_length.dtype} {list(topk_length.shape)}"
        )


def valid_mask(cache: LatentCache, slots: jax.Array, topk_length: jax.Array | None) -> jax.Array:
    """bool `[T, K]`: which entries of `slots` attend (in range, and within `topk_length`)."""
    valid = (slots >= 0) & (slots < cache.num_slots)
    if topk_length is not None:
        valid &= jnp.arange(slots.shape[1])[None, :] < topk_length[:, None]
    return valid


def attend(q: jax.Array, rows: jax.Array, valid: jax.Array, scale: float, d_v: int) -> tuple[jax.Array, jax.Array]:
    """Softmax attention of `q` `[T, h, D]` over `rows` `[T, K, D]` where `valid` `[T, K]`, in `rows`'s
    dtype (float32; float64 for the gradient checks)."""
    logits = scale * jnp.einsum("thd,tkd->thk", q.astype(rows.dtype), rows, precision=_HIGHEST)
    logits = jnp.where(valid[:, None, :], logits, -jnp.inf)
    m = logits.max(axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # empty rows: every logit is −inf
    p = jnp.exp(logits - m)
    denom = p.sum(axis=-1)
    empty = denom == 0.0
    safe = jnp.where(empty, 1.0, denom)
    out = jnp.einsum("thk,tkv->thv", p, rows[..., :d_v], precision=_HIGHEST) / safe[..., None]
    lse = jnp.where(empty, jnp.inf, jnp.log(safe) + m[..., 0])
    return out, lse


def _sparse_mla_xla(
    q: jax.Array, cache: LatentCache, slots: jax.Array, topk_length: jax.Array | None, scale: float, d_v: int
) -> tuple[jax.Array, jax.Array]:
    valid = valid_mask(cache, slots, topk_length)
    return _lean_attention(float(scale), d_v, q, cache, slots, valid)


def sparse_attention(
    q: jax.Array,
    kv: jax.Array,
    indices: jax.Array,
    *,
    scale: float,
    d_v: int | None = None,
    topk_length: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`sparse_mla`'s XLA path over a plain row array instead of a paged cache, for training.

    Args:
        q: `[T, h, D]` absorbed queries, float32, bfloat16 or (with x64 enabled) float64.
        kv: `[N, D]` latent rows `[c_kv | k_pe]`, float32 or float64 (computation runs in the wider of
            float32 and `q`'s / `kv`'s dtype).
        indices: int `[T, K]` rows of `kv` each query attends to; −1 or ≥ N are skipped.
        scale: the softmax scale; d_v: value width, the first `d_v` columns (default `D`).
        topk_length: optional int `[T]`: row `t` uses only its first `topk_length[t]` entries.

    Returns `(out [T, h, d_v], lse [T, h])` as `sparse_mla` (an empty row: 0 and +inf). Differentiable in
    `q` and `kv` with the memory-lean backward (module docstring). Jit-able (`scale`, `d_v` static).
    """
    if q.ndim != 3 or kv.ndim != 2 or q.shape[2] != kv.shape[1]:
        raise ValueError(f"q, kv: expected [T, h, D] and [N, D], got {list(q.shape)} and {list(kv.shape)}")
    if not jnp.issubdtype(q.dtype, jnp.floating) or not jnp.issubdtype(kv.dtype, jnp.floating):
        raise TypeError(f"q, kv: expected floating dtypes, got {q.dtype} and {kv.dtype}")
    d_v = kv.shape[1] if d_v is None else d_v
    if not 0 < d_v <= kv.shape[1]:
        raise ValueError(f"d_v: must be in (0, {kv.shape[1]}], got {d_v}")
    if indices.ndim != 2 or indices.shape[0] != q.shape[0] or not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(
            f"indices: expected integers of shape [{q.shape[0]}, K], got {indices.dtype} {list(indices.shape)}"
        )
    _check_slots(q, indices, topk_length)
    valid = (indices >= 0) & (indices < kv.shape[0])
    if topk_length is not None:
        valid &= jnp.arange(indices.shape[1])[None, :] < topk_length[:, None]
    return _lean_attention(float(scale), d_v, q, kv, indices, valid)


# ----- the memory-lean custom VJP (shared by `sparse_mla`'s XLA path and `sparse_attention`) --------
# `src` is a plain `[N, D]` row array or a `LatentCache` (a pytree argument: a float32 cache gets the
# gradient of its rows, other formats none). The static arguments come first (nondiff_argnums).
Rows = Any  # jax.Array | LatentCache


def _gather(src: Rows, slots: jax.Array, acc: Any) -> jax.Array:
    """Rows of `slots` (out-of-range entries read row 0; the caller masks them), in dtype `acc`."""
    if isinstance(src, LatentCache):
        return src.rows(slots, acc)
    src = jnp.asarray(src)
    return src[jnp.clip(slots, 0, src.shape[0] - 1)].astype(acc)


def _acc_dtype(q: jax.Array, src: Rows) -> Any:
    dtypes = [q.dtype] + ([] if isinstance(src, LatentCache) else [jnp.asarray(src).dtype])
    return jnp.dtype(jnp.float64 if jnp.float64 in dtypes else jnp.float32)


def _block_rows(T: int, K: int, D: int, budget: int | None = None) -> int:
    """Query rows gathered per block: keep one gathered block under `budget` elements (default
    `_GATHER_BUDGET`)."""
    budget = _GATHER_BUDGET if budget is None else budget
    return max(1, min(T, budget // max(1, K * D)))


def _blocked(a: jax.Array, block: int) -> jax.Array:
    pad = -a.shape[0] % block
    return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(-1, block, *a.shape[1:])


def _lean_forward(scale, d_v, q, src, slots, valid):
    T, h, D = q.shape
    K = slots.shape[1]
    acc = _acc_dtype(q, src)
    block = _block_rows(T, K, D)
    if block >= T:
        return attend(q.astype(acc), _gather(src, slots, acc), valid, scale, d_v)
    # Long prefills: gather and attend `block` tokens at a time.
    qb, sb, vb = _blocked(q, block), _blocked(slots, block), _blocked(valid, block)
    out, lse = jax.lax.map(lambda a: attend(a[0].astype(acc), _gather(src, a[1], acc), a[2], scale, d_v), (qb, sb, vb))
    return out.reshape(-1, h, d_v)[:T], lse.reshape(-1, h)[:T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _lean_attention(scale, d_v, q, src, slots, valid):
    return _lean_forward(scale, d_v, q, src, slots, valid)


def _lean_fwd(scale, d_v, q, src, slots, valid):
    out, lse = _lean_forward(scale, d_v, q, src, slots, valid)
    # Residuals: the inputs (no copies) and the outputs; no gathered rows, no probabilities.
    return (out, lse), (q, src, slots, valid, out, lse)


def _block_grads(scale, d_v, src, q, slots, valid, out, lse, d_out, d_lse):
    """One block's `dq` `[B, h, D]` and row gradients `[B, K, D]` (zero at invalid entries)."""
    acc = _acc_dtype(q, src)
    rows = _gather(src, slots, acc)
    qf = q.astype(acc)
    logits = scale * jnp.einsum("thd,tkd->thk", qf, rows, precision=_HIGHEST)
    live = valid[:, None, :] & jnp.isfinite(lse)[..., None]  # empty rows (lse = +inf) get nothing
    p = jnp.where(live, jnp.exp(jnp.where(live, logits - lse[..., None], 0.0)), 0.0)
    d_out, d_lse = d_out.astype(acc), d_lse.astype(acc)
    dp = jnp.einsum("thv,tkv->thk", d_out, rows[..., :d_v], precision=_HIGHEST)
    delta = jnp.sum(d_out * out.astype(acc), axis=-1)  # [B, h]: Σ_v dO · O, FlashAttention's D
    ds = p * (dp - delta[..., None] + jnp.where(jnp.isfinite(d_lse), d_lse, 0.0)[..., None])
    dq = scale * jnp.einsum("thk,tkd->thd", ds, rows, precision=_HIGHEST)
    d_rows = scale * jnp.einsum("thk,thd->tkd", ds, qf, precision=_HIGHEST)
    d_rows = d_rows.at[..., :d_v].add(jnp.einsum("thk,thv->tkv", p, d_out, precision=_HIGHEST))
    return dq, jnp.where(valid[..., None], d_rows, 0.0)


def _lean_bwd(scale, d_v, res, cts):
    q, src, slots, valid, out, lse = res
    d_out, d_lse = cts
    T, h, D = q.shape
    K = slots.shape[1]
    is_cache = isinstance(src, LatentCache)
    trainable = not is_cache or src.kind == "f32"  # bf16 / FP8 caches hold integer words: no gradient
    data = src.data if is_cache else jnp.asarray(src)
    n_rows = src.num_slots if is_cache else data.shape[0]

    def scatter(d_data: jax.Array, s: jax.Array, v: jax.Array, g: jax.Array) -> jax.Array:
        idx = jnp.where(v, s, n_rows).reshape(-1)  # invalid entries are dropped
        return d_data.at[idx].add(g.reshape(-1, D).astype(d_data.dtype), mode="drop")

    d_data0 = jnp.zeros((n_rows, D), data.dtype if trainable else jnp.float32)
    block = _block_rows(T, K, D, _BACKWARD_BUDGET)
    if block >= T:
        dq, d_rows = _block_grads(scale, d_v, src, q, slots, valid, out, lse, d_out, d_lse)
        d_data = scatter(d_data0, slots, valid, d_rows) if trainable else None
    else:
        xs = tuple(_blocked(a, block) for a in (q, slots, valid, out, lse, d_out, d_lse))

        def step(d_data: jax.Array, a: tuple) -> tuple[jax.Array, jax.Array]:
            qb, sb, vb, ob, lb, dob, dlb = a
            dqb, d_rows = _block_grads(scale, d_v, src, qb, sb, vb, ob, lb, dob, dlb)
            return (scatter(d_data, sb, vb, d_rows) if trainable else d_data), dqb

        d_data, dq = jax.lax.scan(step, d_data0, xs)
        dq = dq.reshape(-1, h, D)[:T]
        d_data = d_data if trainable else None
    d_src = None
    if d_data is not None:
        d_data = d_data.reshape(data.shape)
        d_src = dataclasses.replace(src, data=d_data) if is_cache else d_data
    return dq.astype(q.dtype), d_src, None, None


_lean_attention.defvjp(_lean_fwd, _lean_bwd)


# ----- the "cpu_kernel" path: the Rust kernel forward (an XLA FFI call), the lean backward -----------
def _kernel_forward(scale, d_v, threads, q, cache, slots, valid):
    rows = jnp.where(valid, slots, -1).astype(jnp.int32)
    return cpu_kernels.sparse_mla_cpu(q, cache.data, rows, scale=scale, d_v=d_v, threads=threads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _kernel_attention(scale, d_v, threads, q, cache, slots, valid):
    return _kernel_forward(scale, d_v, threads, q, cache, slots, valid)


def _kernel_fwd(scale, d_v, threads, q, cache, slots, valid):
    out, lse = _kernel_forward(scale, d_v, threads, q, cache, slots, valid)
    return (out, lse), (q, cache, slots, valid, out, lse)


def _kernel_bwd(scale, d_v, threads, res, cts):
    return _lean_bwd(scale, d_v, res, cts)


_kernel_attention.defvjp(_kernel_fwd, _kernel_bwd)


def _check_threads(threads: Any) -> int:
    return check_int("threads", threads, 0, 1024)


def prefix_mla(
    q: jax.Array,
    cache: LatentCache,
    block_tables: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    d_v: int | None = None,
    backend: Backend = "auto",
    interpret: Any = False,
    threads: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """The dense-prefix fast path: row `t` attends over positions `0 .. lengths[t] − 1` of its sequence,
    whose pages are `block_tables[t]` (int32 `[T, max_pages]`, −1 padded). This is `sparse_mla` with the
    selection of dsa.md §5 when `p_t + 1 ≤ K` (every visible token), read page by page instead of row by
    row. `lengths` int32 `[T]` (0 gives `out = 0`, `lse = +inf`). Other arguments as in `sparse_mla`."""
    d_v = _check_query(q, cache, d_v, scale)
    threads = _check_threads(threads)
    T = q.shape[0]
    check_array("block_tables", block_tables)
    check_array("lengths", lengths)
    if block_tables.ndim != 2 or block_tables.shape[0] != T or not jnp.issubdtype(block_tables.dtype, jnp.integer):
        raise ValueError(
            f"block_tables: expected integers of shape [{T}, max_pages], "
            f"got {block_tables.dtype} {list(block_tables.shape)}"
        )
    if lengths.shape != (T,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths: expected integers of shape [{T}], got {lengths.dtype} {list(lengths.shape)}")
    chosen = _resolve_backend(backend, interpret, q, cache, block_tables)
    if chosen == "pallas_tpu":
        from dsa_hybrid.ops.tpu import sparse_mla as sparse_attention_tpu

        return sparse_attention_tpu.prefix_mla_tpu(
            q, cache, block_tables, lengths, scale=scale, d_v=d_v, interpret=interpret
        )
    S = cache.page_size
    positions = jnp.arange(block_tables.shape[1] * S)
    pages = jnp.clip(block_tables, 0, cache.num_pages - 1)
    slots = (pages[:, :, None] * S + jnp.arange(S)[None, None, :]).reshape(T, -1)
    valid = (positions[None, :] < lengths[:, None]) & (jnp.repeat(block_tables, S, axis=1) >= 0)
    if chosen == "cpu_kernel":
        return _kernel_attention(float(scale), d_v, threads, q, cache, slots, valid)
    return attend(q, cache.rows(slots), valid, scale, d_v)


def _resolve_backend(backend: str, interpret: Any, q: Any, cache: LatentCache, *args: Any) -> str:
    """ "xla", "pallas_tpu" or "cpu_kernel" for a `backend` argument. "auto": Pallas when the *target* is a
    TPU (`ops.target`), the CPU kernel when it is a CPU and `cache` is float32 (without `interpret`), XLA
    otherwise; the Pallas kernels need a TPU target unless `interpret` asks for the simulator; "cpu_kernel"
    needs a CPU target (RuntimeError) and a float32 cache (ValueError)."""
    if backend == "cpu_kernel":
        if cache.kind != "f32":
            raise ValueError(
                f"backend: 'cpu_kernel' needs a float32 LatentCache (kind 'f32'), got kind {cache.kind!r}; "
                "use backend='xla' for bf16 / FP8 caches"
            )
        if not cpu_kernels.target_is_cpu(q, cache, *args):
            kind = target_device_kind(q, cache, *args)
            raise RuntimeError(f"backend='cpu_kernel' needs a CPU target (the target device is {kind!r})")
        return "cpu_kernel"
    if backend == "auto" and interpret is False and cache.kind == "f32" and cpu_kernels.target_is_cpu(q, cache, *args):
        return "cpu_kernel"
    if backend not in ("auto", "xla", "pallas_tpu"):
        raise ValueError(f"backend: expected 'auto', 'xla', 'pallas_tpu' or 'cpu_kernel', got {backend!r}")
    return resolve_backend(backend, q, cache, *args, interpret=interpret)


def dense_mla(
    q: jax.Array, cache: LatentCache, positions: jax.Array, *, scale: float, d_v: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Dense causal MLA over one sequence stored in slots `0..L-1` of `cache` (the baseline sparse
    attention is measured against): row `t` sees slots `0..positions[t]`. Same outputs as `sparse_mla`."""
    d_v = cache.latent_dim if d_v is None else d_v
    rows = cache.rows(jnp.arange(cache.num_slots))
    valid = jnp.arange(cache.num_slots)[None, :] <= positions[:, None]
    logits = scale * jnp.einsum("thd,ld->thl", q.astype(jnp.float32), rows, precision=_HIGHEST)
    logits = jnp.where(valid[:, None, :], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)
    p = jnp.exp(logits - lse[..., None])
    return jnp.einsum("thl,lv->thv", p, rows[:, :d_v], precision=_HIGHEST), lse

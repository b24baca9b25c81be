"""`sparse_mla`: attention of each query token over its own top-k latent entries (dsa.md §3), on the device.

Backends: `"xla"` (gather + einsum; runs on CPU, GPU and TPU) and `"pallas_tpu"` (the TPU kernel);
`"auto"` picks Pallas when the target is a TPU and XLA elsewhere. The target is the device the call is
built for (`ops.target`: the arguments' devices when concrete, else the mesh / default device), not the
process's backend, so a CPU host compiles the Pallas path for a TPU ahead of time. Both compute `reference.sparse_mla`:
invalid slots (−1, ≥ the cache's slot count, or past a row's `topk_length`) are skipped; a row with no
valid slot returns `out = 0` and `lse = +inf`; the order of a row's slots does not matter.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from dsa_hybrid.ops.latent_cache import LatentCache
from dsa_hybrid.ops.target import resolve_backend

Backend = Literal["auto", "xla", "pallas_tpu"]
_HIGHEST = jax.lax.Precision.HIGHEST
# Rows gathered per XLA block: keep the float32 gather under ~128 MiB.
_GATHER_BUDGET = 1 << 25


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
        backend: "auto", "xla" or "pallas_tpu".
        num_splits: split each row's K slots into this many slices, attend to each as its own row, and
            merge the results by their LSE (exact up to rounding). For few-token long-context decode on
            TPU: more independent grid steps for the cores to share. K must divide evenly.
        interpret: for "pallas_tpu" off a TPU: `True` or `pltpu.InterpretParams(...)` runs the kernel in
            TPU interpret mode (slow; for tests). Without it, "pallas_tpu" needs a TPU.

    Returns `(out float32 [T, h, d_v], lse float32 [T, h])`, `lse` the natural-log sum of exp of the scaled
    logits. Jit-able (`scale`, `d_v` and `backend` static).
    """
    d_v = _check_query(q, cache, d_v)
    _check_slots(q, slots, topk_length)
    if num_splits != 1:
        T, K = slots.shape
        if num_splits < 1 or K % num_splits:
            raise ValueError(f"num_splits: must be >= 1 and divide K = {K}, got {num_splits}")
        valid = valid_mask(cache, slots, topk_length)
        split_slots = jnp.where(valid, slots, -1).reshape(T * num_splits, K // num_splits)
        out, lse = sparse_mla(
            jnp.repeat(q, num_splits, axis=0), cache, split_slots, scale=scale, d_v=d_v, backend=backend,
            interpret=interpret,
        )  # fmt: skip
        return merge_splits(out.reshape(T, num_splits, *out.shape[1:]), lse.reshape(T, num_splits, -1))
    if _resolve_backend(backend, interpret, q, cache, slots) == "xla":
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


def _check_query(q: Any, cache: Any, d_v: int | None) -> int:
    """Check the cache, `q` and `d_v` of an attention call; returns `d_v` (default: the latent width)."""
    if not isinstance(cache, LatentCache):
        raise TypeError(f"cache: expected a LatentCache, got {type(cache).__name__}")
    d_v = cache.latent_dim if d_v is None else d_v
    if q.ndim != 3 or q.shape[2] != cache.width:
        raise ValueError(f"q: expected [T, h, {cache.width}], got {list(q.shape)}")
    if q.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(f"q: expected float32 or bfloat16, got {q.dtype}")
    if not 0 < d_v <= cache.width:
        raise ValueError(f"d_v: must be in (0, {cache.width}], got {d_v}")
    return d_v


def _check_slots(q: Any, slots: Any, topk_length: Any) -> None:
    if slots.ndim != 2 or slots.shape[0] != q.shape[0]:
        raise ValueError(f"slots: expected [{q.shape[0]}, K], got {list(slots.shape)}")
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
    """Softmax attention of `q` `[T, h, D]` over `rows` `[T, K, D]` where `valid` `[T, K]`, float32."""
    logits = scale * jnp.einsum("thd,tkd->thk", q.astype(jnp.float32), rows, precision=_HIGHEST)
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
    T, h, D = q.shape
    K = slots.shape[1]
    valid = valid_mask(cache, slots, topk_length)
    block = max(1, min(T, _GATHER_BUDGET // max(1, K * D)))
    if block >= T:
        return attend(q, cache.rows(slots), valid, scale, d_v)
    # Long prefills: gather and attend `block` tokens at a time.
    pad = -T % block
    qb = jnp.pad(q, ((0, pad), (0, 0), (0, 0))).reshape(-1, block, h, D)
    sb = jnp.pad(slots, ((0, pad), (0, 0))).reshape(-1, block, K)
    vb = jnp.pad(valid, ((0, pad), (0, 0))).reshape(-1, block, K)
    out, lse = jax.lax.map(lambda a: attend(a[0], cache.rows(a[1]), a[2], scale, d_v), (qb, sb, vb))
    return out.reshape(-1, h, d_v)[:T], lse.reshape(-1, h)[:T]


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
) -> tuple[jax.Array, jax.Array]:
    """The dense-prefix fast path: row `t` attends over positions `0 .. lengths[t] − 1` of its sequence,
    whose pages are `block_tables[t]` (int32 `[T, max_pages]`, −1 padded). This is `sparse_mla` with the
    selection of dsa.md §5 when `p_t + 1 ≤ K` (every visible token), read page by page instead of row by
    row. `lengths` int32 `[T]` (0 gives `out = 0`, `lse = +inf`). Other arguments as in `sparse_mla`."""
    d_v = _check_query(q, cache, d_v)
    T = q.shape[0]
    if block_tables.ndim != 2 or block_tables.shape[0] != T or not jnp.issubdtype(block_tables.dtype, jnp.integer):
        raise ValueError(
            f"block_tables: expected integers of shape [{T}, max_pages], "
            f"got {block_tables.dtype} {list(block_tables.shape)}"
        )
    if lengths.shape != (T,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths: expected integers of shape [{T}], got {lengths.dtype} {list(lengths.shape)}")
    if _resolve_backend(backend, interpret, q, cache, block_tables) == "pallas_tpu":
        from dsa_hybrid.ops.tpu import sparse_mla as sparse_attention_tpu

        return sparse_attention_tpu.prefix_mla_tpu(
            q, cache, block_tables, lengths, scale=scale, d_v=d_v, interpret=interpret
        )
    S = cache.page_size
    positions = jnp.arange(block_tables.shape[1] * S)
    pages = jnp.clip(block_tables, 0, cache.num_pages - 1)
    slots = (pages[:, :, None] * S + jnp.arange(S)[None, None, :]).reshape(T, -1)
    valid = (positions[None, :] < lengths[:, None]) & (jnp.repeat(block_tables, S, axis=1) >= 0)
    return attend(q, cache.rows(slots), valid, scale, d_v)


def _resolve_backend(backend: str, interpret: Any, *args: Any) -> str:
    """ "xla" or "pallas_tpu" for a `backend` argument ("auto": Pallas when the *target* is a TPU, see
    `ops.target`); the Pallas kernels need a TPU target unless `interpret` asks for the simulator."""
    return resolve_backend(backend, *args, interpret=interpret)


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

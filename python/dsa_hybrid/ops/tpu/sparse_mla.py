"""The Pallas TPU kernel of `sparse_mla` (dsa.md §3): each query token attends over its own K latent rows.

Per grid step the kernel takes `tokens_per_step` query tokens. For each token it walks the token's K
slots in chunks of `chunk`: the chunk's rows are gathered from the paged cache in HBM by one DMA per row
into a VMEM buffer (two buffers: the next chunk's DMAs fly while this one is computed), FP8 rows are
dequantized in VMEM, and an online softmax in float32 accumulates `[h, d_v]`. Slot addresses stream
through SMEM one step at a time (a whole prefill's slots would not fit). Invalid slots (−1, out of range,
past `topk_length`) become −1 in the wrapper; the kernel still moves slot 0's row for them (so every
chunk waits on the same number of bytes) and masks them out of the softmax. A row with no valid slot
gives `out = 0`, `lse = +inf`.

`prefix_mla_tpu` is the dense-prefix fast path of the same kernel: when a row selects every visible
token (dsa.md §5, `p_t + 1 ≤ K`), its rows are whole pages of its block table, so each chunk is one page
moved by a single DMA instead of `page_size` row DMAs.

TPU layout notes (not checked by interpret mode): the cache arrays are `[pages, page_size, 1, width]`,
so a row's DMA offsets fall on the untiled leading dimensions only; the VMEM buffers are
`[2, chunk, 1, width]` for the same reason. `chunk` and `tokens_per_step` should be multiples of 8.
`tpu/validate.py` compiles and checks the kernel on a real chip.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dsa_hybrid.ops.latent_cache import FP8_TILE, LatentCache


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def sparse_mla_tpu(
    q: jax.Array,
    cache: LatentCache,
    slots: jax.Array,
    topk_length: jax.Array | None,
    *,
    scale: float,
    d_v: int,
    tokens_per_step: int = 8,
    chunk: int = 128,
    interpret: Any = False,
) -> tuple[jax.Array, jax.Array]:
    """`sparse_mla` on the Pallas TPU kernel (arguments as there). `interpret`: False on a TPU, or
    `pltpu.InterpretParams(...)` / True to run the kernel in TPU interpret mode on any backend."""
    from dsa_hybrid.ops.sparse_mla import valid_mask

    K = slots.shape[1]
    kc = min(chunk, _round_up(K, 8))
    s = jnp.where(valid_mask(cache, slots, topk_length), slots, -1).astype(jnp.int32)
    s = jnp.pad(s, ((0, 0), (0, _round_up(K, kc) - K)), constant_values=-1)
    return _attention_call(
        q, cache, s, s, mode="rows", kc=kc, scale=scale, d_v=d_v, tb=tokens_per_step, interpret=interpret
    )


def prefix_mla_tpu(
    q: jax.Array,
    cache: LatentCache,
    block_tables: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    d_v: int,
    tokens_per_step: int = 8,
    interpret: Any = False,
) -> tuple[jax.Array, jax.Array]:
    """`prefix_mla` on the Pallas TPU kernel: one page DMA per chunk (arguments as there)."""
    S, P = cache.page_size, block_tables.shape[1]
    pages = jnp.clip(block_tables, 0, cache.num_pages - 1).astype(jnp.int32)  # padding pages: masked
    positions = jnp.arange(P * S, dtype=jnp.int32)[None, :]
    mask = jnp.where((positions < lengths[:, None]) & (jnp.repeat(block_tables, S, axis=1) >= 0), positions, -1)
    return _attention_call(
        q, cache, pages, mask, mode="pages", kc=S, scale=scale, d_v=d_v, tb=tokens_per_step, interpret=interpret
    )


def _attention_call(
    q: jax.Array,
    cache: LatentCache,
    addr: jax.Array,
    mask: jax.Array,
    *,
    mode: str,
    kc: int,
    scale: float,
    d_v: int,
    tb: int,
    interpret: Any,
) -> tuple[jax.Array, jax.Array]:
    """Run the kernel. `addr` int32 `[T, n]`: slots (mode "rows", `n = chunks · kc`) or pages (mode
    "pages", `n = chunks`), streamed through SMEM; `mask` int32 `[T, chunks · kc]`, ≥ 0 where an entry
    attends."""
    T, h, W = q.shape
    n_chunks = mask.shape[1] // kc
    Tp = _round_up(max(T, 1), tb)
    addr = jnp.pad(addr, ((0, Tp - T), (0, 0)), constant_values=-1 if mode == "rows" else 0)
    mask = jnp.pad(mask, ((0, Tp - T), (0, 0)), constant_values=-1)
    qp = jnp.pad(q, ((0, Tp - T), (0, 0), (0, 0)))
    compute = jnp.bfloat16 if q.dtype == jnp.bfloat16 else jnp.float32
    parts = _cache_parts(cache)
    kernel = functools.partial(
        _kernel,
        n_parts=len(parts),
        mode=mode,
        kind=cache.kind,
        latent_dim=cache.latent_dim,
        page_size=cache.page_size,
        tb=tb,
        kc=kc,
        n_chunks=n_chunks,
        scale=scale,
        d_v=d_v,
        compute=compute,
    )
    step = lambda i: (i, 0)  # noqa: E731
    out, lse = pl.pallas_call(
        kernel,
        grid=(Tp // tb,),
        in_specs=[
            pl.BlockSpec((tb, addr.shape[1]), step, memory_space=pltpu.SMEM),  # addresses of the DMAs
            pl.BlockSpec((tb, mask.shape[1]), step),  # the mask, as a vector
            pl.BlockSpec((tb, h, W), lambda i: (i, 0, 0)),
            *[pl.BlockSpec(memory_space=pl.ANY) for _ in parts],
        ],
        out_specs=[
            pl.BlockSpec((tb, h, d_v), lambda i: (i, 0, 0)),
            pl.BlockSpec((tb, h), step),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((Tp, h, d_v), jnp.float32),
            jax.ShapeDtypeStruct((Tp, h), jnp.float32),
        ],
        scratch_shapes=[
            *[pltpu.VMEM((2, kc, 1, p.shape[-1]), p.dtype) for p in parts],
            pltpu.SemaphoreType.DMA((len(parts), 2)),
        ],
        # Grid steps share no state (each starts and drains its own DMAs): megacore may split them.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
    )(addr, mask, qp, *parts)
    return out[:T], lse[:T]


def _cache_parts(cache: LatentCache) -> list[jax.Array]:
    parts = [cache.c_kv, cache.scales, cache.k_pe] if cache.kind == "fp8" else [cache.kv]
    assert all(p is not None for p in parts)
    return parts  # type: ignore[return-value]


def _kernel(
    addr_smem: Any,
    mask_vmem: Any,
    q_ref: Any,
    *refs: Any,
    n_parts: int,
    mode: str,
    kind: str,
    latent_dim: int,
    page_size: int,
    tb: int,
    kc: int,
    n_chunks: int,
    scale: float,
    d_v: int,
    compute: Any,
) -> None:
    hbm = refs[:n_parts]
    out_ref, lse_ref = refs[n_parts : n_parts + 2]
    bufs = refs[n_parts + 2 : 2 * n_parts + 2]
    sems = refs[2 * n_parts + 2]
    h = q_ref.shape[1]
    total = tb * n_chunks

    def row_copies(it: jax.Array, j: jax.Array, b: jax.Array) -> list[Any]:
        """Mode "rows": the DMAs bringing row `j` of flat iteration `it` (token it // n_chunks, chunk
        it % n_chunks) into buffer slot `b`, one per cache part."""
        t, c = it // n_chunks, it % n_chunks
        slot = jnp.maximum(addr_smem[t, c * kc + j], 0)  # invalid rows fetch slot 0, masked later
        page, off = slot // page_size, slot % page_size
        return [
            pltpu.make_async_copy(src.at[page, off], buf.at[b, j], sems.at[p, b])
            for p, (src, buf) in enumerate(zip(hbm, bufs, strict=True))
        ]

    def page_copies(it: jax.Array, b: jax.Array) -> list[Any]:
        """Mode "pages": the DMAs bringing the whole page of chunk `it` into buffer slot `b`."""
        page = addr_smem[it // n_chunks, it % n_chunks]
        return [
            pltpu.make_async_copy(src.at[page], buf.at[b], sems.at[p, b])
            for p, (src, buf) in enumerate(zip(hbm, bufs, strict=True))
        ]

    def for_each_copy(it: jax.Array, b: jax.Array, action: str) -> None:
        if mode == "pages":
            for cp in page_copies(it, b):
                getattr(cp, action)()
            return

        def body(j: jax.Array, carry: None) -> None:
            for cp in row_copies(it, j, b):
                getattr(cp, action)()

        jax.lax.fori_loop(0, kc, body, None)

    def start(it: jax.Array, b: jax.Array) -> None:
        for_each_copy(it, b, "start")

    def wait(it: jax.Array, b: jax.Array) -> None:
        for_each_copy(it, b, "wait")

    def rows_of(b: jax.Array) -> jax.Array:
        """The chunk in buffer slot `b` as `[kc, width]` in the compute dtype (FP8 dequantized)."""
        if kind != "fp8":
            return bufs[0][b].reshape(kc, -1).astype(compute)
        codes = bufs[0][b].reshape(kc, latent_dim).astype(jnp.float32)
        tile_scales = bufs[1][b].reshape(kc, latent_dim // FP8_TILE)
        c_kv = (codes.reshape(kc, -1, FP8_TILE) * tile_scales[:, :, None]).reshape(kc, latent_dim)
        k_pe = bufs[2][b].reshape(kc, -1).astype(jnp.float32)
        return jnp.concatenate([c_kv, k_pe], axis=1).astype(compute)

    start(jnp.int32(0), jnp.int32(0))

    def step(it: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        m, denom, acc = carry
        b = it % 2
        t, c = it // n_chunks, it % n_chunks

        @pl.when(it + 1 < total)
        def _() -> None:
            start(it + 1, 1 - b)

        wait(it, b)
        first = c == 0  # a new token: reset the running softmax
        m = jnp.where(first, -jnp.inf, m)
        denom = jnp.where(first, 0.0, denom)
        acc = jnp.where(first, 0.0, acc)

        rows = rows_of(b)
        qt = q_ref[t].astype(compute)  # [h, width]
        logits = jax.lax.dot_general(qt, rows, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        valid = mask_vmem[pl.ds(t, 1), pl.ds(c * kc, kc)] >= 0  # [1, kc]
        logits = jnp.where(valid, logits * scale, -jnp.inf)
        m_new = jnp.maximum(m, logits.max(axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(logits - m_safe)
        denom = alpha * denom + p.sum(axis=1, keepdims=True)
        pv = jax.lax.dot_general(
            p.astype(compute), rows[:, :d_v], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        acc = alpha * acc + pv

        @pl.when(c == n_chunks - 1)
        def _() -> None:
            empty = denom == 0.0
            safe = jnp.where(empty, 1.0, denom)
            out_ref[t] = jnp.where(empty, 0.0, acc / safe)
            lse_ref[pl.ds(t, 1), :] = jnp.where(empty, jnp.inf, m_safe + jnp.log(safe)).reshape(1, h)

        return m_new, denom, acc

    init = (
        jnp.full((h, 1), -jnp.inf, jnp.float32),
        jnp.zeros((h, 1), jnp.float32),
        jnp.zeros((h, d_v), jnp.float32),
    )
    jax.lax.fori_loop(0, total, step, init)

"""Query-block sparse MLA on TPU (sglang-jax's query-block prefill): the query rows of a block share their
cache reads.

`sparse_mla_blocks_tpu` computes `sparse_mla` (dsa.md §3) like `sparse_mla_tpu`, but it groups `block`
consecutive query rows, the rows of one sequence in a prefill chunk. Such rows select largely the same
tokens. Each slot in the union of the block's selections is fetched from HBM **once** (one row DMA per
part of `LatentCache`'s layout). All the block's rows × heads attend to it in one MXU matmul
`[block · h, Wk] × [Wk, chunk]`, with a per-row membership mask, so heads × tokens fill the MXU rows. The
union is built by XLA around the kernel: a sort of the block's `block · K` slots, its duplicates
dropped, and each row's entries marked in a `[chunks, block, chunk]` mask.

HBM reads drop by the rows' overlap factor (`block · K` over the union's size). MXU work per fetched row
grows by `block`. The mode pays where the per-row kernel is bandwidth-bound with MXU rows to spare:
tensor-parallel head counts (h ≤ 32, `block · h` ≤ 256), prefill chunks. It does not pay for decode
batches of unrelated requests, which share nothing. `query_block_reads` counts the bytes both kernels
fetch for given slots.

A row's slots are treated as a set here: a slot listed twice in one row attends once. Top-k selections
never repeat a slot.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dsa_hybrid.ops.latent_cache import LatentCache
from dsa_hybrid.ops.target import tpu_chip
from dsa_hybrid.ops.tpu import block_sizes
from dsa_hybrid.ops.tpu.sparse_mla import KernelPlan, decode_chunk, from_kernel_columns, kernel_plan, to_kernel_columns


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def default_block(heads: int) -> int:
    """Query rows per block for `heads` heads: `block · heads` = 128 MXU rows (at least 1 row)."""
    b = 1
    while 2 * b * heads <= 128:
        b *= 2
    return b


def union_plan(
    slots: jax.Array, valid: jax.Array, block: int, chunk: int, num_slots: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The union of each block's valid slots. `slots`, `valid` `[T, K]` with `T` a multiple of `block`.
    Returns `(union int32 [B, U]` (ascending, then distinct in-range fill slots), `count int32 [B]`,
    `member bool [B, block, U])` with `U = roundup(block · K, chunk)`. Built from sorts, one scatter of
    int32 rows and a binary search (a `[B, block, U]` scatter compiles several times slower on TPU)."""
    T, K = slots.shape
    B = T // block
    U = _round_up(block * K, chunk)
    big = jnp.int32(num_slots)
    rows = jnp.sort(jnp.where(valid, slots.astype(jnp.int32), big), axis=1)  # each row ascending
    srt = jnp.sort(rows.reshape(B, block * K), axis=1)
    first = jnp.concatenate([jnp.ones((B, 1), bool), srt[:, 1:] != srt[:, :-1]], axis=1) & (srt < big)
    rank = jnp.cumsum(first, axis=1, dtype=jnp.int32) - 1
    count = jnp.sum(first, axis=1, dtype=jnp.int32)
    b_idx = jnp.arange(B, dtype=jnp.int32)[:, None]
    fill = (b_idx * U + jnp.arange(U, dtype=jnp.int32)[None, :]) % num_slots
    union = fill.at[b_idx, jnp.where(first, rank, U)].set(srt, mode="drop")
    per_row = rows.reshape(B, block, K)
    search = jax.vmap(jax.vmap(lambda a, v: jnp.searchsorted(a, v, method="scan"), in_axes=(0, None)))
    pos = jnp.minimum(search(per_row, union), K - 1)
    found = jnp.take_along_axis(per_row, pos, axis=2) == union[:, None, :]
    member = found & (jnp.arange(U, dtype=jnp.int32) < count[:, None])[:, None, :]
    return union, count, member


def query_block_reads(
    slots: jax.Array, valid: jax.Array, cache: LatentCache, *, block: int, chunk: int
) -> tuple[int, int]:
    """`(bytes the per-row kernel fetches, bytes the query-block kernel fetches)` from HBM for these
    slots. Each kernel fetches whole chunks up to its last valid entry, `cache.bytes_read_per_token` per
    entry. The per-row kernel reads up to each row's last valid entry; the query-block kernel reads each
    block's union."""
    T, K = slots.shape
    kc = min(chunk, _round_up(K, 8))
    last = jnp.max(jnp.where(valid, jnp.arange(1, K + 1)[None, :], 0), axis=1)
    per_row = int(jnp.sum(-(-last // kc) * kc))
    Tp = _round_up(T, block)
    pad = ((0, Tp - T), (0, 0))
    _, count, _ = union_plan(jnp.pad(slots, pad), jnp.pad(valid, pad), block, kc, cache.num_slots)
    per_block = int(jnp.sum(-(-count // kc) * kc))
    return per_row * cache.bytes_read_per_token, per_block * cache.bytes_read_per_token


def sparse_mla_blocks_tpu(
    q: jax.Array,
    cache: LatentCache,
    slots: jax.Array,
    topk_length: jax.Array | None,
    *,
    scale: float,
    d_v: int,
    block: int | None = None,
    chunk: int | None = None,
    interpret: Any = False,
) -> tuple[jax.Array, jax.Array]:
    """`sparse_mla` over query blocks (module docstring): `q` `[T, h, L + R]` float32 / bfloat16, `slots`
    int `[T, K]`, `topk_length` int `[T]` or None. Returns `(out float32 [T, h, d_v], lse float32
    [T, h])` as `sparse_mla`. `block`: query rows per block (default `default_block(h)`); rows `t` with
    the same `t // block` share reads. `chunk` overrides the chip's `block_sizes.SPARSE_MLA` entry.
    `interpret` as `sparse_mla_tpu`."""
    from dsa_hybrid.ops.sparse_mla import valid_mask

    T, h, _ = q.shape
    if slots.ndim != 2 or slots.shape[0] != T:
        raise ValueError(f"slots: expected [{T}, K], got {list(slots.shape)}")
    block = default_block(h) if block is None else block
    if block < 1:
        raise ValueError(f"block: must be >= 1, got {block}")
    chip = None if interpret is not False else tpu_chip()
    K = slots.shape[1]
    kc = min(chunk or block_sizes.sparse_mla_blocks(chip).chunk, _round_up(block * K, 8))
    Tp = _round_up(T, block)
    pad = ((0, Tp - T), (0, 0))
    valid = jnp.pad(valid_mask(cache, slots, topk_length), pad)
    union, count, member = union_plan(jnp.pad(slots, pad), valid, block, kc, cache.num_slots)
    B, U = union.shape
    n_chunks = U // kc
    live = jnp.arange(U, dtype=jnp.int32)[None, :] < count[:, None]
    code = jnp.where(live, union % cache.page_size + 1, 0).astype(jnp.int32).reshape(B, n_chunks, 1, kc)
    mask = member.astype(jnp.int32).reshape(B, block, n_chunks, kc).transpose(0, 2, 1, 3)  # [B, chunks, block, kc]
    plan = kernel_plan(cache, d_v)
    compute = jnp.bfloat16 if q.dtype == jnp.bfloat16 else jnp.float32
    qk = to_kernel_columns(jnp.pad(q.astype(compute), ((0, Tp - T), (0, 0), (0, 0))), plan)
    qk = qk.reshape(B, block * h, plan.wk)
    rows = block * h
    need = vmem_need(plan, rows, block, kc, n_chunks, jnp.dtype(compute).itemsize)
    limit_bytes = block_sizes.vmem_limit(chip, need, block_sizes.capacity(chip))
    block_sizes.record("sparse_mla_blocks", chip, need, limit_bytes, block=block, chunk=kc)
    parts = [a for a in (cache.data, cache.rope, cache.scales) if a is not None]
    entries = B * U
    cost = pl.CostEstimate(
        flops=2 * entries * rows * (plan.wk + plan.wv),
        transcendentals=entries * rows,
        bytes_accessed=entries * cache.bytes_read_per_token
        + qk.size * qk.dtype.itemsize
        + B * rows * (plan.wv + 1) * 4,
    )
    kernel = functools.partial(
        _kernel, plan=plan, page_size=cache.page_size, block=block, heads=h, kc=kc, scale=scale,
        compute=compute, n_parts=len(parts),
    )  # fmt: skip
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(B,),
            in_specs=[
                pl.BlockSpec((1, 1, U), lambda i, n: (i, 0, 0), memory_space=pltpu.SMEM),
                pl.BlockSpec((1, rows, plan.wk), lambda i, n: (i, 0, 0)),
                pl.BlockSpec((1, n_chunks, 1, kc), lambda i, n: (i, 0, 0, 0)),
                pl.BlockSpec((1, n_chunks, block, kc), lambda i, n: (i, 0, 0, 0)),
                *[pl.BlockSpec(memory_space=pl.ANY) for _ in parts],
            ],
            out_specs=[
                pl.BlockSpec((1, rows, plan.wv), lambda i, n: (i, 0, 0)),
                pl.BlockSpec((1, 1, rows), lambda i, n: (i, 0, 0)),
            ],
            scratch_shapes=[
                *[pltpu.VMEM((2, kc, a.shape[-1]), a.dtype) for a in parts],
                pltpu.SemaphoreType.DMA((2 * len(parts),)),
                pltpu.VMEM((rows, plan.wv), jnp.float32),
                pltpu.VMEM((rows, 1), jnp.float32),
                pltpu.VMEM((rows, 1), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((B, rows, plan.wv), jnp.float32),
            jax.ShapeDtypeStruct((B, 1, rows), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",), vmem_limit_bytes=limit_bytes),
        interpret=interpret,
        cost_estimate=cost,
        name=f"sparse_mla_blocks_{plan.lay.kind}",
    )(count, union.reshape(B, 1, U), qk, code, mask, *parts)
    out = out.reshape(Tp, h, plan.wv)[:T]
    return from_kernel_columns(out, plan.main_cols[:d_v]), lse.reshape(Tp, h)[:T]


def vmem_need(plan: KernelPlan, rows: int, block: int, kc: int, n_chunks: int, q_itemsize: int) -> int:
    """VMEM bytes of one launch: double-buffered q / mask / code / out / lse blocks, the part buffers, the
    softmax state and the decoded chunk with its logits (temporaries counted twice)."""
    t = block_sizes.tile_bytes
    lay, wk, wv = plan.lay, plan.wk, plan.wv
    blocks = 2 * (t((rows, wk), q_itemsize) + t((rows, wv), 4) + t((1, rows), 4))
    blocks += 2 * n_chunks * (t((block, kc), 4) + t((1, kc), 4))
    parts = [lay.main_words] + [w.row for w in (lay.rope, lay.scales) if w is not None]
    scratch = sum(t((2 * kc, p), 4) for p in parts) + t((rows, wv), 4) + 2 * t((rows, 1), 4)
    temps = 2 * (t((kc, wk), 4) + 2 * t((rows, kc), 4) + t((rows, wv), 4) + t((kc, kc), 4) + t((rows, rows), 4))
    return blocks + scratch + temps


def _kernel(
    count_ref: Any,
    addr_ref: Any,
    q_ref: Any,
    code_ref: Any,
    mask_ref: Any,
    *refs: Any,
    plan: KernelPlan,
    page_size: int,
    block: int,
    heads: int,
    kc: int,
    scale: float,
    compute: Any,
    n_parts: int,
) -> None:
    lay = plan.lay
    hbm, refs = refs[:n_parts], refs[n_parts:]
    out_ref, lse_ref, refs = refs[0], refs[1], refs[2:]
    bufs, refs = refs[:n_parts], refs[n_parts:]
    sems, acc_ref, m_ref, l_ref = refs
    groups = [1] + [w.group for w in (lay.rope, lay.scales) if w is not None]
    has_rope, has_scales = lay.rope is not None, lay.scales is not None
    i = pl.program_id(0)
    rows = block * heads
    precision = jax.lax.Precision.HIGHEST if compute == jnp.float32 else None
    nc = (count_ref[i] + kc - 1) // kc

    def issue(c: jax.Array | int, b: jax.Array | int) -> None:
        def row(j: jax.Array, carry: int) -> int:
            slot = addr_ref[0, 0, c * kc + j]
            page = slot // page_size
            off = slot - page * page_size
            for p in range(n_parts):
                src = hbm[p].at[page, pl.ds(off // groups[p], 1)]
                pltpu.make_async_copy(src, bufs[p].at[b, pl.ds(j, 1)], sems.at[2 * p + b]).start()
            return carry

        jax.lax.fori_loop(0, kc, row, 0, unroll=min(kc, 8))

    def wait(b: jax.Array) -> None:
        for p in range(n_parts):
            pltpu.make_async_copy(bufs[p].at[b], bufs[p].at[b], sems.at[2 * p + b]).wait()

    def attend(c: jax.Array, b: jax.Array) -> None:
        off = None
        if n_parts > 1:
            row = code_ref[0, c] - 1  # [1, kc]
            eye = jax.lax.broadcasted_iota(jnp.int32, (kc, kc), 0) == jax.lax.broadcasted_iota(jnp.int32, (kc, kc), 1)
            off = jnp.sum(jnp.where(eye, row, 0), axis=1, keepdims=True)  # [kc, 1]
        rope = bufs[1][b] if has_rope else None
        scales = bufs[n_parts - 1][b] if has_scales else None
        kv = decode_chunk(lay, bufs[0][b], rope, scales, off).astype(compute)  # [kc, Wk]
        logits = jax.lax.dot_general(
            q_ref[0], kv, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
        )  # [block · h, kc]: every row × head of the block against the shared chunk
        member = mask_ref[0, c]  # [block, kc]
        live = jnp.concatenate(
            [jnp.broadcast_to(member[r : r + 1] != 0, (heads, kc)) for r in range(block)], axis=0
        )  # [block · h, kc]
        logits = jnp.where(live, logits * scale, -jnp.inf)
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, logits.max(axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(logits - m_safe)
        l_ref[...] = alpha * l_ref[...] + p.sum(axis=1, keepdims=True)
        pv = jax.lax.dot_general(
            p.astype(compute), kv[:, : plan.wv], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
            precision=precision,
        )  # fmt: skip
        acc_ref[...] = alpha * acc_ref[...] + pv
        m_ref[...] = m_new

    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(nc > 0)
    def _() -> None:
        issue(0, 0)

    def step(c: jax.Array, b: jax.Array) -> jax.Array:
        nb = 1 - b

        @pl.when(c + 1 < nc)
        def _() -> None:
            issue(c + 1, nb)

        wait(b)
        attend(c, b)
        return nb

    jax.lax.fori_loop(0, nc, step, jnp.int32(0))
    denom = l_ref[...]
    empty = denom == 0.0
    safe = jnp.where(empty, 1.0, denom)
    out_ref[0] = jnp.where(empty, 0.0, acc_ref[...] / safe)
    m = m_ref[...]
    lse = jnp.where(empty, jnp.inf, jnp.where(m == -jnp.inf, 0.0, m) + jnp.log(safe))  # [rows, 1]
    eye = jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 0) == jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 1)
    lse_ref[0] = jnp.sum(jnp.where(eye, lse, 0.0), axis=0, keepdims=True)  # [1, rows]: lse as a row

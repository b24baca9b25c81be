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
from dsa_hybrid.ops.tpu.sparse_mla import (
    AttentionScratch,
    KernelPlan,
    attention_scratch,
    cache_parts,
    from_kernel_columns,
    kernel_plan,
    offset_column,
    scratch_bytes,
    to_kernel_columns,
)


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
    parts = cache_parts(cache)
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
            scratch_shapes=attention_scratch(parts, kc, rows, plan.wv),
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
    wk, wv = plan.wk, plan.wv
    blocks = 2 * (t((rows, wk), q_itemsize) + t((rows, wv), 4) + t((1, rows), 4))
    blocks += 2 * n_chunks * (t((block, kc), 4) + t((1, kc), 4))
    temps = 2 * (t((kc, wk), 4) + 2 * t((rows, kc), 4) + t((rows, wv), 4) + t((kc, kc), 4) + t((rows, rows), 4))
    return blocks + scratch_bytes(plan, kc, rows) + temps


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
    hbm, refs = refs[:n_parts], refs[n_parts:]
    out_ref, lse_ref, refs = refs[0], refs[1], refs[2:]
    st = AttentionScratch.of(plan.lay, refs)
    i = pl.program_id(0)
    nc = (count_ref[i] + kc - 1) // kc

    def issue(c: jax.Array | int, b: jax.Array | int) -> None:
        def row(j: jax.Array, carry: int) -> int:
            st.fetch_entry(hbm, addr_ref[0, 0, c * kc + j], page_size, b, j)
            return carry

        jax.lax.fori_loop(0, kc, row, 0, unroll=min(kc, 8))

    def attend(c: jax.Array, b: jax.Array) -> None:
        off = offset_column(code_ref[0, c], kc) if n_parts > 1 else None  # [kc, 1]
        kv = st.decoded(b, off).astype(compute)  # [kc, Wk]
        member = mask_ref[0, c]  # [block, kc]
        live = jnp.concatenate(
            [jnp.broadcast_to(member[r : r + 1] != 0, (heads, kc)) for r in range(block)], axis=0
        )  # [block · h, kc]: every row × head of the block against the shared chunk
        st.step(q_ref[0], kv, live, scale=scale, wv=plan.wv, compute=compute)

    st.reset()

    @pl.when(nc > 0)
    def _() -> None:
        issue(0, 0)

    def step(c: jax.Array, b: jax.Array) -> jax.Array:
        nb = 1 - b

        @pl.when(c + 1 < nc)
        def _() -> None:
            issue(c + 1, nb)

        st.wait(b)
        attend(c, b)
        return nb

    jax.lax.fori_loop(0, nc, step, jnp.int32(0))
    out, lse = st.result()
    out_ref[0] = out
    lse_ref[0] = lse  # [1, rows]

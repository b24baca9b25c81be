"""The Pallas TPU kernel of the device indexer's scoring (dsa.md §4): FP8 key pages streamed through VMEM.

`score_pages_tpu` computes, for each query row, the head-weighted ReLU scores (before the key scale) of
the keys in a run of its pages (one chunk of `select_topk_device`'s scan):
`u[t, s] = Σ_h hw[t, h] · ReLU(q[t, h] · k[s])`; the caller multiplies by the key scales and masks
invisible positions. The grid is (row blocks, key groups): a step scores `rows_per_step` rows against
`keys_per_step` keys (whole pages), DMA'd from HBM into double-buffered VMEM while the previous group
is computed (the key-group axis is sequential, the row-block axis may be split across cores).

When all rows of a block read the same pages — the rows of one sequence's prefill chunk, the case
that dominates scoring work — the group's pages are fetched once and scored for all rows × heads of the
block as ONE MXU matmul `[rows · H, D] × [D, keys]`; otherwise each row's own pages are fetched and
scored as `[H, D] × [D, keys]`. Either way the head sum is `[1, H] × [H, keys]` per row in float32
(`Precision.HIGHEST`) and each step writes its whole `[rows, keys]` output block (lane-aligned: no
store at a page offset inside a vector). FP8 values are exact in bfloat16, so quantized queries
multiply as bf16 with float32 accumulation (exact products); unquantized queries stay float32.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dsa_hybrid.ops.target import tpu_chip
from dsa_hybrid.ops.tpu import block_sizes


def score_pages_tpu(
    q: jax.Array,
    head_w: jax.Array,
    codes: jax.Array,
    pages: jax.Array,
    *,
    exact_in_bf16: bool,
    rows_per_step: int | None = None,
    keys_per_step: int | None = None,
    interpret: Any = False,
) -> jax.Array:
    """Unscaled scores `[T, n · page_size]` of the keys in pages `pages` int32 `[T, n]` (valid page
    numbers) for queries `q` `[T, H, D]` (float32 values) with head weights `head_w` `[T, H]`; `codes`
    `[num_pages, page_size, D]`, the e4m3fn codes as uint8 bit patterns (`IndexerPages.codes`, read in
    place: no converted copy of the cache) or float8_e4m3fn. Entry `j` of row `t` is key `j % page_size` of page
    `pages[t, j // page_size]`. `exact_in_bf16`: the queries are FP8 values."""
    T, H, D = q.shape
    n = pages.shape[1]
    S = codes.shape[1]
    if T == 0 or n == 0:
        return jnp.zeros((T, n * S), jnp.float32)
    chip = None if interpret is not False else tpu_chip()
    blocks = block_sizes.indexer_blocks(chip)
    tb = max(1, min(rows_per_step or blocks.rows_per_step, T))
    g = max(1, min((keys_per_step or blocks.keys_per_step) // S, n))  # pages per grid step
    ng = -(-n // g)
    Tp = -(-T // tb) * tb
    compute = jnp.bfloat16 if exact_in_bf16 else jnp.float32
    # Padding rows repeat the last row's pages (so a block stays "shared"); padding pages read page 0.
    pg = jnp.pad(pages.astype(jnp.int32), ((0, 0), (0, ng * g - n)))
    pg = jnp.concatenate([pg, jnp.broadcast_to(pg[-1:], (Tp - T, ng * g))], axis=0)
    blk = pg.reshape(Tp // tb, tb, ng * g)
    shared = jnp.all(blk == blk[:, :1], axis=(1, 2)).astype(jnp.int32)  # [row blocks]
    qp = jnp.pad(q.astype(compute), ((0, Tp - T), (0, 0), (0, 0)))
    wp = jnp.pad(head_w.astype(jnp.float32), ((0, Tp - T), (0, 0)))
    t = block_sizes.tile_bytes
    isz = jnp.dtype(compute).itemsize
    need = (
        2 * (t((tb * H, D), isz) + t((tb, H), 4) + t((tb, g * S), 4))
        + 2 * tb * g * t((S, D), 1)
        + 3 * t((tb * H, g * S), 4)
        + t((g * S, D), 4)
    )
    limit = block_sizes.vmem_limit(chip, need, block_sizes.capacity(chip))
    block_sizes.record("indexer_scores", chip, need, limit, rows_per_step=tb, keys_per_step=g * S)
    keys = Tp * ng * g * S
    cost = pl.CostEstimate(
        flops=2 * keys * H * (D + 1), transcendentals=0, bytes_accessed=keys * D + qp.size * isz + Tp * ng * g * S * 4
    )
    kernel = functools.partial(_kernel, tb=tb, g=g, S=S, H=H, compute=compute)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(Tp // tb, ng),
            in_specs=[
                pl.BlockSpec((tb, ng * g), lambda i, c, sh: (i, 0), memory_space=pltpu.SMEM),  # DMA addresses
                pl.BlockSpec((tb, H, D), lambda i, c, sh: (i, 0, 0)),
                pl.BlockSpec((tb, H), lambda i, c, sh: (i, 0)),
                pl.BlockSpec(memory_space=pl.ANY),
            ],
            out_specs=pl.BlockSpec((tb, g * S), lambda i, c, sh: (i, c)),
            scratch_shapes=[pltpu.VMEM((2, tb, g, S, D), codes.dtype), pltpu.SemaphoreType.DMA((2,))],
        ),
        out_shape=jax.ShapeDtypeStruct((Tp, ng * g * S), jnp.float32),
        # Row blocks are independent (megacore may split them); key groups carry the double buffer.
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary"),
            vmem_limit_bytes=limit,
        ),
        interpret=interpret,
        cost_estimate=cost,
        name="indexer_scores",
    )(shared, pg, qp, wp, codes)
    return out[:T, : n * S]


def _kernel(shared_ref, pages_ref, q_ref, w_ref, codes_hbm, out_ref, kbuf, sems, *, tb, g, S, H, compute):
    i, c = pl.program_id(0), pl.program_id(1)
    ng = pl.num_programs(1)
    is_shared = shared_ref[i] == 1
    hi = jax.lax.Precision.HIGHEST

    def copies(grp, b, rows):
        return [
            pltpu.make_async_copy(codes_hbm.at[pages_ref[r, grp * g + k]], kbuf.at[b, r, k], sems.at[b])
            for r in range(rows)
            for k in range(g)
        ]

    def start(grp, b):
        @pl.when(is_shared)
        def _():
            for cp in copies(grp, b, 1):
                cp.start()

        @pl.when(jnp.logical_not(is_shared))
        def _():
            for cp in copies(grp, b, tb):
                cp.start()

    b = c % 2

    @pl.when(c == 0)
    def _():
        start(c, b)

    @pl.when(c + 1 < ng)
    def _():
        start(c + 1, 1 - b)

    def keys(r):
        codes = kbuf[b, r].reshape(g * S, -1)
        if codes.dtype != jnp.float8_e4m3fn:  # the pages' uint8 bit patterns, reinterpreted in VMEM
            codes = jax.lax.bitcast_convert_type(codes, jnp.float8_e4m3fn)
        return codes.astype(jnp.float32).astype(compute)  # exact FP8 values

    def head_sum(r, dots):  # [H, g·S] → [1, g·S]
        w = w_ref[r : r + 1, :]
        return jax.lax.dot_general(
            w, jnp.maximum(dots, 0.0), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=hi
        )

    def qk(qm, k):
        return jax.lax.dot_general(
            qm, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
            precision=hi if compute == jnp.float32 else None,
        )  # fmt: skip

    @pl.when(is_shared)
    def _():
        pltpu.make_async_copy(kbuf.at[b, 0], kbuf.at[b, 0], sems.at[b]).wait()
        dots = qk(q_ref[...].reshape(tb * H, -1), keys(0))  # all rows × heads against the group: one matmul
        out_ref[...] = jnp.concatenate([head_sum(r, dots[r * H : (r + 1) * H]) for r in range(tb)], axis=0)

    @pl.when(jnp.logical_not(is_shared))
    def _():
        pltpu.make_async_copy(kbuf.at[b], kbuf.at[b], sems.at[b]).wait()
        out_ref[...] = jnp.concatenate([head_sum(r, qk(q_ref[r], keys(r))) for r in range(tb)], axis=0)

"""The Pallas TPU kernel of the device indexer's scoring (dsa.md §4): FP8 key pages streamed through VMEM.

`score_pages_tpu` computes, for each query row, the scores of the keys in a run of its pages (one chunk
of `select_topk_device`'s scan): per grid step `tokens_per_step` rows; per row, its pages are DMA'd one
at a time (codes `[page_size, D]` and scales `[1, page_size]`, both offset on the untiled leading page
dimension) into double-buffered VMEM, and scored as
`I[s] = sk[s] · Σ_h hw[h] · ReLU(q[h] · k[s])` with an `[H, D] × [D, page_size]` matmul. FP8 values are
exact in bfloat16, so quantized queries multiply as bf16 with float32 accumulation (exact products);
unquantized queries stay float32. Positions past a row's own are −inf. Grid steps are independent.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def score_pages_tpu(
    q: jax.Array,
    head_w: jax.Array,
    codes: jax.Array,
    scales: jax.Array,
    pages: jax.Array,
    positions: jax.Array,
    first_position: jax.Array,
    *,
    exact_in_bf16: bool,
    tokens_per_step: int = 8,
    interpret: Any = False,
) -> jax.Array:
    """Scores `[T, n · page_size]` of the keys in pages `pages` int32 `[T, n]` (valid page numbers) for
    queries `q` `[T, H, D]` (float32 values) with head weights `head_w` `[T, H]`; entry `j` of row `t` is
    position `first_position + j`, −inf when past `positions[t]` or on a page marked −1 in the caller's
    table (pass those as position limits instead). `exact_in_bf16`: the queries are FP8 values."""
    T, H, D = q.shape
    n = pages.shape[1]
    S = codes.shape[1]
    tb = tokens_per_step
    Tp = -(-max(T, 1) // tb) * tb
    pad = Tp - T
    qp = jnp.pad(q, ((0, pad), (0, 0), (0, 0)))
    wp = jnp.pad(head_w, ((0, pad), (0, 0)))
    pg = jnp.pad(pages, ((0, pad), (0, 0)))
    limit = jnp.pad(positions - first_position, (0, pad), constant_values=-1).astype(jnp.int32)  # last visible j
    kernel = functools.partial(_kernel, tb=tb, n=n, S=S, compute=jnp.bfloat16 if exact_in_bf16 else jnp.float32)
    out = pl.pallas_call(
        kernel,
        grid=(Tp // tb,),
        in_specs=[
            pl.BlockSpec((tb, n), lambda i: (i, 0), memory_space=pltpu.SMEM),  # pages, to address DMAs
            pl.BlockSpec((tb, 1), lambda i: (i, 0)),  # last visible entry per row
            pl.BlockSpec((tb, H, D), lambda i: (i, 0, 0)),
            pl.BlockSpec((tb, H), lambda i: (i, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec((tb, n * S), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((Tp, n * S), jnp.float32),
        scratch_shapes=[
            pltpu.VMEM((2, S, D), codes.dtype),
            pltpu.VMEM((2, 1, S), jnp.float32),
            pltpu.SemaphoreType.DMA((2, 2)),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
    )(pg, limit[:, None], qp, wp, codes, scales)
    return out[:T]


def _kernel(
    pages_smem, limit_ref, q_ref, w_ref, codes_hbm, scales_hbm, out_ref, kbuf, sbuf, sems, *, tb, n, S, compute
):
    total = tb * n

    def copies(it, b):
        page = pages_smem[it // n, it % n]
        return (
            pltpu.make_async_copy(codes_hbm.at[page], kbuf.at[b], sems.at[0, b]),
            pltpu.make_async_copy(scales_hbm.at[page], sbuf.at[b], sems.at[1, b]),
        )

    for cp in copies(0, 0):
        cp.start()

    def step(it, carry):
        b = it % 2
        t, c = it // n, it % n

        @pl.when(it + 1 < total)
        def _():
            for cp in copies(it + 1, 1 - b):
                cp.start()

        for cp in copies(it, b):
            cp.wait()
        keys = kbuf[b].astype(jnp.float32).astype(compute)  # [S, D] exact FP8 values
        dots = jax.lax.dot_general(
            q_ref[t].astype(compute), keys, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )  # [H, S]
        w = w_ref[pl.ds(t, 1), :]  # [1, H]
        scores = (
            jax.lax.dot_general(
                w,
                jnp.maximum(dots, 0.0),
                (((1,), (0,)), ((), ())),
                preferred_element_type=jnp.float32,
                precision=jax.lax.Precision.HIGHEST,
            )
            * sbuf[b]
        )  # [1, S]
        j = c * S + jax.lax.broadcasted_iota(jnp.int32, (1, S), 1)
        out_ref[pl.ds(t, 1), pl.ds(c * S, S)] = jnp.where(j <= limit_ref[pl.ds(t, 1), :], scores + 0.0, -jnp.inf)
        return carry

    jax.lax.fori_loop(0, total, step, 0)

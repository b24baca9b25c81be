"""Exact top-k threshold on the TPU (dsa.md §5): a Pallas radix select with the lowest-position tie rule.

`topk_threshold(vals, k)` finds, for each row of `vals` `[T, N]` (float32, finite or −inf), the `k`-th
largest value and how many of the entries equal to it to take, counted from the left:

1. *Radix select.* Scores become order keys (the float's bits with the sign folded so that signed
   int32 comparison orders them like the floats; `+0.0` is added first, so −0.0 ties with +0.0). The
   k-th largest key is built bit by bit from the top: a bit is kept when at least `k` keys are at or
   above the prefix with that bit set — 32 passes of compare-and-count over the row, all in VMEM.
2. *Ties.* `need = k − #(keys above it)` entries equal to the threshold are taken, the leftmost ones:
   the cut index is found the same way over the index bits (`#(equal keys left of the cut) ≥ need`).

Every step is integer compare-and-count: exact and deterministic (replicas computing it agree), no
sort. `select_topk_device` keeps its running candidates ordered by position, so "leftmost" is "lowest
position", the tie rule of dsa.md §5, and the kept entries come out already in ascending position.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dsa_hybrid.ops.tpu import block_sizes

_SIGN = -(2**31)  # int32 with only the sign bit set


def order_keys(vals: jax.Array) -> jax.Array:
    """int32 keys whose signed order is the order of the float32 `vals` (−0.0 folded into +0.0)."""
    u = jax.lax.bitcast_convert_type(vals.astype(jnp.float32) + 0.0, jnp.int32)
    # Negative floats: flip every bit (larger magnitude → smaller); positive: flip the sign bit. Then
    # flip the sign bit again so the unsigned order becomes the signed int32 order.
    flipped = jnp.where(u < 0, ~u, u ^ jnp.int32(_SIGN))
    return flipped ^ jnp.int32(_SIGN)


def topk_threshold(vals: jax.Array, k: int, *, rows_per_step: int = 8, interpret: Any = False) -> jax.Array:
    """int32 `[T, 2]`: per row of `vals` `[T, N]` (N ≥ k), the order key of the k-th largest value and the
    cut index `J`: the top k are the entries with a larger key plus the entries with an equal key at
    index < J."""
    T, N = vals.shape
    if not 1 <= k <= N:
        raise ValueError(f"k: must be in [1, {N}], got {k}")
    if T == 0:
        return jnp.zeros((0, 2), jnp.int32)
    tb = max(1, min(rows_per_step, T))
    Tp = -(-T // tb) * tb
    Np = -(-N // 128) * 128
    keys = jnp.pad(order_keys(vals), ((0, Tp - T), (0, Np - N)), constant_values=jnp.iinfo(jnp.int32).min)
    index_bits = max(1, int(Np).bit_length())
    need = 2 * block_sizes.tile_bytes((tb, Np), 4) + 4 * block_sizes.tile_bytes((tb, Np), 4)
    block_sizes.record("topk_threshold", None, need, None, rows_per_step=tb, width=Np)
    passes = 32 + index_bits
    cost = pl.CostEstimate(flops=3 * passes * Tp * Np, transcendentals=0, bytes_accessed=Tp * Np * 4 + Tp * 512)
    out = pl.pallas_call(
        functools.partial(_kernel, k=k, index_bits=index_bits),
        grid=(Tp // tb,),
        in_specs=[pl.BlockSpec((tb, Np), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((tb, 128), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((Tp, 128), jnp.int32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
        cost_estimate=cost,
        name="topk_threshold",
    )(keys)
    return out[:T, :2]


def _kernel(keys_ref, out_ref, *, k, index_bits):
    keys = keys_ref[...]  # [tb, N] int32, signed order = value order
    tb, n = keys.shape

    def count(mask):  # [tb, 1] int32
        return jnp.sum(mask.astype(jnp.int32), axis=1, keepdims=True)

    # 1. The k-th largest key, bit by bit in the unsigned domain (u = key ^ sign bit).
    def key_bit(j, prefix):  # prefix: [tb, 1] unsigned bits held in an int32
        bit = jax.lax.shift_left(jnp.int32(1), 31 - j)
        cand = prefix | bit
        keep = count(keys >= (cand ^ jnp.int32(_SIGN))) >= k
        return jnp.where(keep, cand, prefix)

    kth = jax.lax.fori_loop(0, 32, key_bit, jnp.zeros((tb, 1), jnp.int32)) ^ jnp.int32(_SIGN)
    # 2. Ties: the smallest cut J with #(keys == kth at index < J) >= need.
    need = k - count(keys > kth)
    eq = keys == kth
    idx = jax.lax.broadcasted_iota(jnp.int32, (tb, n), 1)

    def cut_bit(j, below):  # the largest J0 with #(eq & idx < J0) < need
        cand = below | jax.lax.shift_left(jnp.int32(1), index_bits - 1 - j)
        return jnp.where(count(eq & (idx < cand)) < need, cand, below)

    cut = jax.lax.fori_loop(0, index_bits, cut_bit, jnp.zeros((tb, 1), jnp.int32)) + 1
    lane = jax.lax.broadcasted_iota(jnp.int32, (tb, 128), 1)
    out_ref[...] = jnp.where(lane == 0, kth, jnp.where(lane == 1, cut, 0))


def select_mask(vals: jax.Array, threshold: jax.Array) -> jax.Array:
    """bool `[T, N]`: the entries `topk_threshold` keeps (finite ones only: −inf is never selected)."""
    keys = order_keys(vals)
    kth, cut = threshold[:, :1], threshold[:, 1:2]
    idx = jnp.arange(vals.shape[1], dtype=jnp.int32)[None, :]
    return (vals > -jnp.inf) & ((keys > kth) | ((keys == kth) & (idx < cut)))

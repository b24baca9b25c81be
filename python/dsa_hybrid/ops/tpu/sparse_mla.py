"""The Pallas TPU kernel of `sparse_mla` (dsa.md §3): each query token attends over its own K latent rows.

Per grid step the kernel takes `tokens_per_step` query tokens. For each token it walks its valid slots
in chunks of `chunk` rows: each token is gathered from the paged cache in HBM by one row DMA per part of
`LatentCache`'s exact-size layout (its own `c_kv` row; the 128-word rope row it shares with 3 other
tokens; for FP8 the scale row it shares with 31 others: 32-bit rows at a dynamic row offset, which
Mosaic accepts on every chip) into double-buffered VMEM — the next chunk's DMAs (also across tokens) fly
while this one is computed —, decoded in VMEM into lane-aligned column blocks (bf16 halves by shift and
mask, FP8 codes by byte plane, exactly, times their tile scale picked out of the scale row; the token's
rope window of its shared row kept by a lane mask, the query's rope part repeated in every window), and
an online softmax in float32 accumulates `[h, d_v]` on the MXU (`[h, Wk] × [Wk, chunk]`, then
`[h, chunk] × [chunk, d_v]`).

Invalid entries (−1, out of range, past `topk_length`) are given distinct in-range slots by the
wrapper (no DMA reads out of range or hammers one address) and masked out of the softmax by a mask
block laid out `[tokens, chunks, 1, chunk]`, so the kernel indexes it on leading dimensions only; the
mask also carries each entry's offset in its page (`1 + offset`, 0 for invalid), from which the kernel
finds the entry's rope and scale windows (turned into a column by a masked sum against the identity).
The end of each token's last valid entry comes through scalar prefetch: the chunks after it are neither
fetched nor computed (a token with no valid entry costs nothing and returns `out = 0`, `lse = +inf`).

`prefix_mla_tpu` is the dense-prefix fast path of the same kernel: when a row selects every visible
token (dsa.md §5, `p_t + 1 ≤ K`), its rows are whole pages of its block table, so each chunk is one page:
one DMA of its `c_kv` rows, one row DMA per token of the shared rope / scale rows (a token's window is
then its offset in the page), and only the pages below the row's length are fetched.

What Mosaic requires and this kernel keeps (checked by `tpu/compile.py` for v5e, v6e, v5p, TPU7x):
dynamic indices only on untiled leading dimensions of VMEM blocks (`q_ref[t]`, `out_ref[t]`,
`lse_ref[t]` with `lse` laid out `[T, 1, h]`); DMA offsets on a tiled dimension only for 32-bit rows,
whole 512-byte granules; lane slices and concatenations on multiples of 128; block shapes full or
(8, 128)-divisible. The queries are rearranged once per call into the kernel's column order
(`kernel_plan`), with zeros against the alignment padding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dsa_hybrid.ops.latent_cache import FP8_TILE, LANES, CacheLayout, LatentCache
from dsa_hybrid.ops.target import tpu_chip
from dsa_hybrid.ops.tpu import block_sizes


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
    tokens_per_step: int | None = None,
    chunk: int | None = None,
    interpret: Any = False,
) -> tuple[jax.Array, jax.Array]:
    """`sparse_mla` on the Pallas TPU kernel (arguments as there). `interpret`: False on a TPU target, or
    `pltpu.InterpretParams(...)` / True to run the kernel in TPU interpret mode on any backend.
    `tokens_per_step` / `chunk` override the chip's entries in `block_sizes.SPARSE_MLA`."""
    from dsa_hybrid.ops.sparse_mla import valid_mask

    chip = None if interpret is not False else tpu_chip()
    blocks = block_sizes.sparse_mla_blocks(chip)
    T, K = slots.shape
    kc = min(chunk or blocks.chunk, _round_up(K, 8))
    Kp = _round_up(K, kc)
    valid = jnp.pad(valid_mask(cache, slots, topk_length), ((0, 0), (0, Kp - K)))
    # Invalid entries fetch distinct in-range slots (no DMA out of range, none hammering one address)
    # and are masked; the chunks after a token's last valid entry are not fetched at all.
    fill = (jnp.arange(T, dtype=jnp.int32)[:, None] * Kp + jnp.arange(Kp, dtype=jnp.int32)[None, :]) % cache.num_slots
    addr = jnp.where(valid, jnp.pad(slots.astype(jnp.int32), ((0, 0), (0, Kp - K))), fill)
    last = jnp.max(jnp.where(valid, jnp.arange(1, Kp + 1, dtype=jnp.int32)[None, :], 0), axis=1)
    code = jnp.where(valid, addr % cache.page_size + 1, 0)  # 1 + the entry's offset in its page; 0: masked
    mask = code.astype(jnp.int32).reshape(T, Kp // kc, 1, kc)
    return _attention_call(
        q, cache, addr, last, mask, mode="rows", kc=kc, scale=scale, d_v=d_v, chip=chip,
        tb=tokens_per_step or blocks.tokens_per_step, interpret=interpret,
    )  # fmt: skip


def prefix_mla_tpu(
    q: jax.Array,
    cache: LatentCache,
    block_tables: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    d_v: int,
    tokens_per_step: int | None = None,
    interpret: Any = False,
) -> tuple[jax.Array, jax.Array]:
    """`prefix_mla` on the Pallas TPU kernel: one page DMA per chunk (arguments as there)."""
    chip = None if interpret is not False else tpu_chip()
    tb = tokens_per_step or block_sizes.sparse_mla_blocks(chip).tokens_per_step
    return _attention_call(
        q, cache, block_tables.astype(jnp.int32), lengths.astype(jnp.int32), None, mode="pages", kc=cache.page_size,
        scale=scale, d_v=d_v, chip=chip, tb=tb, interpret=interpret,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """How a cache's parts become the kernel's decoded row `[c_kv planes (main_width) | rope lo (row) |
    rope hi (row)]` of width `wk`; values are its first `wv` columns."""

    lay: CacheLayout
    main_cols: np.ndarray  # kernel column of each natural c_kv column (f32: of each row column)
    wk: int
    wv: int

    @property
    def rope_row(self) -> int:
        return self.lay.rope.row if self.lay.rope is not None else 0


def kernel_plan(cache: LatentCache, d_v: int) -> KernelPlan:
    """The decoded row's column plan for values of width `d_v` (≤ `latent_dim` for bf16 / FP8)."""
    lay = cache.layout
    if lay.kind != "f32" and d_v > lay.latent_dim:
        raise ValueError(f"d_v: the Pallas kernel reads values from c_kv only (d_v <= {lay.latent_dim}), got {d_v}")
    cols = lay.main_columns()
    rope_row = lay.rope.row if lay.rope is not None else 0
    wk = lay.main_width + 2 * rope_row
    wv = min(_round_up(int(cols[:d_v].max()) + 1, LANES), lay.main_width)
    return KernelPlan(lay, cols, wk, wv)


def cache_parts(cache: LatentCache) -> list[jax.Array]:
    """The cache's arrays in the HBM order the kernels gather from: `c_kv` rows, then the shared rope and
    scale rows where the layout has them."""
    return [a for a in (cache.data, cache.rope, cache.scales) if a is not None]


def attention_scratch(parts: list[jax.Array], kc: int, rows: int, wv: int) -> list[Any]:
    """The VMEM scratch of both attention kernels (this one and `query_blocks`): each cache part's
    double-buffered `[2, kc, row]` gather buffer, one DMA semaphore per part and buffer slot, and the
    online softmax's float32 state `acc [rows, wv]`, `m [rows, 1]`, `l [rows, 1]` (`rows` = query rows ×
    heads of one softmax). `AttentionScratch.of` takes the refs back in the kernel."""
    return [
        *[pltpu.VMEM((2, kc, a.shape[-1]), a.dtype) for a in parts],
        pltpu.SemaphoreType.DMA((2 * len(parts),)),
        pltpu.VMEM((rows, wv), jnp.float32),
        pltpu.VMEM((rows, 1), jnp.float32),
        pltpu.VMEM((rows, 1), jnp.float32),
    ]


def scratch_bytes(plan: KernelPlan, kc: int, rows: int) -> int:
    """VMEM bytes of `attention_scratch` (tile-padded)."""
    t = block_sizes.tile_bytes
    lay = plan.lay
    parts = [lay.main_words] + [w.row for w in (lay.rope, lay.scales) if w is not None]
    return sum(t((2 * kc, p), 4) for p in parts) + t((rows, plan.wv), 4) + 2 * t((rows, 1), 4)


def offset_column(code: jax.Array, kc: int) -> jax.Array:
    """int32 `[kc, 1]`: a mask row `[1, kc]` of `1 + offset in page` (0: invalid) as each entry's offset
    (−1 for an invalid one), turned into a column by a masked sum against the identity (exact)."""
    eye = jax.lax.broadcasted_iota(jnp.int32, (kc, kc), 0) == jax.lax.broadcasted_iota(jnp.int32, (kc, kc), 1)
    return jnp.sum(jnp.where(eye, code - 1, 0), axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class AttentionScratch:
    """Inside a kernel: the refs of `attention_scratch` and what both kernels do with them — gather a
    chunk's entries by row DMAs, wait for a buffer slot, decode it, run one online-softmax step, and
    turn the state into `out` and `lse`."""

    lay: CacheLayout
    bufs: tuple[Any, ...]
    sems: Any
    acc: Any
    m: Any
    l: Any  # noqa: E741 (the softmax's l)

    @staticmethod
    def of(lay: CacheLayout, refs: tuple[Any, ...]) -> AttentionScratch:
        """The scratch refs (`attention_scratch`'s order, the kernel's trailing refs)."""
        n = len(refs) - 4
        sems, acc, m, l = refs[n:]  # noqa: E741
        return AttentionScratch(lay, tuple(refs[:n]), sems, acc, m, l)

    @property
    def groups(self) -> list[int]:
        """Tokens per row of each part (1 for `c_kv`; the rope / scale rows are shared)."""
        return [1] + [w.group for w in (self.lay.rope, self.lay.scales) if w is not None]

    def fetch_entry(self, hbm: tuple[Any, ...], slot: jax.Array, page_size: int, b: Any, j: jax.Array) -> None:
        """Start the row DMAs of the entry at `slot` (all parts) into row `j` of buffer slot `b`."""
        page = slot // page_size
        off = slot - page * page_size
        for p, g in enumerate(self.groups):
            src = hbm[p].at[page, pl.ds(off // g, 1)]
            pltpu.make_async_copy(src, self.bufs[p].at[b, pl.ds(j, 1)], self.sems.at[2 * p + b]).start()

    def wait(self, b: Any) -> None:
        # Semaphores count bytes: one wait on a descriptor of a whole buffer slot covers its kc row DMAs.
        for p, buf in enumerate(self.bufs):
            pltpu.make_async_copy(buf.at[b], buf.at[b], self.sems.at[2 * p + b]).wait()

    def decoded(self, b: Any, off: jax.Array | None) -> jax.Array:
        """float32 `[kc, wk]`: buffer slot `b` decoded (`decode_chunk`)."""
        lay = self.lay
        rope = self.bufs[1][b] if lay.rope is not None else None
        scales = self.bufs[-1][b] if lay.scales is not None else None
        return decode_chunk(lay, self.bufs[0][b], rope, scales, off)

    def reset(self) -> None:
        self.m[...] = jnp.full(self.m.shape, -jnp.inf, jnp.float32)
        self.l[...] = jnp.zeros(self.l.shape, jnp.float32)
        self.acc[...] = jnp.zeros(self.acc.shape, jnp.float32)

    def step(self, q: jax.Array, kv: jax.Array, live: jax.Array, *, scale: float, wv: int, compute: Any) -> None:
        """One online-softmax step: queries `q [rows, wk]` against the decoded chunk `kv [kc, wk]` (in
        `compute`), entries where `live` (`[rows, kc]` or broadcastable) attend; values `kv[:, :wv]`."""
        precision = jax.lax.Precision.HIGHEST if compute == jnp.float32 else None
        logits = jax.lax.dot_general(
            q, kv, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
        )  # [rows, kc]
        logits = jnp.where(live, logits * scale, -jnp.inf)
        m_prev = self.m[...]
        m_new = jnp.maximum(m_prev, logits.max(axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(logits - m_safe)
        self.l[...] = alpha * self.l[...] + p.sum(axis=1, keepdims=True)
        pv = jax.lax.dot_general(
            p.astype(compute), kv[:, :wv], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
            precision=precision,
        )  # fmt: skip
        self.acc[...] = alpha * self.acc[...] + pv
        self.m[...] = m_new

    def result(self) -> tuple[jax.Array, jax.Array]:
        """`(out [rows, wv], lse [1, rows])` of the state (no entry: `out = 0`, `lse = +inf`); lse as a
        row, by a masked sum against the identity."""
        rows = self.acc.shape[0]
        denom = self.l[...]
        empty = denom == 0.0
        safe = jnp.where(empty, 1.0, denom)
        out = jnp.where(empty, 0.0, self.acc[...] / safe)
        m = self.m[...]
        lse = jnp.where(empty, jnp.inf, jnp.where(m == -jnp.inf, 0.0, m) + jnp.log(safe))  # [rows, 1]
        iota = functools.partial(jax.lax.broadcasted_iota, jnp.int32, (rows, rows))
        eye = iota(0) == iota(1)
        return out, jnp.sum(jnp.where(eye, lse, 0.0), axis=0, keepdims=True)


def vmem_need(plan: KernelPlan, h: int, tb: int, kc: int, q_itemsize: int, mask_chunks: int = 0) -> int:
    """VMEM bytes of one launch: double-buffered q / out / lse (/ mask) blocks, the part buffers, the
    softmax state, and the decoded chunk with its logits and the identity of the offset column
    (Mosaic's temporaries, counted twice)."""
    t = block_sizes.tile_bytes
    lay, wk, wv = plan.lay, plan.wk, plan.wv
    blocks = 2 * (tb * t((h, wk), q_itemsize) + tb * t((h, wv), 4) + tb * t((1, h), 4))
    blocks += 2 * tb * mask_chunks * t((1, kc), 4)
    shared_rows = lay.rope is not None or lay.scales is not None
    temps = 2 * (t((kc, wk), 4) + 2 * t((h, kc), 4) + t((h, wv), 4) + (t((kc, kc), 4) if shared_rows else 0))
    return blocks + scratch_bytes(plan, kc, h) + temps


def _attention_call(
    q: jax.Array,
    cache: LatentCache,
    addr: jax.Array,
    limit: jax.Array,
    mask: jax.Array | None,
    *,
    mode: str,
    kc: int,
    scale: float,
    d_v: int,
    chip: str | None,
    tb: int,
    interpret: Any,
) -> tuple[jax.Array, jax.Array]:
    """Run the kernel. `addr` int32 `[T, n]`: slots (mode "rows", `n = chunks · kc`, all in range) or
    block tables (mode "pages", −1 padded), streamed through SMEM per grid step; `limit` int32 `[T]`, in
    SMEM for the whole call: the end of the last valid entry (rows) or the length (pages); `mask` (rows)
    int32 `[T, chunks, 1, kc]`: `1 + offset in page` where an entry attends, 0 elsewhere (its tile-row is
    indexed on leading dimensions only)."""
    T, h, W = q.shape
    plan = kernel_plan(cache, d_v)
    lay = plan.lay
    compute = jnp.bfloat16 if q.dtype == jnp.bfloat16 else jnp.float32
    tb = max(1, min(tb, T))
    cap = block_sizes.capacity(chip)
    nm = 0 if mask is None else mask.shape[1]
    isz = jnp.dtype(compute).itemsize
    while tb > 1 and vmem_need(plan, h, tb, kc, isz, nm) + block_sizes.VMEM_MARGIN > cap:
        tb //= 2
    need = vmem_need(plan, h, tb, kc, isz, nm)
    limit_bytes = block_sizes.vmem_limit(chip, need, cap)
    Tp = _round_up(max(T, 1), tb)
    addr = jnp.pad(addr, ((0, Tp - T), (0, 0)))
    limit = jnp.pad(limit, (0, Tp - T))
    qk = jnp.pad(to_kernel_columns(q.astype(compute), plan), ((0, Tp - T), (0, 0), (0, 0)))
    extra_in, extra_args = [], []
    if mask is not None:
        mask = jnp.pad(mask, ((0, Tp - T), (0, 0), (0, 0), (0, 0)))
        extra_in = [pl.BlockSpec((tb, *mask.shape[1:]), lambda i, lim: (i, 0, 0, 0))]
        extra_args = [mask]
    parts = cache_parts(cache)
    block_sizes.record(f"sparse_mla_{mode}", chip, need, limit_bytes, tokens_per_step=tb, chunk=kc)
    # What the kernel moves and multiplies at most (every slot valid), for XLA's cost analysis.
    entries = Tp * addr.shape[1] * (kc if mode == "pages" else 1)
    cost = pl.CostEstimate(
        flops=2 * entries * h * (plan.wk + plan.wv),
        transcendentals=entries * h,
        bytes_accessed=entries * cache.bytes_read_per_token + qk.size * qk.dtype.itemsize + Tp * h * (plan.wv + 1) * 4,
    )
    kernel = functools.partial(
        _kernel, plan=plan, mode=mode, page_size=cache.page_size, tb=tb, kc=kc, n_addr=addr.shape[1],
        scale=scale, compute=compute, n_parts=len(parts),
    )  # fmt: skip
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(Tp // tb,),
            in_specs=[
                pl.BlockSpec((tb, addr.shape[1]), lambda i, lim: (i, 0), memory_space=pltpu.SMEM),
                pl.BlockSpec((tb, h, plan.wk), lambda i, lim: (i, 0, 0)),
                *extra_in,
                *[pl.BlockSpec(memory_space=pl.ANY) for _ in parts],
            ],
            out_specs=[
                pl.BlockSpec((tb, h, plan.wv), lambda i, lim: (i, 0, 0)),
                pl.BlockSpec((tb, 1, h), lambda i, lim: (i, 0, 0)),
            ],
            scratch_shapes=attention_scratch(parts, kc, h, plan.wv),
        ),
        out_shape=[
            jax.ShapeDtypeStruct((Tp, h, plan.wv), jnp.float32),
            jax.ShapeDtypeStruct((Tp, 1, h), jnp.float32),
        ],
        # Grid steps share no state (each starts and drains its own DMAs): megacore may split them.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",), vmem_limit_bytes=limit_bytes),
        interpret=interpret,
        cost_estimate=cost,
        name=f"sparse_mla_{mode}_{lay.kind}",
    )(limit, addr, qk, *extra_args, *parts)
    return from_kernel_columns(out[:T], plan.main_cols[:d_v]), lse[:T, 0]


def _runs(cols: np.ndarray) -> list[tuple[int, int, int]]:
    """`(natural start, kernel start, length)` of the runs where consecutive columns stay consecutive."""
    runs, start = [], 0
    for i in range(1, len(cols) + 1):
        if i == len(cols) or cols[i] != cols[i - 1] + 1:
            runs.append((start, int(cols[start]), i - start))
            start = i
    return runs


def _place(q: jax.Array, cols: np.ndarray, width: int) -> jax.Array:
    """`q` `[..., n]` moved to columns `cols` of a `[..., width]` block, zeros elsewhere (slices and pads)."""
    if np.array_equal(cols, np.arange(width)):
        return q
    parts, at = [], 0
    for nat, ker, n in _runs(cols):
        if ker > at:
            parts.append(jnp.zeros((*q.shape[:-1], ker - at), q.dtype))
        parts.append(q[..., nat : nat + n])
        at = ker + n
    if width > at:
        parts.append(jnp.zeros((*q.shape[:-1], width - at), q.dtype))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def to_kernel_columns(q: jax.Array, plan: KernelPlan) -> jax.Array:
    """`q` `[..., L + R]` in the kernel's column order `[..., wk]`: the c_kv columns where the decoded
    planes put them, and the rope part's two halves each repeated in every rope window."""
    lay = plan.lay
    if lay.kind == "f32":
        return _place(q, plan.main_cols, plan.wk)
    L = lay.latent_dim
    blocks = [_place(q[..., :L], plan.main_cols, lay.main_width)]
    win = lay.rope
    if win is not None:
        rw = win.words
        qr = jnp.pad(q[..., L:], [(0, 0)] * (q.ndim - 1) + [(0, 2 * rw - lay.rope_dim)])
        for half in (qr[..., :rw], qr[..., rw:]):
            cols = (np.arange(win.group)[:, None] * win.window + np.arange(rw)[None, :]).reshape(-1)
            blocks.append(_place(jnp.concatenate([half] * win.group, axis=-1), cols, win.row))
    return jnp.concatenate(blocks, axis=-1) if len(blocks) > 1 else blocks[0]


def from_kernel_columns(out: jax.Array, cols: np.ndarray) -> jax.Array:
    """The natural columns `cols` (kernel positions of columns 0 … d_v−1) of a kernel output."""
    return jnp.concatenate([out[..., ker : ker + n] for _, ker, n in _runs(cols)], axis=-1)


def _e4m3_to_f32(code: jax.Array) -> jax.Array:
    """Exact float32 value of e4m3fn codes (int32 in [0, 255]; dsa.md §4), without FP8 hardware:
    `(8 + m) · 2^(e − 10)` for normals, `m · 2^−9` for subnormals; the power of two is built from its
    exponent bits (never a float32 subnormal)."""
    mag = code & 0x7F
    e = jax.lax.shift_right_logical(mag, 3)
    m = mag & 7
    mant = jnp.where(e == 0, m, m + 8).astype(jnp.float32)
    pw = jax.lax.bitcast_convert_type(jax.lax.shift_left(jnp.maximum(e, 1) + 117, 23), jnp.float32)
    v = mant * pw
    return jnp.where(code >= 128, -v, v)


def _window_of_lane(win: Any, width: int) -> jax.Array:
    """int32 `[1, width]`: the window each lane of a shared row belongs to."""
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
    if win.group == 1:
        return jnp.zeros_like(lane)
    return jax.lax.shift_right_logical(lane, int(win.window).bit_length() - 1)  # windows are powers of two


def decode_chunk(
    lay: CacheLayout, main: jax.Array, rope: jax.Array | None, scales: jax.Array | None, off: jax.Array | None
) -> jax.Array:
    """float32 `[rows, wk]` of a chunk's parts in the kernel's column order `[c_kv planes | rope lo |
    rope hi]`: `main` `[rows, A]`, the shared `rope` / `scales` rows `[rows, row]` gathered for each
    entry, `off` int32 `[rows, 1]` each entry's offset in its page (its windows: `off mod group`).
    bf16: low halves, high halves; FP8: four byte planes times their tile scales; rope: the entry's own
    window of its shared row, other lanes zero. Every block is 128-lane aligned."""
    if lay.kind == "f32":
        return main.astype(jnp.float32)
    xi = jax.lax.bitcast_convert_type(main, jnp.int32)
    if lay.kind == "bf16":
        lo = jax.lax.bitcast_convert_type(jax.lax.shift_left(xi, 16), jnp.float32)
        hi = jax.lax.bitcast_convert_type(xi & jnp.int32(-65536), jnp.float32)
        blocks = [lo, hi]
    else:
        assert scales is not None and off is not None and lay.scales is not None
        win = lay.scales
        sc = jax.lax.bitcast_convert_type(scales, jnp.float32)
        lane = jax.lax.broadcasted_iota(jnp.int32, (1, win.row), 1)
        first = (off & (win.group - 1)) * win.window  # [rows, 1]
        tile_scale = [
            jnp.sum(jnp.where(lane == first + k, sc, 0.0), axis=1, keepdims=True) for k in range(lay.n_scales)
        ]  # the entry's scale of tile k, a column (a sum of one value and zeros: exact)
        A = lay.main_words
        per = lay.latent_dim // 4
        lanes = jax.lax.broadcasted_iota(jnp.int32, (1, A), 1)
        blocks = []
        for j in range(4):
            code = jax.lax.shift_right_logical(xi, 8 * j) & 0xFF
            lo_t, hi_t = (j * per) // FP8_TILE, (j * per + per - 1) // FP8_TILE
            if lo_t == hi_t:
                s = tile_scale[lo_t]
            else:  # a plane spanning several tiles (latent_dim > 512)
                tile = (j * per + lanes) // FP8_TILE
                s = functools.reduce(jnp.add, [jnp.where(tile == k, tile_scale[k], 0.0) for k in range(lo_t, hi_t + 1)])
            blocks.append(_e4m3_to_f32(code) * s)
    if rope is not None:
        assert off is not None and lay.rope is not None
        win = lay.rope
        own = _window_of_lane(win, win.row) == (off & (win.group - 1))  # [rows, row]
        ri = jax.lax.bitcast_convert_type(rope, jnp.int32)
        blocks.append(jnp.where(own, jax.lax.bitcast_convert_type(jax.lax.shift_left(ri, 16), jnp.float32), 0.0))
        blocks.append(jnp.where(own, jax.lax.bitcast_convert_type(ri & jnp.int32(-65536), jnp.float32), 0.0))
    return jnp.concatenate(blocks, axis=1)


def _kernel(
    limit_ref: Any,
    addr_ref: Any,
    q_ref: Any,
    *refs: Any,
    plan: KernelPlan,
    mode: str,
    page_size: int,
    tb: int,
    kc: int,
    n_addr: int,
    scale: float,
    compute: Any,
    n_parts: int,
) -> None:
    mask_ref = None
    if mode == "rows":
        mask_ref, refs = refs[0], refs[1:]
    hbm, refs = refs[:n_parts], refs[n_parts:]
    out_ref, lse_ref, refs = refs[0], refs[1], refs[2:]
    st = AttentionScratch.of(plan.lay, refs)
    i = pl.program_id(0)

    def n_chunks(t: jax.Array) -> jax.Array:
        lim = limit_ref[i * tb + t]
        n = (lim + kc - 1) // kc
        return jnp.minimum(n, n_addr) if mode == "pages" else n

    def live(t: jax.Array, c: jax.Array) -> jax.Array:
        """bool `[1, kc]`: the entries of chunk `c` of token `t` that attend."""
        if mask_ref is not None:
            return mask_ref[t, c] != 0
        lim = jnp.where(addr_ref[t, c] >= 0, limit_ref[i * tb + t] - c * kc, 0)  # a prefix of the page
        return jax.lax.broadcasted_iota(jnp.int32, (1, kc), 1) < lim

    def offsets(t: jax.Array, c: jax.Array) -> jax.Array | None:
        """int32 `[kc, 1]`: each entry's offset in its page (−1 for an invalid one), as a column."""
        if n_parts == 1:
            return None
        if mask_ref is None:  # pages: the chunk is the page, in order
            return jax.lax.broadcasted_iota(jnp.int32, (kc, 1), 0)
        return offset_column(mask_ref[t, c], kc)

    def issue(t: jax.Array, c: jax.Array | int, b: jax.Array) -> None:
        if mode == "pages":
            page = jnp.maximum(addr_ref[t, c], 0)
            pltpu.make_async_copy(hbm[0].at[page], st.bufs[0].at[b], st.sems.at[b]).start()
            groups = st.groups

            def shared(j: jax.Array, carry: int) -> int:
                for p in range(1, n_parts):
                    src = hbm[p].at[page, pl.ds(j // groups[p], 1)]
                    pltpu.make_async_copy(src, st.bufs[p].at[b, pl.ds(j, 1)], st.sems.at[2 * p + b]).start()
                return carry

            if n_parts > 1:
                jax.lax.fori_loop(0, kc, shared, 0, unroll=min(kc, 8))
            return

        def row(j: jax.Array, carry: int) -> int:
            st.fetch_entry(hbm, addr_ref[t, c * kc + j], page_size, b, j)
            return carry

        jax.lax.fori_loop(0, kc, row, 0, unroll=min(kc, 8))

    def attend(t: jax.Array, c: jax.Array, b: jax.Array) -> None:
        kv = st.decoded(b, offsets(t, c)).astype(compute)  # [kc, Wk]
        st.step(q_ref[t], kv, live(t, c), scale=scale, wv=plan.wv, compute=compute)

    def finish(t: jax.Array) -> None:
        out, lse = st.result()
        out_ref[t] = out
        lse_ref[t] = lse  # [1, h]

    def token(t: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        b, prefetched = carry
        nc = n_chunks(t)
        has_next = t + 1 < tb
        next_nc = jnp.where(has_next, n_chunks(jnp.minimum(t + 1, tb - 1)), 0)

        @pl.when((nc > 0) & (prefetched == 0))
        def _() -> None:
            issue(t, 0, b)

        st.reset()

        def chunk(c: jax.Array, b: jax.Array) -> jax.Array:
            nb = 1 - b

            @pl.when(c + 1 < nc)
            def _() -> None:
                issue(t, c + 1, nb)

            @pl.when((c + 1 == nc) & (next_nc > 0))
            def _() -> None:
                issue(t + 1, 0, nb)  # the next token's first chunk flies during this one

            st.wait(b)
            attend(t, c, b)
            return nb

        b = jax.lax.fori_loop(0, nc, chunk, b)
        finish(t)
        return b, ((nc > 0) & (next_nc > 0)).astype(jnp.int32)

    jax.lax.fori_loop(0, tb, token, (jnp.int32(0), jnp.int32(0)))

"""The lightning indexer on the device (dsa.md §4, §5): FP8 key pages in device memory, scores and top-k in JAX.

`IndexerPages` holds the same bytes as the host `IndexerKeyCache` pages (dsa.md §6: per page,
`page_size × D` e4m3fn codes token-major, then `page_size` float32 scales), split into two arrays so
a TPU can DMA a page of either: `codes` uint8 `[num_pages, page_size, D]` (the e4m3fn bit
patterns: XLA on CPU upcasts a whole float8 array to update one row of it, a byte array it updates
in place; `fp8_codes()` views them as float8_e4m3fn) and `scales` float32 `[num_pages, 1,
page_size]`. `from_host_pages` / `to_host_pages` move pages either way
unchanged (a view of the bytes), so the host and the device can take turns at indexing one sequence.

`select_topk_device` scores every visible key of each query row from those pages and keeps its top-k.
It walks the keys in chunks with a running top-k, so a long prefill never holds a `[T, L]` score
matrix, only `[rows, chunk]` at a time. Each step merges `[running k | chunk]` with the exact top-k
select of `ops.tpu.topk`, no sort: on the Pallas path (`backend="pallas_tpu"`, or "auto" on a TPU
target, where the chunk is also scored by `ops.tpu.indexer`: one MXU matmul for all rows × heads of a
block when they read the same pages) the kernel `topk_select`, on the XLA path its twin
`topk_select_xla` (which replaced a stable `lax.top_k` and a final sort: the same set, and faster
merges on CPU for decode rows). Both return the chosen columns ascending, ties to the lowest column.
The running entries are kept in ascending position, so that is the lowest position (dsa.md §5) and
the kept entries stay ascending; the unfilled (−inf) running entries are always the leftmost, so the
end rotates them behind the positions as the −1 padding. The scores are exact FP8 products
accumulated in float32 (as on the host, in another order: rows may differ from the host's only among
near-ties).

On a TPU the codes are read in place by the scoring kernel (uint8 pages, reinterpreted in VMEM; no
converted copy of the cache), and both arrays compile to exactly 132 bytes per token: `[P, 64, 128]`
bytes fill whole (32, 128) tiles, and XLA lays the small scale array out page-minor.
NaN cannot be reported from inside a jitted function: `q` and `weights` must be finite (the host path
checks them); keys in the pages are finite by construction.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsa_hybrid.ops.latent_cache import quantize_rows
from dsa_hybrid.ops.target import resolve_backend, target_is_tpu

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class IndexerPages:
    """Device copy of indexer-key pages (see the module docstring)."""

    codes: jax.Array  # uint8 [num_pages, page_size, D]: e4m3fn bit patterns
    scales: jax.Array  # float32 [num_pages, 1, page_size]

    @property
    def num_pages(self) -> int:
        return self.codes.shape[0]

    @property
    def page_size(self) -> int:
        return self.codes.shape[1]

    @property
    def head_dim(self) -> int:
        return self.codes.shape[2]

    @staticmethod
    def create(num_pages: int, page_size: int = 64, head_dim: int = 128) -> IndexerPages:
        """All-zero pages (the bytes of a fresh host cache)."""
        if num_pages < 1 or page_size < 1 or head_dim & (head_dim - 1):
            raise ValueError(
                f"need num_pages, page_size >= 1 and a power-of-two head_dim, got {num_pages}, {page_size}, {head_dim}"
            )
        return IndexerPages(
            jnp.zeros((num_pages, page_size, head_dim), jnp.uint8),
            jnp.zeros((num_pages, 1, page_size), jnp.float32),
        )

    @staticmethod
    def from_host_pages(pages: np.ndarray, page_size: int = 64, head_dim: int = 128) -> IndexerPages:
        """From the host layout, uint8 `[num_pages, page_size · (head_dim + 4)]` (e.g. `IndexerKeyCache.pages()`)."""
        pages = np.asarray(pages)
        if pages.dtype != np.uint8 or pages.ndim != 2 or pages.shape[1] != page_size * (head_dim + 4):
            raise ValueError(
                f"pages: expected uint8 [num_pages, {page_size * (head_dim + 4)}], "
                f"got {pages.dtype} {list(pages.shape)}"
            )
        n = pages.shape[0]
        split = page_size * head_dim
        codes = np.ascontiguousarray(pages[:, :split]).reshape(n, page_size, head_dim)
        scales = np.ascontiguousarray(pages[:, split:]).view("<f4").reshape(n, 1, page_size).astype(np.float32)
        return IndexerPages(jnp.asarray(codes), jnp.asarray(scales))

    rotated = True  # keys are Hadamard-rotated: queries must be too

    def gather(self, pages: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys of whole pages (`pages` int32 `[T, n]`) as exact float32 values `[T, n·page_size, D]`
        and their scales `[T, n·page_size]`."""
        T = pages.shape[0]
        keys = _as_fp8(self.codes[pages]).reshape(T, -1, self.head_dim).astype(jnp.float32)
        return keys, self.scales[pages].reshape(T, -1)

    def fp8_codes(self) -> jax.Array:
        """The codes as float8_e4m3fn `[num_pages, page_size, D]` (a bitcast)."""
        return _as_fp8(self.codes)

    def to_host_pages(self) -> np.ndarray:
        """uint8 `[num_pages, page_size · (head_dim + 4)]`, byte-identical to the host cache's layout."""
        n = self.num_pages
        codes = np.asarray(self.codes).reshape(n, -1)
        scales = np.asarray(self.scales, dtype="<f4").reshape(n, -1).view(np.uint8)
        return np.concatenate([codes, scales], axis=1)

    def write(self, slots: jax.Array, keys: jax.Array) -> IndexerPages:
        """Pages with post-RoPE `keys` `[n, D]` written at `slots` `[n]` (−1 / out of range skipped):
        Hadamard-rotated and quantized per key as `reference.quantize_indexer_keys` does, except that
        the rotation runs in float32 here (float64 on the host), so a code sitting on a rounding
        boundary may land one e4m3 step away. Jit-able."""
        n = check_rows("keys", keys, None, (self.head_dim,))
        check_rows("slots", slots, n, (), integer=True)
        codes, scales = quantize_keys(keys)
        return self.write_quantized(slots, codes, scales)

    def write_quantized(self, slots: jax.Array, codes: jax.Array, scales: jax.Array) -> IndexerPages:
        """Pages with keys quantized elsewhere written at `slots` `[n]` (−1 / out of range skipped): `codes`
        float8_e4m3fn (or their uint8 bit patterns) `[n, D]` of Hadamard-rotated keys, `scales` float32
        `[n]` (`quantize_keys`). Jit-able."""
        n = check_rows("codes", codes, None, (self.head_dim,))
        check_rows("scales", scales, n, ())
        check_rows("slots", slots, n, (), integer=True)
        page, off = _page_and_offset(slots, self.num_pages, self.page_size)
        # Scattered into the paged arrays themselves: see `LatentCache.write` (no whole-cache copies).
        codes = jax.lax.bitcast_convert_type(codes, jnp.uint8) if codes.dtype != jnp.uint8 else codes
        return IndexerPages(
            self.codes.at[page, off].set(codes, mode="drop"), self.scales.at[page, 0, off].set(scales, mode="drop")
        )


def check_rows(name: str, x: Any, n: int | None, tail: tuple[int, ...], integer: bool = False) -> int:
    """Check that `x` has shape `[n, *tail]` (any `n` when None) and, with `integer`, an integer dtype;
    returns its row count. ValueError / TypeError naming `x` otherwise. Works on traced arrays."""
    shape = tuple(getattr(x, "shape", ()))
    want = ["n" if n is None else n, *tail]
    if len(shape) != len(want) or shape[1:] != tail or (n is not None and shape[0] != n):
        raise ValueError(f"{name}: expected shape {want}, got {list(shape)}")
    if integer and not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name}: expected integers, got {x.dtype}")
    if not integer and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected floats, got {x.dtype}")
    return shape[0]


def _as_fp8(codes: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(codes, jnp.float8_e4m3fn)


def _page_and_offset(slots: jax.Array, num_pages: int, page_size: int) -> tuple[jax.Array, jax.Array]:
    """Page and in-page offset of each slot; slots outside the cache (−1 included) get page `num_pages`,
    which a `mode="drop"` scatter skips."""
    valid = (slots >= 0) & (slots < num_pages * page_size)
    return jnp.where(valid, slots // page_size, num_pages), jnp.where(valid, slots % page_size, 0)


def quantize_keys(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Post-RoPE indexer keys `[n, D]` → `(codes float8_e4m3fn [n, D], scales float32 [n])`: Hadamard
    rotation in float32, then per-key FP8 (`reference.quantize_indexer_keys` up to the rotation's
    rounding). The one quantizer both indexer caches are filled from in the engine. Jit-able."""
    return quantize_rows(hadamard(keys.astype(jnp.float32)))


jax.tree_util.register_dataclass(IndexerPages, data_fields=["codes", "scales"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class ExactIndexerKeys:
    """Indexer keys kept in float32, unrotated and unquantized: the exact path of dsa.md §4 (what the
    Hugging Face reference computes, and what training wants). `keys` `[num_pages, page_size, D]`."""

    keys: jax.Array

    rotated = False

    @property
    def num_pages(self) -> int:
        return self.keys.shape[0]

    @property
    def page_size(self) -> int:
        return self.keys.shape[1]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[2]

    @staticmethod
    def create(num_pages: int, page_size: int = 64, head_dim: int = 128) -> ExactIndexerKeys:
        return ExactIndexerKeys(jnp.zeros((num_pages, page_size, head_dim), jnp.float32))

    def write(self, slots: jax.Array, keys: jax.Array) -> ExactIndexerKeys:
        """Keys with `keys` `[n, D]` (post-RoPE, any float dtype) written at `slots` `[n]` (−1 / out of range
        skipped). Jit-able."""
        check_rows("slots", slots, check_rows("keys", keys, None, (self.head_dim,)), (), integer=True)
        page, off = _page_and_offset(slots, self.num_pages, self.page_size)
        return ExactIndexerKeys(self.keys.at[page, off].set(keys.astype(jnp.float32), mode="drop"))

    def gather(self, pages: jax.Array) -> tuple[jax.Array, jax.Array]:
        T = pages.shape[0]
        keys = self.keys[pages].reshape(T, -1, self.head_dim)
        return keys, jnp.ones(keys.shape[:2], jnp.float32)


jax.tree_util.register_dataclass(ExactIndexerKeys, data_fields=["keys"], meta_fields=[])


def hadamard(x: jax.Array) -> jax.Array:
    """Orthonormal Walsh–Hadamard transform of the last dim (a power of two), Sylvester order, as
    `reference.hadamard`: butterflies at strides 1, 2, 4, …, then / sqrt(D)."""
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-two width, got {d}")
    y = x
    h = 1
    while h < d:
        y = y.reshape(*x.shape[:-1], d // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        h *= 2
    return y.reshape(x.shape) / np.sqrt(d).astype(np.float32)


def prepare_queries(
    q: jax.Array, weights: jax.Array, quantize: bool = True, rotate: bool = True
) -> tuple[jax.Array, jax.Array]:
    """`(q_rot [T, H, D] float32, head_weights [T, H] float32)`: the rotated queries (FP8 values when
    `quantize`) and `w · D^-0.5 · s_q`, the factor each head's ReLU is weighted by (dsa.md §4). Without
    `rotate` (keys stored unrotated) the queries are used as they are."""
    q_rot = hadamard(q.astype(jnp.float32)) if rotate else q.astype(jnp.float32)
    factor = weights.astype(jnp.float32) * q.shape[-1] ** -0.5
    if not quantize:
        return q_rot, factor
    codes, scales = quantize_rows(q_rot)
    return codes.astype(jnp.float32), factor * scales


def select_topk_device(
    q: jax.Array,
    weights: jax.Array,
    pages: IndexerPages | ExactIndexerKeys,
    block_tables: jax.Array,
    positions: jax.Array,
    k: int,
    *,
    quantize_queries: bool = True,
    key_chunk: int = 4096,
    backend: str = "auto",
    interpret: Any = False,
) -> jax.Array:
    """Top-`k` visible keys per query row, scored on the device from FP8 pages (dsa.md §4, §5).

    Args:
        q: `[T, H, D]` post-RoPE indexer queries; weights: `[T, H]` head weights (× H^-0.5).
        pages: the `IndexerPages` (FP8, as deployed) or `ExactIndexerKeys` (float32; then the queries
            are neither rotated nor quantized); block_tables: int32 `[T, max_pages]`, row `t`'s sequence's pages
            (−1 padded); positions: int32 `[T]`, row `t` sees keys `0 .. positions[t]`.
        k: entries per row; key_chunk: keys scored per step (rounded to whole pages).
        backend: "auto" (the default: "pallas_tpu" for FP8 `IndexerPages` when the target is a TPU, see
            `ops.target`; "xla" otherwise), "xla" (gather + einsum, anywhere) or "pallas_tpu" (FP8
            `IndexerPages` only: the kernel of `ops.tpu.indexer`, which streams key pages through VMEM;
            `interpret=True` or `pltpu.InterpretParams(...)` simulates it off a TPU).

    Returns int32 `[T, k]` positions, ascending, −1 padded (rows with `positions[t] + 1 ≤ k` select
    every visible key). Jit-able with `k`, `quantize_queries` and `key_chunk` static.
    """
    if not isinstance(pages, (IndexerPages, ExactIndexerKeys)):
        raise TypeError(f"pages: expected IndexerPages or ExactIndexerKeys, got {type(pages).__name__}")
    if getattr(q, "ndim", 0) != 3 or q.shape[2] != pages.head_dim:
        raise ValueError(f"q: expected shape [T, H, {pages.head_dim}], got {list(getattr(q, 'shape', ()))}")
    T, H = q.shape[:2]
    check_rows("q", q, T, (H, pages.head_dim))  # the dtype
    check_rows("weights", weights, T, (H,))
    check_rows("positions", positions, T, (), integer=True)
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables: expected shape [{T}, max_pages], got {list(block_tables.shape)}")
    check_rows("block_tables", block_tables, T, (block_tables.shape[1],), integer=True)
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    S = pages.page_size
    T, max_pages = block_tables.shape
    pages_per_chunk = max(1, min(max_pages, key_chunk // S))
    n_chunks = -(-max_pages // pages_per_chunk)
    tables = jnp.pad(block_tables, ((0, 0), (0, n_chunks * pages_per_chunk - max_pages)), constant_values=-1)
    quantize = quantize_queries and pages.rotated
    q8, head_w = prepare_queries(q, weights, quantize, rotate=pages.rotated)
    chunk_len = pages_per_chunk * S
    if backend == "auto":  # Pallas scores FP8 pages when the target is a TPU; exact keys always use XLA
        backend = "pallas_tpu" if isinstance(pages, IndexerPages) and target_is_tpu(q, pages) else "xla"
    if backend not in ("xla", "pallas_tpu"):
        raise ValueError(f"backend: expected 'auto', 'xla' or 'pallas_tpu', got {backend!r}")
    if backend == "pallas_tpu" and not isinstance(pages, IndexerPages):
        raise ValueError("backend='pallas_tpu' scores FP8 IndexerPages; use backend='xla' for ExactIndexerKeys")
    if backend == "pallas_tpu":
        resolve_backend(backend, q, pages, interpret=interpret)  # a TPU target, or interpret mode

    def chunk_scores(tab: jax.Array, c: jax.Array) -> jax.Array:
        """`[T, chunk_len]` scores of the pages `tab` (positions from `c · chunk_len`), −inf where invisible."""
        safe = jnp.clip(tab, 0, pages.num_pages - 1)
        pos = c * chunk_len + jnp.arange(chunk_len, dtype=jnp.int32)
        visible = (pos[None, :] <= positions[:, None]) & (jnp.repeat(tab, S, axis=1) >= 0)
        if backend == "pallas_tpu":
            from dsa_hybrid.ops.tpu.indexer import score_pages_tpu

            assert isinstance(pages, IndexerPages)  # the Pallas scorer reads FP8 pages only
            u = score_pages_tpu(q8, head_w, pages.codes, safe, exact_in_bf16=quantize, interpret=interpret)
            scores = u * pages.scales[safe].reshape(T, -1)  # the key scale after the head sum, as the host
            return jnp.where(visible, scores + 0.0, -jnp.inf)
        keys, sk = pages.gather(safe)  # FP8 keys: exact e4m3 values
        dots = jnp.einsum("thd,tld->thl", q8, keys, precision=_HIGHEST)
        scores = jnp.einsum("th,thl->tl", head_w, jnp.maximum(dots, 0.0), precision=_HIGHEST) * sk
        return jnp.where(visible, scores + 0.0, -jnp.inf)  # + 0.0: −0.0 ties with +0.0

    from dsa_hybrid.ops.tpu.topk import topk_select, topk_select_xla

    width = jnp.full((T,), k + chunk_len, jnp.int32)  # every column of `[running | chunk]`

    def chunk_step(carry, c):
        best_val, best_pos = carry
        tab = jax.lax.dynamic_slice_in_dim(tables, c * pages_per_chunk, pages_per_chunk, axis=1)  # [T, ppc]
        scores = chunk_scores(tab, c)
        pos = c * chunk_len + jnp.arange(chunk_len, dtype=jnp.int32)
        vals = jnp.concatenate([best_val, scores], axis=1)
        cand = jnp.concatenate([best_pos, jnp.broadcast_to(pos, (T, chunk_len))], axis=1)
        # The k best columns, ascending, ties to the lowest column. `cand` is nondecreasing along a row
        # (the running entries: unfilled −1 first, then ascending positions; the chunk's positions are
        # larger), so ties go to the lowest position and the kept entries stay in that order.
        if backend == "pallas_tpu":
            cols = topk_select(vals, width, k, interpret=interpret)
        else:
            cols = topk_select_xla(vals, width, k)
        return (jnp.take_along_axis(vals, cols, axis=1), jnp.take_along_axis(cand, cols, axis=1)), None

    init = (jnp.full((T, k), -jnp.inf, jnp.float32), jnp.full((T, k), -1, jnp.int32))
    (best_val, best_pos), _ = jax.lax.scan(chunk_step, init, jnp.arange(n_chunks))
    chosen = jnp.where(best_val > -jnp.inf, best_pos, -1)
    # Unfilled entries (−inf: fewer than k visible keys) are the leftmost ones (an unfilled running entry
    # ties every invisible key of a chunk and sits in a lower column): rotate them to the end as the
    # −1 padding. No sort: the rest is already ascending.
    unfilled = jnp.sum(best_val == -jnp.inf, axis=1, dtype=jnp.int32)
    return jnp.take_along_axis(chosen, (jnp.arange(k, dtype=jnp.int32)[None, :] + unfilled[:, None]) % k, axis=1)

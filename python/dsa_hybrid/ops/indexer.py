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
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsa_hybrid.ops.checks import check_alloc, check_array, check_int, check_int_array, is_concrete
from dsa_hybrid.ops.cpu_kernels import indexer_kernel_ok, indexer_query_bf16, indexer_select_cpu, target_is_cpu
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
        num_pages, page_size, head_dim = _check_sizes(num_pages, page_size, head_dim, 2)
        if head_dim & (head_dim - 1):
            raise ValueError(f"head_dim: expected a power-of-two head_dim, got {head_dim}")
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
        check_pages(pages, self.num_pages)
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
        raw = getattr(check_array("codes", codes), "dtype", None) == jnp.uint8  # bit patterns: integers
        n = check_rows("codes", codes, None, (self.head_dim,), integer=raw)
        check_rows("scales", scales, n, ())
        check_rows("slots", slots, n, (), integer=True)
        page, off = _page_and_offset(slots, self.num_pages, self.page_size)
        # Scattered into the paged arrays themselves: see `LatentCache.write` (no whole-cache copies).
        codes = jax.lax.bitcast_convert_type(codes, jnp.uint8) if codes.dtype != jnp.uint8 else codes
        return IndexerPages(
            self.codes.at[page, off].set(codes, mode="drop"), self.scales.at[page, 0, off].set(scales, mode="drop")
        )


def _check_sizes(num_pages: Any, page_size: Any, head_dim: Any, bytes_per_value: int) -> tuple[int, int, int]:
    """The sizes of a new indexer cache, checked (ints >= 1, at most `MAX_ARRAY_BYTES` in all)."""
    num_pages, page_size = check_int("num_pages", num_pages, 1), check_int("page_size", page_size, 1)
    head_dim = check_int("head_dim", head_dim, 1)
    check_alloc("num_pages × page_size × head_dim", (num_pages, page_size, head_dim), bytes_per_value)
    return num_pages, page_size, head_dim


def check_rows(name: str, x: Any, n: int | None, tail: tuple[int, ...], integer: bool = False) -> int:
    """Check that `x` has shape `[n, *tail]` (any `n` when None) and, with `integer`, an integer dtype;
    returns its row count. ValueError / TypeError naming `x` otherwise. Works on traced arrays."""
    check_array(name, x)
    shape = tuple(x.shape)
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
        """All-zero float32 keys `[num_pages, page_size, head_dim]` (sizes checked as `IndexerPages.create`)."""
        num_pages, page_size, head_dim = _check_sizes(num_pages, page_size, head_dim, 4)
        return ExactIndexerKeys(jnp.zeros((num_pages, page_size, head_dim), jnp.float32))

    def write(self, slots: jax.Array, keys: jax.Array) -> ExactIndexerKeys:
        """Keys with `keys` `[n, D]` (post-RoPE, any float dtype) written at `slots` `[n]` (−1 / out of range
        skipped). Jit-able."""
        check_rows("slots", slots, check_rows("keys", keys, None, (self.head_dim,)), (), integer=True)
        page, off = _page_and_offset(slots, self.num_pages, self.page_size)
        return ExactIndexerKeys(self.keys.at[page, off].set(keys.astype(jnp.float32), mode="drop"))

    def gather(self, pages: jax.Array) -> tuple[jax.Array, jax.Array]:
        """As `IndexerPages.gather`: exact keys `[T, n·page_size, D]` and unit scales."""
        check_pages(pages, self.keys.shape[0])
        T = pages.shape[0]
        keys = self.keys[pages].reshape(T, -1, self.head_dim)
        return keys, jnp.ones(keys.shape[:2], jnp.float32)


jax.tree_util.register_dataclass(ExactIndexerKeys, data_fields=["keys"], meta_fields=[])


def check_pages(pages: Any, num_pages: int) -> None:
    """`pages` for a gather: an integer array `[T, n]` (TypeError / ValueError naming `pages`); when its
    values are concrete, each in `[0, num_pages)` (IndexError; under `jit` XLA would clamp them)."""
    check_int_array("pages", pages, 2, dtype_error=TypeError)
    if is_concrete(pages) and pages.size:
        lo, hi = int(np.min(pages)), int(np.max(pages))
        if lo < 0 or hi >= num_pages:
            raise IndexError(f"pages: page ids must be in [0, {num_pages}), got values in [{lo}, {hi}]")


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
    key_chunk: int | None = None,
    row_block: int | None = None,
    backend: str = "auto",
    interpret: Any = False,
    query_dtype: str = "auto",
    threads: int = 1,
) -> jax.Array:
    """Top-`k` visible keys per query row, scored on the device from FP8 pages (dsa.md §4, §5).

    Args:
        q: `[T, H, D]` post-RoPE indexer queries; weights: `[T, H]` head weights (× H^-0.5).
        pages: the `IndexerPages` (FP8, as deployed) or `ExactIndexerKeys` (float32; then the queries
            are neither rotated nor quantized); block_tables: int32 `[T, max_pages]`, row `t`'s sequence's pages
            (−1 padded); positions: int32 `[T]`, row `t` sees keys `0 .. positions[t]`.
        k: entries per row.
        key_chunk: keys scored per scan step (rounded to whole pages). None: `XLA_KEY_CHUNK` on the XLA
            path; on the Pallas path, which scores all rows of a step at once, at most 4096 and fewer for
            big batches, so that rows × keys × D stays near 2^26.
        row_block: the XLA path's query rows per block (None: `row_block_size`). The Pallas path ignores it.
        backend: "auto" (the default: "pallas_tpu" for FP8 `IndexerPages` when the target is a TPU, see
            `ops.target`; "cpu_kernel" for FP8 `IndexerPages` when it is a CPU and the widths suit the
            host indexer (`ops.cpu_kernels.indexer_kernel_ok`); "xla" otherwise), "xla" (gather + einsum,
            anywhere), "pallas_tpu" (FP8 `IndexerPages` only: the kernel of `ops.tpu.indexer`, which
            streams key pages through VMEM; `interpret=True` or `pltpu.InterpretParams(...)` simulates it
            off a TPU) or "cpu_kernel" (FP8 `IndexerPages` on a CPU target: the Rust host indexer as an
            XLA custom call on the pages in place, `ops.cpu_kernels.indexer_select_cpu`, which selects
            exactly what the host placement's `select_paged` selects; `key_chunk` and `row_block` do not
            apply, and a padding row must have a negative position or a table starting with −1).
        query_dtype, threads: the "cpu_kernel" path's scoring dtype ("auto": as the host indexer's) and
            worker threads (1: XLA's calling thread); the other paths score in float32 and ignore them.

    Returns int32 `[T, k]` positions, ascending, −1 padded (rows with `positions[t] + 1 ≤ k` select
    every visible key). Jit-able with `k`, `quantize_queries`, `key_chunk`, `row_block`, `backend`,
    `query_dtype` and `threads` static.
    ValueError / TypeError naming the argument for a wrong shape, dtype or option.
    """
    if not isinstance(pages, (IndexerPages, ExactIndexerKeys)):
        raise TypeError(f"pages: expected IndexerPages or ExactIndexerKeys, got {type(pages).__name__}")
    for name, a in (("q", q), ("weights", weights), ("block_tables", block_tables), ("positions", positions)):
        check_array(name, a)
    if q.ndim != 3 or q.shape[2] != pages.head_dim:
        raise ValueError(f"q: expected shape [T, H, {pages.head_dim}], got {list(getattr(q, 'shape', ()))}")
    T, H = q.shape[:2]
    check_rows("q", q, T, (H, pages.head_dim))  # the dtype
    check_rows("weights", weights, T, (H,))
    check_rows("positions", positions, T, (), integer=True)
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables: expected shape [{T}, max_pages], got {list(block_tables.shape)}")
    check_rows("block_tables", block_tables, T, (block_tables.shape[1],), integer=True)
    k = check_int("k", k, 1)
    if key_chunk is not None:
        key_chunk = check_int("key_chunk", key_chunk, 1)
    if row_block is not None:
        row_block = check_int("row_block", row_block, 1)
    threads = check_int("threads", threads, 0, 1024)
    indexer_query_bf16(query_dtype, quantize_queries)  # a known dtype on every path
    S = pages.page_size
    T, max_pages = block_tables.shape
    if backend == "auto":  # FP8 pages: Pallas on a TPU target, the Rust kernel on a CPU; exact keys: XLA
        backend = "xla"
        if isinstance(pages, IndexerPages) and target_is_tpu(q, pages):
            backend = "pallas_tpu"
        elif isinstance(pages, IndexerPages) and indexer_kernel_ok(H, pages.head_dim, S) and target_is_cpu(q, pages):
            backend = "cpu_kernel"
    if backend not in ("xla", "pallas_tpu", "cpu_kernel"):
        raise ValueError(f"backend: expected 'auto', 'xla', 'pallas_tpu' or 'cpu_kernel', got {backend!r}")
    if backend in ("pallas_tpu", "cpu_kernel") and not isinstance(pages, IndexerPages):
        raise ValueError(f"backend={backend!r} scores FP8 IndexerPages; use backend='xla' for ExactIndexerKeys")
    if backend == "cpu_kernel":
        assert isinstance(pages, IndexerPages)  # checked above
        if not target_is_cpu(q, pages):
            raise ValueError("backend='cpu_kernel' runs on the CPU backend; the target here is not a CPU")
        return indexer_select_cpu(
            q, weights, pages.codes, pages.scales, block_tables, positions, k,
            quantize_queries=quantize_queries, query_dtype=query_dtype, threads=threads,
        )  # fmt: skip
    if backend == "pallas_tpu":
        resolve_backend(backend, q, pages, interpret=interpret)  # a TPU target, or interpret mode
    if key_chunk is None:
        key_chunk = XLA_KEY_CHUNK if backend == "xla" else max(S, min(4096, (1 << 26) // (T * pages.head_dim)))
    pages_per_chunk = max(1, min(max_pages, key_chunk // S))
    n_chunks = -(-max_pages // pages_per_chunk)
    tables = jnp.pad(block_tables, ((0, 0), (0, n_chunks * pages_per_chunk - max_pages)), constant_values=-1)
    quantize = quantize_queries and pages.rotated
    q8, head_w = prepare_queries(q, weights, quantize, rotate=pages.rotated)
    chunk_len = pages_per_chunk * S

    if backend == "xla":
        return _select_xla_blocks(q8, head_w, pages, tables, positions, k, pages_per_chunk, row_block)

    from dsa_hybrid.ops.tpu.indexer import score_pages_tpu
    from dsa_hybrid.ops.tpu.topk import topk_select

    assert isinstance(pages, IndexerPages)  # the Pallas scorer reads FP8 pages only

    def chunk_scores(tab: jax.Array, c: jax.Array) -> jax.Array:
        """`[T, chunk_len]` scores of the pages `tab` (positions from `c · chunk_len`), −inf where invisible."""
        safe = jnp.clip(tab, 0, pages.num_pages - 1)
        pos = c * chunk_len + jnp.arange(chunk_len, dtype=jnp.int32)
        visible = (pos[None, :] <= positions[:, None]) & (jnp.repeat(tab, S, axis=1) >= 0)
        u = score_pages_tpu(q8, head_w, pages.codes, safe, exact_in_bf16=quantize, interpret=interpret)
        scores = u * pages.scales[safe].reshape(T, -1)  # the key scale after the head sum, as the host
        return jnp.where(visible, scores + 0.0, -jnp.inf)

    def chunk_step(carry, c):
        tab = jax.lax.dynamic_slice_in_dim(tables, c * pages_per_chunk, pages_per_chunk, axis=1)  # [T, ppc]
        merge = functools.partial(topk_select, interpret=interpret)
        return _merge(carry, chunk_scores(tab, c), c * chunk_len, k, merge), None

    best, _ = jax.lax.scan(chunk_step, _empty_running(T, k), jnp.arange(n_chunks))
    return _finish(*best)


def _empty_running(rows: int, k: int) -> tuple[jax.Array, jax.Array]:
    """The running top-k before any key: `k` unfilled (−inf, position −1) entries per row."""
    return jnp.full((rows, k), -jnp.inf, jnp.float32), jnp.full((rows, k), -1, jnp.int32)


def _merge(
    running: tuple[jax.Array, jax.Array], scores: jax.Array, first: jax.Array, k: int, select: Any = None
) -> tuple[jax.Array, jax.Array]:
    """The running top-k `(values [R, k], positions [R, k])` merged with a chunk's `scores` `[R, C]` of the
    positions `first .. first + C − 1` (−inf where invisible), by the exact select `select`
    (`topk_select_xla` by default) of `[running | chunk]`.

    The k best columns come back ascending, ties to the lowest column. The candidates are nondecreasing
    along a row (the running entries: unfilled −1 first, then ascending positions; the chunk's
    positions are larger), so ties go to the lowest position and the kept entries stay in that order."""
    from dsa_hybrid.ops.tpu.topk import topk_select_xla

    best_val, best_pos = running
    R, C = scores.shape
    pos = first + jnp.arange(C, dtype=jnp.int32)
    vals = jnp.concatenate([best_val, scores], axis=1)
    cand = jnp.concatenate([best_pos, jnp.broadcast_to(pos, (R, C))], axis=1)
    cols = (select or topk_select_xla)(vals, jnp.full((R,), k + C, jnp.int32), k)
    return jnp.take_along_axis(vals, cols, axis=1), jnp.take_along_axis(cand, cols, axis=1)


def _finish(best_val: jax.Array, best_pos: jax.Array) -> jax.Array:
    """The running top-k as the selection: positions ascending, then −1 padding.

    Unfilled entries (−inf: fewer than k visible keys) are the leftmost ones (an unfilled running entry
    ties every invisible key of a chunk and sits in a lower column): rotate them to the end as the
    −1 padding. No sort: the rest is already ascending."""
    k = best_val.shape[1]
    chosen = jnp.where(best_val > -jnp.inf, best_pos, -1)
    unfilled = jnp.sum(best_val == -jnp.inf, axis=1, dtype=jnp.int32)
    return jnp.take_along_axis(chosen, (jnp.arange(k, dtype=jnp.int32)[None, :] + unfilled[:, None]) % k, axis=1)


# The XLA path's defaults, measured on one Zen 4 core at both models' widths (docs/performance.md): keys
# per scan step, and the bytes of one row block's per-chunk temporaries (`row_block_size`).
XLA_KEY_CHUNK = 2048
ROW_BLOCK_BYTES = 16 << 20


def row_block_size(rows: int, heads: int, head_dim: int, chunk: int) -> int:
    """Query rows the XLA path scores together (a power of two, at most the next power of two of `rows`):
    as many as keep one key chunk's temporaries near `ROW_BLOCK_BYTES`: the `[B, heads, chunk]` float32
    products, and, when the block's rows read different pages, their own gathered keys
    `[B, chunk, head_dim]`."""
    per_row = chunk * (heads + head_dim) * 4
    b = max(1, ROW_BLOCK_BYTES // per_row)
    return min(1 << (b.bit_length() - 1), 1 << max(0, rows - 1).bit_length())


def _select_xla_blocks(
    q8: jax.Array,
    head_w: jax.Array,
    pages: IndexerPages | ExactIndexerKeys,
    tables: jax.Array,
    positions: jax.Array,
    k: int,
    pages_per_chunk: int,
    row_block: int | None,
) -> jax.Array:
    """The XLA path of `select_topk_device`: rows in blocks of `B`, one block after another.

    A block whose rows read the same pages (each row's table equals the block's, or is −1 where it has
    no page: the rows of one sequence, and padding rows) gathers each key chunk once and scores all its
    rows × heads against it as one matmul `[B·H, D] × [D, chunk]`; the causal mask comes from each
    row's position and its own table. A block mixing sequences gathers each row's keys (the decode
    case: every row reads other pages anyway). Chunks past the block's last position are skipped, so a
    causal prefill scans about half the keys and a table wider than the rows need costs almost nothing.
    Each block keeps its own running top-k `[B, k]`: temporaries are bounded by the block, not by `T`."""
    T, H, D = q8.shape
    S = pages.page_size
    C = pages_per_chunk * S
    n_chunks = tables.shape[1] // pages_per_chunk
    B = row_block or row_block_size(T, H, D, C)
    nb = -(-T // B)
    pad = nb * B - T

    def blocks(a: jax.Array, fill: float | int) -> jax.Array:
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
        return a.reshape(nb, B, *a.shape[1:])

    # Padding rows: position −1 (they see nothing) and an all −1 table (they share any block's pages).
    xs = (blocks(q8, 0), blocks(head_w, 0), blocks(tables, -1), blocks(positions.astype(jnp.int32), -1))

    def block(args: tuple[jax.Array, jax.Array, jax.Array, jax.Array]) -> jax.Array:
        qb, wb, tb, pb = args  # [B, H, D], [B, H], [B, n_chunks · ppc], [B]
        common = jnp.max(tb, axis=0)  # the block's pages, where any row has one
        shared = jnp.all((tb == common[None, :]) | (tb < 0))
        last = jnp.max(pb)
        q_rows = qb.reshape(B * H, D)

        def scores_shared(tab: jax.Array, common_tab: jax.Array) -> jax.Array:
            keys, sk = pages.gather(jnp.clip(common_tab, 0, pages.num_pages - 1)[None, :])  # [1, C, D]
            dots = jnp.dot(q_rows, keys[0].T, precision=_HIGHEST).reshape(B, H, C)
            return jnp.einsum("bh,bhl->bl", wb, jnp.maximum(dots, 0.0), precision=_HIGHEST) * sk

        def scores_per_row(tab: jax.Array, common_tab: jax.Array) -> jax.Array:
            keys, sk = pages.gather(jnp.clip(tab, 0, pages.num_pages - 1))  # [B, C, D]
            dots = jnp.einsum("bhd,bld->bhl", qb, keys, precision=_HIGHEST)
            return jnp.einsum("bh,bhl->bl", wb, jnp.maximum(dots, 0.0), precision=_HIGHEST) * sk

        def chunk_step(running: tuple[jax.Array, jax.Array], c: jax.Array) -> tuple[tuple[jax.Array, jax.Array], None]:
            def merge(running: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
                tab = jax.lax.dynamic_slice_in_dim(tb, c * pages_per_chunk, pages_per_chunk, axis=1)  # [B, ppc]
                common_tab = jax.lax.dynamic_slice_in_dim(common, c * pages_per_chunk, pages_per_chunk)
                scores = jax.lax.cond(shared, scores_shared, scores_per_row, tab, common_tab)
                pos = c * C + jnp.arange(C, dtype=jnp.int32)
                visible = (pos[None, :] <= pb[:, None]) & (jnp.repeat(tab, S, axis=1) >= 0)
                scores = jnp.where(visible, scores + 0.0, -jnp.inf)  # + 0.0: −0.0 ties with +0.0
                return _merge(running, scores, c * C, k)

            # A chunk no row of the block sees would leave the running top-k as it is: skip it.
            return jax.lax.cond(c * C <= last, merge, lambda r: r, running), None

        best, _ = jax.lax.scan(chunk_step, _empty_running(B, k), jnp.arange(n_chunks))
        return _finish(*best)

    return jax.lax.map(block, xs).reshape(nb * B, k)[:T]

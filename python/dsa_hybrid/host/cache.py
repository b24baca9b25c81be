"""`IndexerKeyCache`: the paged FP8 indexer-key cache on the host (Rust core, dsa.md §4 and §6).

One contiguous buffer of `num_blocks` pages; a page holds `block_size` tokens as `block_size × head_dim`
e4m3fn bytes (token-major) followed by `block_size` little-endian float32 scales — 132 bytes per token
at head_dim 128, 8448 bytes per 64-token page, the layout DeepGEMM / vLLM / SGLang use. Sequences own
block tables over a shared block pool with reference counts: `fork` shares pages, a write into a shared
partial page copies it first, `truncate` and `free` return pages to the pool.

Thread safety: every method may be called from several Python threads. One read-write lock per cache:
reads (select, scores, gather, slots) run concurrently, writes one at a time; appends, gathers,
dequantize, slots and the selections run with the GIL released, so other Python threads (and other
caches) proceed meanwhile. The `pages()` view is live (zero-copy, read-only,
and it cannot be made writeable or resized, so it cannot break the cache): read it while no append is
running on another thread (or copy it) to see a consistent state.

Selection: `select` scores every visible key of each query's sequence straight from the FP8 pages
(dsa.md §4: `I[t, s] = Σ_j w[t, j] · ReLU(q[t, j] · k[s]) · D^-0.5`, queries Hadamard-rotated and quantized
per head like the keys) and keeps each row's top-k (dsa.md §5), fused, on SIMD kernels and several threads;
`scores` returns the scores themselves.

Two ways to address the pages:

- By sequence (standalone users): the cache keeps its own block pool, block tables and lengths —
  `add_sequence`, `append`, `fork`, `truncate`, `free`, `select(seq_ids, ...)`.
- By block table (the serving engine): the engine allocates blocks from one `BlockPool` and keeps one
  block table per request for every cache (latent, device indexer, host indexer); the cache only stores
  keys at the slots it is told (`write_slots`), copies a page for copy-on-write (`copy_block`) and scores
  through the tables (`select_paged`, `scores_paged`). Such a cache has no sequences at all:
  `IndexerKeyCache(num_blocks, block_size, head_dim)` and then only these methods. Do not mix the two
  on one cache (the sequence API allocates from the cache's own pool, which knows nothing of the
  engine's). `select` on a sequence is `select_paged` on its block table: one code path, same kernels,
  same tie rule, bit-identical results.

Errors (every message starts with the argument at fault): `KeyError` for an unknown sequence id,
`TypeError` for a wrong type (a float or bool where an int belongs, a list where an array belongs, a
dtype that is not accepted), `ValueError` for a duplicate id or a bad value (shape, NaN/inf, a negative
count, `k` outside `[1, 2**31 - 1]`, `threads` outside `[1, 1024]`), `IndexError` for a position outside
`[0, length)` (or a slot, block or needed page outside the buffer, or an id that does not fit the
integer type it travels as), `CacheFullError` when the pool lacks the blocks an append needs (its
`wanted` and `free` attributes say how many), and `MemoryError` for a result too large to allocate (or
past 2**40 bytes, refused before any work). On any error nothing was changed. A panic in the Rust core
(a bug) surfaces as `InternalError` (a `RuntimeError`), never as a `BaseException`.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

from dsa_hybrid import _core

CacheFullError = _core.CacheFullError
InternalError = _core.InternalError

_KEY_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16))


def _float_array(name: str, x: Any, ndim: int) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {list(x.shape)}")
    if x.dtype not in _KEY_DTYPES:
        raise TypeError(f"{name}: expected float32 or bfloat16, got {x.dtype}")
    return np.require(x.astype(np.float32, copy=False), requirements=("C", "A"))


def _matrix(name: str, x: Any, width: int) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] != width:
        raise ValueError(f"{name}: expected shape [n, {width}], got {list(x.shape)}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous (use np.ascontiguousarray)")
    return x


def _ints(name: str, x: Any, ndim: int, dtype: type, out_of_range: type[Exception]) -> np.ndarray:
    """`x` as a C-contiguous, aligned array of `dtype` (no copy when it already is one). Integers only
    (TypeError for floats, bools, strings); `out_of_range` for entries `dtype` cannot hold, instead of
    letting them wrap (a uint64 2**64 - 1 is not −1)."""
    a = np.asarray(x)
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimension(s), got shape {list(a.shape)}")
    if a.dtype == dtype:
        return np.require(a, requirements=("C", "A"))
    if a.size == 0:
        return np.zeros(a.shape, dtype)
    if a.dtype == object:
        values = a.ravel().tolist()
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in values):
            raise TypeError(f"{name}: expected integers, got {sorted({type(v).__name__ for v in values})}")
        lo, hi = min(values), max(values)
    elif np.issubdtype(a.dtype, np.integer):
        lo, hi = a.min(), a.max()
    else:
        raise TypeError(f"{name}: expected integers, got {a.dtype}")
    info = np.iinfo(dtype)
    if lo < info.min or hi > info.max:
        raise out_of_range(f"{name}: entries must fit in {np.dtype(dtype)}, got values in [{lo}, {hi}]")
    return np.require(a.astype(dtype), requirements=("C", "A"))


def _int_array(name: str, x: Any, ndim: int, out_of_range: type[Exception] = IndexError) -> np.ndarray:
    """Positions / sequence ids as int64; `out_of_range` for entries past int64."""
    return _ints(name, x, ndim, np.int64, out_of_range)


def _int32_array(name: str, x: Any, ndim: int) -> np.ndarray:
    """Block ids / slots as C-contiguous int32 (no copy when they already are); IndexError for entries
    that int32 cannot hold (they are out of range of any cache)."""
    return _ints(name, x, ndim, np.int32, IndexError)


def _fp8_rows(fp8: Any, width: int) -> np.ndarray:
    """uint8 (or float8_e4m3fn viewed as uint8) `[n, width]` codes, C-contiguous."""
    fp8 = _matrix("fp8", fp8, width)
    if fp8.dtype == np.dtype(ml_dtypes.float8_e4m3fn):
        fp8 = fp8.view(np.uint8)
    if fp8.dtype != np.uint8:
        raise TypeError(f"fp8: expected uint8 or float8_e4m3fn, got {fp8.dtype}")
    return fp8


def _scales(scales: Any, n: int) -> np.ndarray:
    scales = np.asarray(scales)
    if scales.dtype != np.float32 or scales.shape != (n,):
        raise ValueError(f"scales: expected float32 [{n}], got {scales.dtype} {list(scales.shape)}")
    return np.require(scales, requirements=("C", "A"))


class IndexerKeyCache:
    """Paged FP8 indexer-key cache (see the module docstring for layout, locking and errors).

    Args:
        num_blocks: pages in the pool.
        block_size: tokens per page, a positive multiple of 16 (64 is the interoperable default).
        head_dim: key width `D_I`, a power of two (128 for DeepSeek-V3.2 and GLM-5).
    """

    def __init__(self, num_blocks: int, block_size: int = 64, head_dim: int = 128) -> None:
        self._c = _core.IndexerKeyCache(num_blocks, block_size, head_dim)

    # ----- sizes ------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self._c.num_blocks

    @property
    def block_size(self) -> int:
        return self._c.block_size

    @property
    def head_dim(self) -> int:
        return self._c.head_dim

    @property
    def page_bytes(self) -> int:
        """`block_size · (head_dim + 4)` bytes per page."""
        return self._c.page_bytes

    @property
    def num_free_blocks(self) -> int:
        return self._c.num_free_blocks

    @property
    def bytes_used(self) -> int:
        """Bytes of the pages held by at least one sequence."""
        return self._c.bytes_used

    def block_refcount(self, block: int) -> int:
        """How many sequences hold page `block` (0 = free)."""
        return self._c.block_refcount(block)

    def sequence_ids(self) -> list[int]:
        return self._c.sequence_ids()

    # ----- sequences --------------------------------------------------------------------------
    def add_sequence(self, seq_id: int) -> None:
        """Register an empty sequence. ValueError if `seq_id` exists."""
        self._c.add_sequence(seq_id)

    def length(self, seq_id: int) -> int:
        return self._c.length(seq_id)

    def block_table(self, seq_id: int) -> npt.NDArray[np.int32]:
        """int32 `[ceil(length / block_size)]`: the page of each block of the sequence."""
        return self._c.block_table(seq_id)

    def can_append(self, seq_id: int, n: int) -> bool:
        """Whether `n` more tokens fit (counting the copy of a shared partial page)."""
        return self._c.can_append(seq_id, n)

    def fork(self, parent: int, child: int) -> None:
        """New sequence `child` sharing `parent`'s pages by reference; a later write into a shared
        partial page copies it first. KeyError for an unknown parent, ValueError for an existing child."""
        self._c.fork(parent, child)

    def truncate(self, seq_id: int, n: int) -> None:
        """Keep the first `n` tokens (speculative-decoding rollback); emptied pages go back to the pool.
        ValueError for `n < 0` or `n > length`."""
        self._c.truncate(seq_id, n)

    def free(self, seq_id: int) -> None:
        """Remove the sequence; pages no other sequence holds return to the pool."""
        self._c.free(seq_id)

    # ----- writing ----------------------------------------------------------------------------
    def append(self, seq_id: int, keys: np.ndarray) -> None:
        """Append post-RoPE keys, float32 or bfloat16 `[n, head_dim]`: Hadamard, FP8 with one power-of-two
        scale per key (bit-identical to `reference.quantize_indexer_keys`), written into the pages.
        All or nothing: NaN/inf or a too-small pool writes nothing."""
        keys = _matrix("keys", keys, self.head_dim)
        if keys.dtype not in _KEY_DTYPES:
            raise TypeError(f"keys: expected float32 or bfloat16, got {keys.dtype}")
        self._c.append(seq_id, keys.astype(np.float32, copy=False))

    def append_quantized(self, seq_id: int, fp8: np.ndarray, scales: np.ndarray) -> None:
        """Append keys quantized elsewhere (e.g. on the device): `fp8` uint8 (or float8_e4m3fn)
        `[n, head_dim]` codes of Hadamard-rotated keys, `scales` float32 `[n]`, finite and positive."""
        fp8 = _fp8_rows(fp8, self.head_dim)
        self._c.append_quantized(seq_id, fp8, _scales(scales, fp8.shape[0]))

    # ----- addressed by block tables (the engine's pages) ---------------------------------------
    def write_slots(self, slots: Any, fp8: np.ndarray, scales: np.ndarray) -> None:
        """Write keys quantized elsewhere at slots the caller chose: row `i` of `fp8` (uint8 or
        float8_e4m3fn `[n, head_dim]`, codes of Hadamard-rotated keys) and `scales[i]` (float32, finite,
        positive) go to slot `slots[i]` = `block · block_size + offset` (int `[n]`); rows with slot −1
        are skipped (and not checked). IndexError for a slot outside `[0, num_blocks · block_size)`;
        ValueError for the NaN codes 0x7F / 0xFF or a bad scale; a later row wins a repeated slot.
        All or nothing."""
        slots = _int32_array("slots", slots, 1)
        fp8 = _fp8_rows(fp8, self.head_dim)
        if fp8.shape[0] != slots.shape[0]:
            raise ValueError(
                f"fp8: expected [{slots.shape[0]}, {self.head_dim}] for {slots.shape[0]} slots, got {list(fp8.shape)}"
            )
        self._c.write_slots(slots, fp8, _scales(scales, fp8.shape[0]))

    def copy_block(self, src: int, dst: int) -> None:
        """Copy page `src`'s bytes (codes and scales) over page `dst`: the copy of a copy-on-write of a
        shared partial page. IndexError for a block outside `[0, num_blocks)`; `src == dst` does nothing."""
        self._c.copy_block(src, dst)

    # ----- reading ----------------------------------------------------------------------------
    def gather(self, seq_id: int, positions: Any) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
        """`(fp8 uint8 [n, head_dim], scales float32 [n])` of the given positions (each in `[0, length)`)."""
        return self._c.gather(seq_id, _int_array("positions", positions, 1))

    def dequantize(self, seq_id: int) -> npt.NDArray[np.float32]:
        """float32 `[length, head_dim]`: `e4m3(code) · scale` of every key, in the Hadamard-rotated basis
        (apply `reference.hadamard` to get back to the keys' own basis). For tests and inspection."""
        return self._c.dequantize(seq_id)

    def slots(self, seq_ids: Any, positions: Any) -> npt.NDArray[np.int32]:
        """Logical positions → slots `block · block_size + offset`, −1 staying −1.
        `seq_ids` int `[T]`, `positions` int `[T, K]` (row `t` belongs to `seq_ids[t]`) → int32 `[T, K]`."""
        return self._c.slots(_int_array("seq_ids", seq_ids, 1, KeyError), _int_array("positions", positions, 2))

    # ----- selection --------------------------------------------------------------------------
    def select(
        self,
        seq_ids: Any,
        q: np.ndarray,
        weights: np.ndarray,
        positions: Any,
        k: int,
        *,
        as_slots: bool = False,
        quantize_queries: bool = True,
        sorted: bool = False,
        threads: int | None = None,
        query_dtype: str = "auto",
    ) -> npt.NDArray[np.int32]:
        """The lightning indexer on the host: each query row's top-`k` keys (dsa.md §4, §5).

        Args:
            seq_ids: int `[T]`, the sequence of each query row (rows of one call may mix sequences of
                any lengths: decode, prefill and ragged batches alike).
            q: float32 or bfloat16 `[T, H_I, head_dim]`, post-RoPE indexer queries (1 ≤ H_I ≤ 256).
            weights: float32 or bfloat16 `[T, H_I]`, the head weights `w` (already × H_I^-0.5).
            positions: int `[T]`, each row's absolute position `p_t`; it sees keys `0 .. p_t`, so
                `0 ≤ p_t < length(seq_ids[t])` (append the row's own key first).
            k: entries per row (2048 for DeepSeek-V3.2).
            as_slots: return cache slots (`block · block_size + offset`) instead of positions.
            quantize_queries: True (default) quantizes each query head to FP8 with its own power-of-two
                scale after the Hadamard rotation, as deployed; False keeps the rotated queries in float32.
            sorted: False: each row ascending by position; True: by descending score.
            threads: worker threads (default: one per core; few-row batches split each row's keys).
            query_dtype: "auto" (default), "float32" or "bfloat16". "bfloat16" scores with the (rotated,
                maybe quantized) queries rounded to bfloat16, by `vdpbf16ps` on CPUs with AVX512-BF16
                (1.2–1.8× the float32 rate on AMD cores) and by its exact scalar twin elsewhere (slow; the
                same bits). FP8 keys are exact in bf16; with `quantize_queries` the queries are too, so
                only the order of the float32 sums changes (pairs of dimensions, the instruction's order);
                without it the selection is the top-k of the bf16-query scores. "auto" is "bfloat16" for
                quantized queries on a CPU where it is faster (`cpu_features()["indexer_query_dtype"]`;
                the environment variable `DSA_HYBRID_QUERY_DTYPE` pins it), else "float32": a
                property of the machine, so every SIMD path of one machine gives the same bits.
                docs/performance.md, "bf16 scoring".

        Returns int32 `[T, k]`, −1 padded; rows with `p_t + 1 ≤ k` select every visible key (no scoring).
        Ties go to the lowest position. Scores are accumulated in float32 from exact FP8 products.
        """
        return self._rows_call(
            self._c.select,
            _int_array("seq_ids", seq_ids, 1, KeyError),
            positions,
            q,
            weights,
            k,
            paged=False,
            as_slots=as_slots,
            quantize_queries=quantize_queries,
            sorted=sorted,
            threads=threads,
            query_dtype=query_dtype,
        )

    def scores(
        self,
        seq_ids: Any,
        q: np.ndarray,
        weights: np.ndarray,
        positions: Any,
        *,
        quantize_queries: bool = True,
        threads: int | None = None,
        query_dtype: str = "auto",
    ) -> npt.NDArray[np.float32]:
        """The indexer scores `select` ranks, float32 `[T, L]` with `L = max(positions) + 1`; entries past a
        row's own `p_t` are −inf. Arguments as in `select`. For tests and callers that want the scores."""
        return self._rows_call(
            self._c.scores,
            _int_array("seq_ids", seq_ids, 1, KeyError),
            positions,
            q,
            weights,
            paged=False,
            quantize_queries=quantize_queries,
            threads=threads,
            query_dtype=query_dtype,
        )

    def select_paged(
        self,
        block_tables: Any,
        positions: Any,
        q: np.ndarray,
        weights: np.ndarray,
        k: int,
        *,
        as_slots: bool = False,
        quantize_queries: bool = True,
        sorted: bool = False,
        threads: int | None = None,
        query_dtype: str = "auto",
    ) -> npt.NDArray[np.int32]:
        """`select` through the caller's block tables instead of the cache's sequences.

        Args:
            block_tables: int `[T, W]` (int32 is read in place), −1 padded: page `j` of row `t`'s
                sequence is block `block_tables[t, j]`. Rows of one sequence may share one table row
                each (repeat it) — the engine's one table per request.
            positions: int `[T]`, each row's absolute position `p_t ≥ 0`; row `t` sees keys `0 .. p_t`
                through pages `0 .. p_t // block_size` of its table (write the row's own key first).
            q, weights, k, as_slots, quantize_queries, sorted, threads, query_dtype: as in `select`.

        Returns int32 `[T, k]`, exactly what `select` returns for a sequence with that block table
        (same kernels, same tie rule). IndexError if a row needs a page that is −1, outside the table's
        width or outside `[0, num_blocks)`, or for a negative position; ValueError as `select`.
        """
        return self._rows_call(
            self._c.select_paged,
            _int32_array("block_tables", block_tables, 2),
            positions,
            q,
            weights,
            k,
            paged=True,
            as_slots=as_slots,
            quantize_queries=quantize_queries,
            sorted=sorted,
            threads=threads,
            query_dtype=query_dtype,
        )

    def scores_paged(
        self,
        block_tables: Any,
        positions: Any,
        q: np.ndarray,
        weights: np.ndarray,
        *,
        quantize_queries: bool = True,
        threads: int | None = None,
        query_dtype: str = "auto",
    ) -> npt.NDArray[np.float32]:
        """`scores` through block tables (arguments as in `select_paged`): float32 `[T, max(positions) + 1]`,
        −inf past each row's own position."""
        return self._rows_call(
            self._c.scores_paged,
            _int32_array("block_tables", block_tables, 2),
            positions,
            q,
            weights,
            paged=True,
            quantize_queries=quantize_queries,
            threads=threads,
            query_dtype=query_dtype,
        )

    @staticmethod
    def _rows_call(
        call: Any, rows: np.ndarray, positions: Any, q: Any, weights: Any, *k: int, paged: bool, **options: Any
    ) -> Any:
        """One of the core's four selection calls (`select`, `scores` and their paged twins): `rows` (seq_ids
        or block tables) converted by the caller, the positions and queries here (the sequence calls take
        the positions after the queries, the paged ones before), the keyword options passed through."""
        pos = _int_array("positions", positions, 1)
        qw = (_float_array("q", q, 3), _float_array("weights", weights, 2))
        return call(rows, pos, *qw, *k, **options) if paged else call(rows, *qw, pos, *k, **options)

    def pages(self) -> npt.NDArray[np.uint8]:
        """The page buffer itself: a zero-copy, read-only, live view, uint8 `[num_blocks, page_bytes]`
        (`.reshape(num_blocks, block_size, 1, head_dim + 4)` does not apply: scales follow all codes).

        The view cannot be used to break the cache: its base is the cache's `PageBuffer` (Rust-owned
        bytes that are never moved or resized, kept alive as long as any view lives), so numpy refuses to
        make it writeable (`view.flags.writeable = True` raises ValueError) and to resize it
        (`view.resize(...)` raises ValueError: it does not own its data; `np.resize(view, ...)` returns
        a new array). It is not a copy: later writes show through (copy it for a snapshot)."""
        return self._c.pages()

    def __repr__(self) -> str:
        return (
            f"IndexerKeyCache(num_blocks={self.num_blocks}, block_size={self.block_size}, "
            f"head_dim={self.head_dim}, sequences={len(self.sequence_ids())}, free_blocks={self.num_free_blocks})"
        )

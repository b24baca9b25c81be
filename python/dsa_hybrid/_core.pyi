"""Type stubs for the Rust extension module `dsa_hybrid._core` (the bindings in `rust/src/py/`).

Use the wrappers in `dsa_hybrid.host` (`IndexerKeyCache`, `BlockPool`, `topk`), which also convert dtypes
(bfloat16, lists, other integer widths). Conventions of every call here:

- Arrays are numpy, C-contiguous, of exactly the dtype named (ValueError "must be a C-contiguous array"
  otherwise; TypeError for a wrong dtype); inputs are read in place, outputs are new arrays.
- The real work runs with the GIL released; `threads=None` uses one worker per core (a kept thread pool),
  `threads=1` the calling thread only, small inputs always stay on the calling thread.
- Errors name the argument at fault (`"positions: ..."`) and change nothing: `KeyError` for an unknown
  sequence, `IndexError` for a position / slot / block / page out of range, `CacheFullError` for too few
  free blocks, `ValueError` for the rest (shapes, NaN/inf, duplicates).
"""

from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str
"""The crate's version (`rust/Cargo.toml`)."""

def cpu_features() -> dict[str, bool | str]:
    """Detected CPU features (name -> present, e.g. `avx2`, `fma`, `f16c`, `avx512f`, `neon`) plus
    `simd_path`, the SIMD path the kernels dispatch to now."""

def fp8_quantize_rows(
    x: npt.NDArray[np.float32], *, hadamard: bool = True
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """Quantize each row of a C-contiguous float32 `[n, d]` array to FP8 e4m3fn with one power-of-two
    scale per row, after an optional orthonormal Hadamard rotation (dsa.md §4). Returns
    `(codes uint8 [n, d], scales float32 [n])`, bit-identical to the reference. Releases the GIL.
    Raises ValueError on NaN/inf or (with `hadamard`) a width that is not a power of two."""

def fp8_decode_table() -> npt.NDArray[np.float32]:
    """float32 `[256]`: the value of each e4m3fn code (0x7F and 0xFF are NaN)."""

def set_simd_path(name: str | None = None) -> str:
    """Pin the kernels to a SIMD path ("scalar", "avx2", "avx512", "neon"; None: the widest available).
    Returns the path in use; ValueError for an unknown name or one this CPU lacks."""

def topk(
    scores: npt.NDArray[np.float32],
    k: int,
    lengths: npt.NDArray[np.int64] | None = None,
    *,
    sorted: bool = False,
    threads: int | None = None,
) -> npt.NDArray[np.int32]:
    """Top-k positions of each row of C-contiguous float32 `[T, L]` scores, row `t` visible up to
    `lengths[t]` (int64 `[T]`, each in `[0, L]`; default `L`); int32 `[T, k]`, −1 padded, ascending (or by
    descending score with `sorted`). Ties: lowest position. ValueError for `k < 1`, bad `lengths`,
    `threads=0` or NaN among a row's visible scores. Releases the GIL."""

class CacheFullError(RuntimeError):
    """The block pool has too few free blocks for the request; nothing was written (or allocated).
    The message names the argument and both counts; the attributes hold them."""

    wanted: int
    """Blocks the request needed."""
    free: int
    """Blocks free when it was refused."""

class BlockPool:
    """THE block allocator: `num_blocks` blocks, each free or held by a number of holders (refcount).
    Thread-safe (a mutex inside); every call checks everything first and changes nothing on error.
    Use `dsa_hybrid.host.BlockPool` (same API, documented there)."""

    def __init__(self, num_blocks: int) -> None:
        """A pool of `num_blocks` free blocks; ValueError unless `1 <= num_blocks <= 2**31 - 1`,
        TypeError for a non-int."""
    @property
    def num_blocks(self) -> int:
        """Blocks in the pool."""
    @property
    def num_free(self) -> int:
        """Blocks no one holds."""
    def allocate(self, n: int) -> npt.NDArray[np.int32]:
        """`n` free blocks, each now held once: int32 `[n]`, lowest ids of a fresh pool first (in the order of
        `free_blocks()`). All or nothing: CacheFullError (`wanted`, `free`) if fewer are free; ValueError
        for `n < 0`."""
    def retain(self, blocks: Any) -> None:
        """One more holder of each of `blocks` (1-D ints: a list, range, or any integer array; an id listed
        twice gains two). IndexError for an id outside `[0, num_blocks)`, ValueError for a free block,
        TypeError for non-integers; nothing changes on error."""
    def release(self, blocks: Any) -> None:
        """One holder fewer for each of `blocks`, taken in reverse order; a block left with none goes back
        on the free list (so a released run is handed out again in the same order). IndexError out of
        range, ValueError for a free block (counting repeats), TypeError for non-integers; nothing changes
        on error."""
    def refcount(self, block: int) -> int:
        """Holders of `block` (0: free); IndexError out of range."""
    def refcounts(self) -> npt.NDArray[np.int32]:
        """int32 `[num_blocks]`: the holders of every block."""
    def free_blocks(self) -> npt.NDArray[np.int32]:
        """int32 `[num_free]`: the free blocks in the order `allocate` hands them out."""

class IndexerKeyCache:
    """Paged FP8 indexer-key cache: `num_blocks` pages of `block_size` tokens, each token `head_dim` e4m3fn
    bytes plus a float32 scale (132 bytes at head_dim 128), addressed by its own sequences or by the
    caller's block tables. Use `dsa_hybrid.IndexerKeyCache`, which checks and converts dtypes first."""

    def __init__(self, num_blocks: int, block_size: int = 64, head_dim: int = 128) -> None:
        """An empty cache. ValueError unless `block_size` is a positive multiple of 16, `head_dim` a power
        of two and `num_blocks · block_size <= 2**31` (slots are int32); MemoryError if the page buffer
        (`num_blocks · page_bytes` bytes) cannot be allocated."""
    @property
    def num_blocks(self) -> int:
        """Pages in the buffer."""
    @property
    def block_size(self) -> int:
        """Tokens per page."""
    @property
    def head_dim(self) -> int:
        """Key width `D_I`."""
    @property
    def page_bytes(self) -> int:
        """`block_size · (head_dim + 4)`: bytes per page."""
    @property
    def num_free_blocks(self) -> int:
        """Pages of the cache's own pool held by no sequence (all of them when only the paged API is used)."""
    @property
    def bytes_used(self) -> int:
        """Bytes of the pages held by at least one sequence."""
    def sequence_ids(self) -> list[int]:
        """The ids of the cache's sequences, ascending."""
    def block_refcount(self, block: int) -> int:
        """How many sequences hold page `block` (0: free); IndexError outside `[0, num_blocks)`."""
    def add_sequence(self, seq_id: int) -> None:
        """Register an empty sequence; ValueError if `seq_id` exists."""
    def length(self, seq_id: int) -> int:
        """Tokens in the sequence; KeyError if unknown."""
    def block_table(self, seq_id: int) -> npt.NDArray[np.int32]:
        """int32 `[ceil(length / block_size)]`: the page of each block of the sequence; KeyError if unknown."""
    def can_append(self, seq_id: int, n: int) -> bool:
        """Whether `n` more tokens fit (counting the copy of a shared partial page); KeyError if unknown."""
    def fork(self, parent: int, child: int) -> None:
        """New sequence `child` sharing all of `parent`'s pages (copy on write). KeyError for an unknown
        parent, ValueError for an existing child."""
    def truncate(self, seq_id: int, n: int) -> None:
        """Keep the first `n` tokens; emptied pages return to the pool. KeyError if unknown, ValueError
        for `n > length`."""
    def free(self, seq_id: int) -> None:
        """Remove the sequence; pages no other sequence holds return to the pool. KeyError if unknown."""
    def append(self, seq_id: int, keys: npt.NDArray[np.float32]) -> None:
        """Append float32 `[n, head_dim]` post-RoPE keys: Hadamard, FP8, written into the pages. KeyError
        if unknown, ValueError for shape / NaN / inf, CacheFullError if the pool lacks the blocks."""
    def append_quantized(self, seq_id: int, fp8: npt.NDArray[np.uint8], scales: npt.NDArray[np.float32]) -> None:
        """Append keys quantized elsewhere: uint8 `[n, head_dim]` codes of rotated keys and float32 `[n]`
        finite positive scales. ValueError for the NaN codes 0x7F / 0xFF, bad scales or shapes."""
    def write_slots(
        self, slots: npt.NDArray[np.int32], fp8: npt.NDArray[np.uint8], scales: npt.NDArray[np.float32]
    ) -> None:
        """Write pre-quantized keys at the caller's slots: row `i` (uint8 `[n, head_dim]` codes, float32
        `[n]` scales) goes to `slots[i]` (int32 `[n]`, `block · block_size + offset`); −1 skips the row.
        IndexError for a slot outside `[0, num_blocks · block_size)`; ValueError for NaN codes, a scale
        that is not finite and positive, or shapes. All or nothing. Releases the GIL."""
    def copy_block(self, src: int, dst: int) -> None:
        """Copy page `src`'s bytes over page `dst` (copy-on-write of a shared partial page); IndexError for
        either outside `[0, num_blocks)`."""
    def gather(
        self, seq_id: int, positions: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
        """`(codes uint8 [n, head_dim], scales float32 [n])` of int64 `positions [n]`, each in
        `[0, length)` (IndexError otherwise)."""
    def dequantize(self, seq_id: int) -> npt.NDArray[np.float32]:
        """float32 `[length, head_dim]`: every key decoded, in the Hadamard-rotated basis."""
    def slots(self, seq_ids: npt.NDArray[np.int64], positions: npt.NDArray[np.int64]) -> npt.NDArray[np.int32]:
        """int64 `positions [T, K]` of the sequences `seq_ids [T]` as int32 slots `[T, K]`, −1 kept."""
    def select(
        self,
        seq_ids: npt.NDArray[np.int64],
        q: npt.NDArray[np.float32],
        weights: npt.NDArray[np.float32],
        positions: npt.NDArray[np.int64],
        k: int,
        *,
        as_slots: bool = False,
        quantize_queries: bool = True,
        sorted: bool = False,
        threads: int | None = None,
    ) -> npt.NDArray[np.int32]:
        """Top-k keys per query row scored from the FP8 pages: rows `seq_ids` int64 `[T]` at `positions`
        int64 `[T]` (row `t` sees keys `0 .. positions[t]`), queries float32 `[T, H, head_dim]`, head
        weights float32 `[T, H]`; int32 `[T, k]`, −1 padded. KeyError / IndexError for a bad row,
        ValueError for shapes, NaN/inf, `k = 0`, `threads = 0`. Releases the GIL."""
    def scores(
        self,
        seq_ids: npt.NDArray[np.int64],
        q: npt.NDArray[np.float32],
        weights: npt.NDArray[np.float32],
        positions: npt.NDArray[np.int64],
        *,
        quantize_queries: bool = True,
        threads: int | None = None,
    ) -> npt.NDArray[np.float32]:
        """float32 `[T, max(positions) + 1]` indexer scores, −inf past each row's position (rows as `select`)."""
    def select_paged(
        self,
        block_tables: npt.NDArray[np.int32],
        positions: npt.NDArray[np.int64],
        q: npt.NDArray[np.float32],
        weights: npt.NDArray[np.float32],
        k: int,
        *,
        as_slots: bool = False,
        quantize_queries: bool = True,
        sorted: bool = False,
        threads: int | None = None,
    ) -> npt.NDArray[np.int32]:
        """`select` through the caller's block tables: int32 `[T, W]` (−1 padded; page `j` of row `t` is
        block `block_tables[t, j]`), int64 `positions [T]` (`>= 0`); int32 `[T, k]`, identical to `select`
        on a sequence with that table. IndexError for a negative position or a needed page that is −1,
        past `W` or outside `[0, num_blocks)`; ValueError as `select`. Releases the GIL."""
    def scores_paged(
        self,
        block_tables: npt.NDArray[np.int32],
        positions: npt.NDArray[np.int64],
        q: npt.NDArray[np.float32],
        weights: npt.NDArray[np.float32],
        *,
        quantize_queries: bool = True,
        threads: int | None = None,
    ) -> npt.NDArray[np.float32]:
        """`scores` through block tables (rows as `select_paged`): float32 `[T, max(positions) + 1]`."""
    def pages(self) -> npt.NDArray[np.uint8]:
        """The page buffer itself: a read-only, zero-copy uint8 `[num_blocks, page_bytes]` view (each page
        is `block_size · head_dim` codes, then `block_size` little-endian float32 scales)."""

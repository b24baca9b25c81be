"""Type stubs for the Rust extension module `dsa_hybrid._core` (the bindings in `rust/src/py/`).

Use the wrappers in `dsa_hybrid.host` (`IndexerKeyCache`, `BlockPool`, `topk`), which also convert dtypes
(bfloat16, lists, other integer widths). Conventions of every call here:

- Arrays are numpy arrays of exactly the dtype named, in native byte order, with exactly the number of
  dimensions named, C-contiguous and aligned. TypeError for something that is not an array (a list, a
  numpy scalar), another dtype (object arrays and byte-swapped ones included); ValueError for another
  number of dimensions (0-d arrays included), a non-contiguous or a misaligned array. Inputs are read in
  place, outputs are new arrays. Empty arrays are fine wherever a length may be 0.
- Ints (`k`, `n`, ids, sizes, `threads`) are Python ints or numpy integers (anything with `__index__`);
  a bool or a float is a TypeError (never truncated), and a value of any size is range-checked (never
  wrapped into a narrower type). Flags (`sorted`, `as_slots`, ...) are bools (Python or numpy).
- The real work runs with the GIL released; `threads=None` uses one worker per core (a kept thread pool),
  `threads=1` the calling thread only, small inputs always stay on the calling thread. `threads` must be
  in `[1, 1024]` (ValueError otherwise).
- `k` must be in `[1, 2**31 - 1]` (positions are int32; ValueError otherwise). The work is bounded by the
  rows' lengths, but the output is `[T, k]`: one past 2**40 bytes is refused with MemoryError naming `k`
  before any work, and so is any result the allocator cannot give (Rust never aborts the process).
- Errors name the argument at fault (`"positions: ..."`) and change nothing: `KeyError` for an unknown
  sequence (or an id past int64), `IndexError` for a position / slot / block / page out of range,
  `CacheFullError` for too few free blocks, `MemoryError` for a result too large, `TypeError` as above,
  `ValueError` for the rest (shapes, NaN/inf, duplicates, negative counts).
- No Rust panic reaches Python as pyo3's `PanicException` (a `BaseException`): every entry point catches
  one and raises `InternalError` (a `RuntimeError`) naming the call. A panic is a bug; please report it.
"""

from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str
"""The crate's version (`rust/Cargo.toml`)."""

def cpu_features() -> dict[str, bool | str]:
    """Detected CPU features (name -> present) plus `simd_path`, the SIMD path the kernels dispatch to now,
    and `indexer_query_dtype`, what `query_dtype="auto"` scores FP8-quantized indexer queries with here
    ("bfloat16" or "float32"). x86-64: `sse4.2`, `avx2`, `fma`, `f16c`, `avx512f`, `avx512bw`,
    `avx512bf16`. aarch64: `neon`, `asimddp` (dot
    product), `fp16`, `bf16`, `i8mm`, `sve`, `sve2` (reported only: the kernels use NEON)."""

def fp8_quantize_rows(
    x: npt.NDArray[np.float32], *, hadamard: bool = True
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """Quantize each row of a C-contiguous float32 `[n, d]` array to FP8 e4m3fn with one power-of-two
    scale per row, after an optional orthonormal Hadamard rotation (dsa.md §4). Returns
    `(codes uint8 [n, d], scales float32 [n])`, bit-identical to the reference. Releases the GIL.
    Raises ValueError (naming `x`) on NaN/inf, a width of 0, (with `hadamard`) a width that is not a
    power of two, or a row whose scale would overflow float32; TypeError for another dtype."""

def fp8_decode_table() -> npt.NDArray[np.float32]:
    """float32 `[256]`: the value of each e4m3fn code (0x7F and 0xFF are NaN)."""

def set_simd_path(name: str | None = None) -> str:
    """Pin the kernels to a SIMD path ("scalar"; "avx2", "avx512" on x86-64; "neon" on aarch64; None: the
    widest available). Returns the path in use; ValueError naming the path for an unknown one or one this
    CPU lacks (nothing changes), TypeError for a name that is not a str."""

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
    descending score with `sorted`). Ties: lowest position. ValueError for `k` outside `[1, 2**31 - 1]`,
    bad `lengths`, `threads` outside `[1, 1024]`, `L > 2**31` or NaN among a row's visible scores;
    MemoryError naming `k` for an output past 2**40 bytes or one that cannot be allocated. Releases the
    GIL."""

def sparse_mla(
    q: npt.NDArray[np.float32],
    kv: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    indices: npt.NDArray[np.int32] | npt.NDArray[np.int64],
    scale: float,
    d_v: int,
    *,
    threads: int | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Sparse MLA attention (dsa.md §3) of C-contiguous float32 `q [T, h, D]` over the latent rows `kv
    [N, D]` (float32, or uint16 holding bfloat16 bit patterns) named by `indices [T, K]` (int32 or int64;
    entries < 0 or >= N skipped). Returns `(out float32 [T, h, d_v], lse float32 [T, h])`; empty rows give
    0 and +inf, rows with inf/NaN inputs NaN. ValueError naming the argument for shapes that disagree,
    `d_v` outside `[1, D]`, a non-finite `scale`, `threads` outside `[1, 1024]`; TypeError for other
    dtypes; MemoryError naming `q` for an output that cannot be allocated. Releases the GIL."""

def ffi_targets() -> dict[str, Any]:
    """`{name: PyCapsule}` of the Rust core's XLA FFI handlers (rust/src/ffi.rs), for
    `jax.ffi.register_ffi_target(name, capsule, platform="cpu", api_version=1)`: two.
    `"dsa_hybrid_sparse_mla_f32"`, the sparse-MLA kernel over XLA's buffers (arguments q float32
    `[T, h, D]`, kv float32 `[..., D]`, slots int32 `[T, K]`; results out float32 `[T, h, d_v]`, lse
    float32 `[T, h]`; attributes scale float32, threads int64). `"dsa_hybrid_indexer_select"`, the host
    indexer's `select_paged` over an `IndexerPages`' arrays (arguments q float32 `[T, H, D]`, weights
    float32 `[T, H]`, codes uint8 `[P, S, D]`, scales float32 `[P, 1, S]`, block_tables int32 `[T, W]`,
    positions int32 `[T]`; result int32 `[T, k]` positions; attributes quantize, bf16, threads int64).
    `dsa_hybrid.ops.cpu_kernels` registers and calls them."""

def ffi_last_kv_address() -> int:
    """The address of the latent buffer the last successful `dsa_hybrid_sparse_mla_f32` call read (0
    before the first): a diagnostic showing the cache is read in place."""

def fma_loop(iters: int) -> int:
    """Run `iters` rounds of the FMA-peak loop (independent FMA chains) on the SIMD path in use, with
    the GIL released; returns the floating-point operations done. ValueError for `iters` outside
    `[0, 2**40]`."""

class InternalError(RuntimeError):
    """A panic in the Rust core (a bug), caught at the binding boundary. The message names the call
    (`"IndexerKeyCache.select: internal error ..."`). Every call checks before it changes anything, so
    the object called is as before."""

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
        TypeError for a non-int (a bool or a float included), MemoryError if its bookkeeping (8 bytes per
        block) cannot be allocated."""
    @property
    def num_blocks(self) -> int:
        """Blocks in the pool."""
    @property
    def num_free(self) -> int:
        """Blocks no one holds."""
    def allocate(self, n: int) -> npt.NDArray[np.int32]:
        """`n` free blocks, each now held once: int32 `[n]`, lowest ids of a fresh pool first (in the order of
        `free_blocks()`). All or nothing: CacheFullError (`wanted`, `free`) if fewer are free (any `n`,
        however large); ValueError for `n < 0`, TypeError for a non-int."""
    def retain(self, blocks: Any) -> None:
        """One more holder of each of `blocks` (1-D ints: a list, range, iterable, or any integer array; an id
        listed twice gains two). IndexError for an id outside `[0, num_blocks)` (of any size), ValueError
        for a free block, TypeError for non-integers (bools, floats, strings, None, nested sequences);
        nothing changes on error."""
    def release(self, blocks: Any) -> None:
        """One holder fewer for each of `blocks`, taken in reverse order; a block left with none goes back
        on the free list (so a released run is handed out again in the same order). IndexError out of
        range, ValueError for a free block (counting repeats), TypeError for non-integers; nothing changes
        on error."""
    def refcount(self, block: int) -> int:
        """Holders of `block` (0: free); IndexError out of range, TypeError for a non-int."""
    def refcounts(self) -> npt.NDArray[np.int32]:
        """int32 `[num_blocks]`: the holders of every block."""
    def free_blocks(self) -> npt.NDArray[np.int32]:
        """int32 `[num_free]`: the free blocks in the order `allocate` hands them out."""

class IndexerKeyCache:
    """Paged FP8 indexer-key cache: `num_blocks` pages of `block_size` tokens, each token `head_dim` e4m3fn
    bytes plus a float32 scale (132 bytes at head_dim 128), addressed by its own sequences or by the
    caller's block tables. Use `dsa_hybrid.IndexerKeyCache`, which checks and converts dtypes first."""

    def __init__(self, num_blocks: int, block_size: int = 64, head_dim: int = 128) -> None:
        """An empty cache. ValueError unless `num_blocks >= 0`, `block_size` is a positive multiple of 16,
        `head_dim` a power of two, `num_blocks · block_size <= 2**31` (slots are int32) and a page
        addressable; TypeError for a non-int; MemoryError (naming `num_blocks`) if the page buffer
        (`num_blocks · page_bytes` bytes, zeroed lazily by the OS) cannot be allocated."""
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
        """Register an empty sequence; ValueError if `seq_id` exists or does not fit in int64."""
    def length(self, seq_id: int) -> int:
        """Tokens in the sequence; KeyError if unknown (any id past int64 is unknown)."""
    def block_table(self, seq_id: int) -> npt.NDArray[np.int32]:
        """int32 `[ceil(length / block_size)]`: the page of each block of the sequence; KeyError if unknown."""
    def can_append(self, seq_id: int, n: int) -> bool:
        """Whether `n` more tokens fit (counting the copy of a shared partial page; any `n >= 0`, however
        large); KeyError if unknown, ValueError for `n < 0`."""
    def fork(self, parent: int, child: int) -> None:
        """New sequence `child` sharing all of `parent`'s pages (copy on write). KeyError for an unknown
        parent, ValueError for an existing child (or one past int64)."""
    def truncate(self, seq_id: int, n: int) -> None:
        """Keep the first `n` tokens; emptied pages return to the pool. KeyError if unknown, ValueError
        for `n < 0` or `n > length`."""
    def free(self, seq_id: int) -> None:
        """Remove the sequence; pages no other sequence holds return to the pool. KeyError if unknown."""
    def append(self, seq_id: int, keys: npt.NDArray[np.float32]) -> None:
        """Append float32 `[n, head_dim]` post-RoPE keys: Hadamard, FP8, written into the pages. KeyError
        if unknown, ValueError for shape / NaN / inf / a key so large its scale overflows float32,
        CacheFullError if the pool lacks the blocks."""
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
        `[0, length)` (IndexError otherwise; MemoryError naming `positions` for an output too large)."""
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
        query_dtype: str | None = None,
    ) -> npt.NDArray[np.int32]:
        """Top-k keys per query row scored from the FP8 pages: rows `seq_ids` int64 `[T]` at `positions`
        int64 `[T]` (row `t` sees keys `0 .. positions[t]`), queries float32 `[T, H, head_dim]`, head
        weights float32 `[T, H]`; int32 `[T, k]`, −1 padded. KeyError / IndexError for a bad row,
        ValueError for shapes, NaN/inf in `q` or `weights` or among a row's scores (named `q, weights`),
        `k` outside `[1, 2**31 - 1]`, `threads` outside `[1, 1024]`; MemoryError naming `k` for an output
        past 2**40 bytes (or `positions` for a row of scores) that cannot be allocated. `query_dtype`:
        "auto" (default, `None`), "float32" or "bfloat16" (queries rounded to bf16, `vdpbf16ps` where the
        CPU has AVX512-BF16, its exact scalar twin elsewhere); "auto" is "bfloat16" for FP8-quantized
        queries where the CPU runs it faster (`cpu_features()["indexer_query_dtype"]`, or the environment
        variable `DSA_HYBRID_QUERY_DTYPE`), else "float32"; ValueError / TypeError naming it otherwise. Releases
        the GIL."""
    def scores(
        self,
        seq_ids: npt.NDArray[np.int64],
        q: npt.NDArray[np.float32],
        weights: npt.NDArray[np.float32],
        positions: npt.NDArray[np.int64],
        *,
        quantize_queries: bool = True,
        threads: int | None = None,
        query_dtype: str | None = None,
    ) -> npt.NDArray[np.float32]:
        """float32 `[T, max(positions) + 1]` indexer scores, −inf past each row's position (rows as `select`).
        ValueError for a NaN score (as `select`); MemoryError naming `positions` for an output too large."""
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
        query_dtype: str | None = None,
    ) -> npt.NDArray[np.int32]:
        """`select` through the caller's block tables: int32 `[T, W]` (−1 padded; page `j` of row `t` is
        block `block_tables[t, j]`), int64 `positions [T]` (`>= 0`); int32 `[T, k]`, identical to `select`
        on a sequence with that table. IndexError for a negative position or one past `2**31 - 1`, or a
        needed page that is −1, past `W` or outside `[0, num_blocks)`; ValueError and MemoryError as
        `select`. Releases the GIL."""
    def scores_paged(
        self,
        block_tables: npt.NDArray[np.int32],
        positions: npt.NDArray[np.int64],
        q: npt.NDArray[np.float32],
        weights: npt.NDArray[np.float32],
        *,
        quantize_queries: bool = True,
        threads: int | None = None,
        query_dtype: str | None = None,
    ) -> npt.NDArray[np.float32]:
        """`scores` through block tables (rows as `select_paged`): float32 `[T, max(positions) + 1]`."""
    def pages(self) -> npt.NDArray[np.uint8]:
        """The page buffer itself: a read-only, zero-copy, live uint8 `[num_blocks, page_bytes]` view (each
        page is `block_size · head_dim` codes, then `block_size` little-endian float32 scales). Its base is
        the cache's `PageBuffer` (Rust-owned bytes, never moved or resized, alive while any view is), so the
        view cannot break the cache: `view.flags.writeable = True` / `setflags(write=True)` and
        `view.resize(...)` raise ValueError, the `PageBuffer` has no methods and no buffer protocol. Not a
        copy: copy it for a snapshot."""

class PageBuffer:
    """The page bytes of one `IndexerKeyCache`, the base of its `pages()` views. Not constructible, no
    methods: it only keeps the bytes alive."""

def _test_panic(mode: str) -> None:
    """Test hook: panic on purpose ("direct": on the calling thread, "detached": with the GIL released,
    "worker": in a thread-pool worker); always raises InternalError naming `_test_panic`."""

"""Type stubs for the Rust extension module `dsa_hybrid._core`."""

import numpy as np
import numpy.typing as npt

__version__: str

def cpu_features() -> dict[str, bool | str]:
    """Detected CPU features (name -> present) plus `simd_path`, the SIMD path in use."""

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
    Returns the path in use; ValueError if this CPU lacks it."""

def topk(
    scores: npt.NDArray[np.float32],
    k: int,
    lengths: npt.NDArray[np.int64] | None = None,
    *,
    sorted: bool = False,
    threads: int | None = None,
) -> npt.NDArray[np.int32]:
    """Top-k positions of each row of C-contiguous float32 `[T, L]` scores, row `t` visible up to
    `lengths[t]`; int32 `[T, k]`, −1 padded, ascending (or by descending score with `sorted`).
    Ties: lowest position. ValueError on NaN among visible scores. Releases the GIL."""

class CacheFullError(RuntimeError):
    """The block pool has too few free blocks for the request; nothing was written."""

class IndexerKeyCache:
    """Paged FP8 indexer-key cache; use `dsa_hybrid.IndexerKeyCache`, which checks dtypes first."""

    def __init__(self, num_blocks: int, block_size: int = 64, head_dim: int = 128) -> None: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def page_bytes(self) -> int: ...
    @property
    def num_free_blocks(self) -> int: ...
    @property
    def bytes_used(self) -> int: ...
    def sequence_ids(self) -> list[int]: ...
    def block_refcount(self, block: int) -> int: ...
    def add_sequence(self, seq_id: int) -> None: ...
    def length(self, seq_id: int) -> int: ...
    def block_table(self, seq_id: int) -> npt.NDArray[np.int32]: ...
    def can_append(self, seq_id: int, n: int) -> bool: ...
    def fork(self, parent: int, child: int) -> None: ...
    def truncate(self, seq_id: int, n: int) -> None: ...
    def free(self, seq_id: int) -> None: ...
    def append(self, seq_id: int, keys: npt.NDArray[np.float32]) -> None: ...
    def append_quantized(self, seq_id: int, fp8: npt.NDArray[np.uint8], scales: npt.NDArray[np.float32]) -> None: ...
    def gather(
        self, seq_id: int, positions: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]: ...
    def dequantize(self, seq_id: int) -> npt.NDArray[np.float32]: ...
    def slots(self, seq_ids: npt.NDArray[np.int64], positions: npt.NDArray[np.int64]) -> npt.NDArray[np.int32]: ...
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
        """Top-k keys per query row scored from the FP8 pages; int32 `[T, k]`. Releases the GIL."""
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
        """float32 `[T, max(positions) + 1]` indexer scores, −inf past each row's position."""
    def pages(self) -> npt.NDArray[np.uint8]: ...

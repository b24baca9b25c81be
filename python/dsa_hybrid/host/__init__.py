"""The Rust host core's Python face: the block allocator, the paged FP8 indexer-key cache and the SIMD top-k.

- `BlockPool` (`host.pool`): THE block allocator (free list, reference counts) the engine and every paged
  cache share.
- `IndexerKeyCache`, `CacheFullError` (`host.cache`): 132-byte-per-token FP8 pages, block tables, fork,
  truncate, and the fused indexer scoring + top-k (`select`) straight from the pages; or, for the engine,
  addressed through its block tables (`write_slots`, `select_paged`, `scores_paged`, `copy_block`).
- `topk`, `set_simd_path` (`host.selection`): stand-alone top-k of float32 rows; the SIMD path in use.
- `cpu_features()`: what the core detected on this CPU.

The compiled extension is `dsa_hybrid._core` (typed in `_core.pyi`); these modules add argument checks
and documentation. Nothing here imports JAX.
"""

from __future__ import annotations

from dsa_hybrid import _core
from dsa_hybrid.host.cache import CacheFullError, IndexerKeyCache
from dsa_hybrid.host.pool import BlockPool
from dsa_hybrid.host.selection import set_simd_path, topk


def cpu_features() -> dict[str, bool | str]:
    """CPU features detected by the Rust core (`avx2`, `fma`, `f16c`, `avx512f`, `neon`, ...) and
    `simd_path`, the SIMD path its kernels dispatch to on this machine."""
    return dict(_core.cpu_features())


__all__ = ["BlockPool", "CacheFullError", "IndexerKeyCache", "cpu_features", "set_simd_path", "topk"]

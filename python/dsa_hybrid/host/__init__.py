"""The Rust host core's Python face: the block allocator, the paged FP8 indexer-key cache, the SIMD top-k and
sparse MLA attention on the CPU.

- `BlockPool` (`host.pool`): THE block allocator (free list, reference counts) the engine and every paged
  cache share.
- `IndexerKeyCache`, `CacheFullError` (`host.cache`): 132-byte-per-token FP8 pages, block tables, fork,
  truncate, and the fused indexer scoring + top-k (`select`) straight from the pages; or, for the engine,
  addressed through its block tables (`write_slots`, `select_paged`, `scores_paged`, `copy_block`).
- `topk`, `set_simd_path` (`host.selection`): stand-alone top-k of float32 rows; the SIMD path in use.
- `sparse_mla_host` (`host.attention`): sparse MLA attention (dsa.md §3) on the CPU, one fused
  gather-and-attend SIMD pass, numpy in and out; `fma_peak_gflops()`: this core's measured FMA peak.
- `cpu_features()`: what the core detected on this CPU.
- `InternalError` (a `RuntimeError`): a panic in the Rust core (a bug), caught at the binding boundary;
  the message names the call. No Rust panic reaches Python as pyo3's `PanicException` (a `BaseException`
  that `except Exception` would not catch).

The compiled extension is `dsa_hybrid._core` (typed in `_core.pyi`); these modules add argument checks
and documentation. Nothing here imports JAX.
"""

from __future__ import annotations

from dsa_hybrid import _core
from dsa_hybrid.host.attention import fma_peak_gflops, sparse_mla_host
from dsa_hybrid.host.cache import CacheFullError, IndexerKeyCache, InternalError
from dsa_hybrid.host.pool import BlockPool
from dsa_hybrid.host.selection import set_simd_path, topk


def cpu_features() -> dict[str, bool | str]:
    """CPU features detected by the Rust core and `simd_path`, the SIMD path its kernels dispatch to on this
    machine. On x86-64: `sse4.2`, `avx2`, `fma`, `f16c`, `avx512f`, `avx512bw`, `avx512bf16` (the bf16
    scoring kernel, `query_dtype="bfloat16"`); on aarch64: `neon`,
    `asimddp` (dot product), `bf16`, `i8mm`, `fp16`, `sve`, `sve2` (reported only: the kernels use NEON).
    `indexer_query_dtype`: what the indexer's `query_dtype="auto"` scores FP8-quantized queries with here,
    "bfloat16" (AMD cores with AVX512-BF16, where it is faster) or "float32"; `DSA_HYBRID_QUERY_DTYPE`
    pins it."""
    return dict(_core.cpu_features())


__all__ = [
    "BlockPool",
    "CacheFullError",
    "IndexerKeyCache",
    "InternalError",
    "cpu_features",
    "fma_peak_gflops",
    "set_simd_path",
    "sparse_mla_host",
    "topk",
]

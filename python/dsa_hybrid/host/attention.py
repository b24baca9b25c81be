"""Sparse MLA attention on the CPU (dsa.md §3) in the Rust core: one fused gather-and-attend pass.

`sparse_mla_host(q, kv, indices, scale)` computes what `reference.sparse_mla` defines, with numpy arrays
in and out: for each query row `t` and head `h`, attention over the latent rows `kv[indices[t, :]]`
(entries < 0 or ≥ N skipped, valid duplicates counted once each), scores over the full latent width,
values the first `d_v` columns, and the natural-log LSE; a row with no valid index gives 0 and +inf.

How it runs: per (query row, group of heads) the valid rows are gathered in tiles of 60, converted to
float32 once and used by every head of the group (the reuse that makes the call compute-bound), with an
online softmax, so no `[T, K, D]` temporary exists. SIMD kernels (AVX-512, AVX2, NEON) picked at run time
(`set_simd_path`), each equal bit for bit to its scalar twin; rows (and, for few rows, groups of heads)
spread over `threads` workers with the GIL released. The result does not depend on the SIMD path, the
thread count, or whether the latent rows are float32 or the same values in bfloat16.

`fma_peak_gflops()` measures this core's FMA peak on the SIMD path in use, the yardstick the benchmarks
state kernel speed against.
"""

from __future__ import annotations

import time

import ml_dtypes
import numpy as np
import numpy.typing as npt

from dsa_hybrid import _core

_BF16 = np.dtype(ml_dtypes.bfloat16)


def sparse_mla_host(
    q: npt.ArrayLike,
    kv: npt.ArrayLike,
    indices: npt.ArrayLike,
    scale: float,
    d_v: int = 512,
    *,
    threads: int | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Sparse MLA attention in absorbed (MQA) form on the CPU: `reference.sparse_mla` in float32.

    Args:
        q: `[T, h, D]` absorbed queries (`D = r_kv + d_rope`, 576 for DeepSeek-V3.2); float32, or any
            float dtype (converted to float32; bfloat16 converts exactly).
        kv: `[N, D]` latent rows `[c_kv | k_pe]`, float32 or bfloat16 (`ml_dtypes.bfloat16`, read as
            is: 2 bytes per value, no float32 copy); other float dtypes are converted to float32.
        indices: integer `[T, K]` row numbers into `kv` (int32 and int64 are read as is); entries < 0
            or ≥ N are skipped.
        scale: the softmax scale (`DSAConfig.softmax_scale`), finite.
        d_v: value width, the first `d_v` columns of a row, in `[1, D]` (512 for DeepSeek-V3.2).
        threads: worker threads (default: one per core); 1 runs on the calling thread.

    Returns `(out float32 [T, h, d_v], lse float32 [T, h])`. A row with no valid index has `out = 0` and
    `lse = +inf`; a row whose query or selected latent rows hold inf or NaN has NaN `out` and `lse`.
    Numerics: float32 products and sums (one FMA per term, in index order), an exp accurate to ~2e-7,
    so `out` is within ~1e-6 relative of the float64 oracle for unit-scale inputs.

    Raises TypeError for a non-float `q`/`kv`, non-integer `indices` or a `scale`/`d_v`/`threads` of the
    wrong type; ValueError (naming the argument) for shapes that do not agree (`q` not 3-D, `kv` not
    `[N, D]`, `indices` not `[T, K]`), `d_v` outside `[1, D]`, a non-finite `scale`, `threads` outside
    `[1, 1024]`; MemoryError for an output that cannot be allocated.
    """
    qa = np.asarray(q)
    if qa.ndim != 3:
        raise ValueError(f"q: expected shape [T, h, D], got {list(qa.shape)}")
    if not (np.issubdtype(qa.dtype, np.floating) or qa.dtype == _BF16):
        raise TypeError(f"q: expected a float array, got {qa.dtype}")
    kva = np.asarray(kv)
    if kva.ndim != 2 or kva.shape[1] != qa.shape[2]:
        raise ValueError(f"kv: expected shape [N, {qa.shape[2]}] (q's width), got {list(kva.shape)}")
    if kva.dtype == _BF16:
        kv_in = np.require(kva, requirements=("C", "A")).view(np.uint16)
    elif np.issubdtype(kva.dtype, np.floating):
        kv_in = np.require(kva.astype(np.float32, copy=False), requirements=("C", "A"))
    else:
        raise TypeError(f"kv: expected a float32 or bfloat16 array, got {kva.dtype}")
    ia = np.asarray(indices)
    if ia.ndim != 2 or ia.shape[0] != qa.shape[0]:
        raise ValueError(f"indices: expected shape [{qa.shape[0]}, K] (q's rows), got {list(ia.shape)}")
    if ia.size and not np.issubdtype(ia.dtype, np.integer):
        raise TypeError(f"indices: expected an integer array, got {ia.dtype}")
    if ia.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
        # Other integer types (uint64 may not fit int64): out-of-range entries become -1, i.e. skipped.
        valid = (ia >= 0) & (ia < kva.shape[0])
        ia = np.where(valid, ia, 0).astype(np.int64)
        ia[~valid] = -1
    ia = np.require(ia, requirements=("C", "A"))
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    qf = np.require(qa.astype(np.float32, copy=False), requirements=("C", "A"))
    out, lse = _core.sparse_mla(qf, kv_in, ia, float(scale), d_v, threads=threads)
    return out, lse


def fma_peak_gflops(seconds: float = 0.2, repeats: int = 3) -> float:
    """This core's float32 FMA peak in GFLOP/s on the SIMD path in use (`cpu_features()["simd_path"]`):
    independent FMA chains timed by the calling thread's CPU time (so other processes on the machine do
    not lower it), the best of `repeats` runs of about `seconds` each. One core, one thread.
    `seconds` a real number in (0, 60], `repeats` an integer in [1, 100] (TypeError / ValueError)."""
    if isinstance(seconds, (bool, np.bool_)) or not isinstance(seconds, (int, float, np.floating, np.integer)):
        raise TypeError(f"seconds: expected a real number, got {type(seconds).__name__} {seconds!r}")
    if not 0 < float(seconds) <= 60:  # NaN fails this too
        raise ValueError(f"seconds: must be in (0, 60], got {seconds}")
    if isinstance(repeats, (bool, np.bool_)) or not isinstance(repeats, (int, np.integer)):
        raise TypeError(f"repeats: expected an integer, got {type(repeats).__name__} {repeats!r}")
    if not 1 <= int(repeats) <= 100:
        raise ValueError(f"repeats: must be in [1, 100], got {repeats}")
    seconds, repeats = float(seconds), int(repeats)
    iters = 1 << 16
    while True:
        t0 = time.thread_time()
        flops = _core.fma_loop(iters)
        dt = time.thread_time() - t0
        if dt >= seconds / 4 or iters >= 1 << 34:
            break
        iters *= 4
    iters = max(1, int(iters * seconds / max(dt, 1e-9)))
    best = 0.0
    for _ in range(repeats):
        t0 = time.thread_time()
        flops = _core.fma_loop(iters)
        dt = time.thread_time() - t0
        best = max(best, flops / max(dt, 1e-9) / 1e9)
    return best


__all__: list[str] = ["fma_peak_gflops", "sparse_mla_host"]

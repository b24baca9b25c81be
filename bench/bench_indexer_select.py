"""Host lightning indexer: `IndexerKeyCache.select` (fused FP8 scoring + top-k) against numpy, one thread.

One decode query (H_I = 64 heads, D_I = 128) against L = 8K … 128K FP8 keys in the cache, k = 2048. The
numpy baseline runs the same math on the same data: the cache's FP8 keys decoded to float32 (a table
lookup) and scaled, `einsum` (BLAS, `optimize=True`) → ReLU → weighted sum over heads → `argpartition`.
It is timed twice: from the FP8 bytes (what it must do with the cache), and from keys already decoded
(the most favourable case for numpy). The FMA peak is a large float32 numpy matmul in the same run.
docs/performance.md's targets: ≥ 2× faster end to end; scoring at ≥ 75% of the FMA peak.
"""

from __future__ import annotations

import argparse

import _single_thread  # noqa: F401  (before numpy)
import numpy as np
from _timing import best_time

import dsa_hybrid as dh
from dsa_hybrid import reference as ref


def fma_peak_gflops() -> float:
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    return 2 * 2048**3 / best_time(lambda: a @ a, 5) / 1e9


def measure(L: int, H: int, D: int, k: int, repeats: int, peak: float, rng: np.random.Generator) -> str:
    """One table row: the timings at context length `L`."""
    table = dh._core.fp8_decode_table()
    cache = dh.IndexerKeyCache(num_blocks=L // 64)
    cache.add_sequence(0)
    cache.append(0, rng.standard_normal((L, D)).astype(np.float32))
    q = rng.standard_normal((1, H, D)).astype(np.float32)
    w = (rng.random((1, H)) * H**-0.5).astype(np.float32)
    pos, ids = np.array([L - 1]), np.array([0])
    codes, scales = cache.gather(0, np.arange(L))
    # What numpy works with: the same FP8-quantized rotated queries and per-head factors.
    q_codes, q_scales = ref.quantize_fp8(ref.hadamard(q[0]))
    q8 = table[q_codes]
    head_w = (w[0] * D**-0.5 * q_scales).astype(np.float32)
    keys_f32 = table[codes] * scales[:, None]

    def numpy_from_f32(keys: np.ndarray) -> np.ndarray:
        logits = np.einsum("hd,ld->hl", q8, keys, optimize=True)
        np.maximum(logits, 0, out=logits)
        s = head_w @ logits
        return np.argpartition(s, -k)[-k:]

    def ours() -> np.ndarray:
        return cache.select(ids, q, w, pos, k, threads=1)

    overlap = len(set(ours()[0].tolist()) & set(numpy_from_f32(keys_f32).tolist())) / k
    t_fp8 = best_time(lambda: numpy_from_f32(table[codes] * scales[:, None]), repeats)
    t_f32 = best_time(lambda: numpy_from_f32(keys_f32), repeats)
    t_ours = best_time(ours, repeats)
    t_score = best_time(lambda: cache.scores(ids, q, w, pos, threads=1), repeats)
    dh.set_simd_path("avx2")
    t_avx2 = best_time(ours, repeats)
    dh.set_simd_path(None)
    gflops = 2 * H * D * L / t_score / 1e9
    return (
        f"{L:>7} {t_fp8 * 1e3:8.2f}ms {t_f32 * 1e3:8.2f}ms {t_ours * 1e3:6.2f}ms {t_avx2 * 1e3:8.2f}ms"
        f" {t_fp8 / t_ours:6.1f}x {t_f32 / t_ours:6.1f}x {gflops:14.1f} {gflops / peak:7.0%}"
        + ("" if overlap > 0.99 else f"   (overlap with numpy's set {overlap:.3f})")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16_384, 32_768, 65_536, 131_072])
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    peak = fma_peak_gflops()
    print(
        f"indexer score + top-{args.k}, H_I={args.heads}, D_I=128, one decode query, 1 thread (best of {args.repeats})"
    )
    print(f"FMA peak (numpy 2048² f32 matmul, 1 thread): {peak:.1f} GFLOP/s")
    print(f"SIMD path: {dh.cpu_features()['simd_path']}; the 'ours avx2' column pins the AVX2 kernels")
    print(
        f"{'L':>7} {'numpy fp8':>10} {'numpy f32':>10} {'ours':>8} {'ours avx2':>10}"
        f" {'vs fp8':>7} {'vs f32':>7} {'score GFLOP/s':>14} {'of peak':>8}"
    )
    for L in args.lengths:
        print(measure(L, args.heads, 128, args.k, args.repeats, peak, rng))
    print("vs fp8 / vs f32: numpy's time over ours; score GFLOP/s: 2·H·D·L over the time of `scores` alone")


if __name__ == "__main__":
    main()

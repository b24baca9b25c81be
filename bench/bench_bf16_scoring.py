"""Host indexer scoring with bfloat16 queries (`query_dtype="bfloat16"`, AVX512-BF16 `vdpbf16ps`) against
the float32 path, one thread, same cache, same run.

One decode query (H_I = 64, D_I = 128) against L = 16K … 128K FP8 keys. Times are the calling thread's
CPU time (best of `--repeats`), of `scores` alone and of `select` (scoring + top-2048). GFLOP/s count
2·H·D per key for both (a bf16 dot-product instruction does two multiply-adds per lane). Also: the FMA
peak of this core (`host.fma_peak_gflops`), and how far the selections agree with the float32 path's
(FP8 queries: exact products, only the order of the sums differs; float32 queries: rounded to bf16).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import _single_thread  # noqa: F401  (before numpy)
import numpy as np

import dsa_hybrid as dh
from dsa_hybrid import host
from dsa_hybrid._timing import best_time


def cpu_best(fn: Callable[[], Any], repeats: int) -> float:
    """Best CPU time of the calling thread over `repeats` calls after one untimed call."""
    return best_time(fn, repeats, clock=time.thread_time)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16_384, 32_768, 65_536, 131_072])
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    H, D, k = args.heads, 128, args.k
    feats = dh.cpu_features()
    peak = host.fma_peak_gflops()
    print(f"indexer scoring, H_I={H}, D_I={D}, one decode query, 1 thread, CPU time (best of {args.repeats})")
    print(
        f"SIMD path {feats['simd_path']}, avx512bf16: {feats.get('avx512bf16', False)}; "
        f"FMA peak {peak:.1f} GFLOP/s (f32)"
    )
    print(
        f"{'L':>7} {'f32 score':>10} {'bf16 score':>11} {'speed-up':>9} {'f32 GFLOP/s':>12} {'bf16 GFLOP/s':>13}"
        f" {'f32 select':>11} {'bf16 select':>12} {'same set (fp8 q)':>17} {'(f32 q)':>8}"
    )
    for L in args.lengths:
        cache = dh.IndexerKeyCache(num_blocks=L // 64)
        cache.add_sequence(0)
        cache.append(0, rng.standard_normal((L, D)).astype(np.float32))
        q = rng.standard_normal((1, H, D)).astype(np.float32)
        w = (rng.random((1, H)) * H**-0.5).astype(np.float32)
        ids, pos = np.array([0]), np.array([L - 1])

        def sc(dt: str) -> Any:
            return cache.scores(ids, q, w, pos, threads=1, query_dtype=dt)  # noqa: B023

        def sel(dt: str, quantize: bool = True) -> Any:
            return cache.select(ids, q, w, pos, k, threads=1, query_dtype=dt, quantize_queries=quantize)  # noqa: B023

        t32, t16 = cpu_best(lambda: sc("float32"), args.repeats), cpu_best(lambda: sc("bfloat16"), args.repeats)
        s32, s16 = cpu_best(lambda: sel("float32"), args.repeats), cpu_best(lambda: sel("bfloat16"), args.repeats)
        same_q8 = len(set(sel("float32")[0].tolist()) & set(sel("bfloat16")[0].tolist())) / k
        same_f = len(set(sel("float32", False)[0].tolist()) & set(sel("bfloat16", False)[0].tolist())) / k
        flops = 2 * H * D * L
        print(
            f"{L:>7} {t32 * 1e3:8.2f}ms {t16 * 1e3:9.2f}ms {t32 / t16:8.2f}x {flops / t32 / 1e9:12.1f}"
            f" {flops / t16 / 1e9:13.1f} {s32 * 1e3:9.2f}ms {s16 * 1e3:10.2f}ms {same_q8:17.4f} {same_f:8.4f}"
        )
    print("same set: the fraction of the float32 path's top-k the bf16 path also selects")


if __name__ == "__main__":
    main()

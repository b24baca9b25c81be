"""Sparse MLA attention on the CPU: the Rust core's fused kernel (`host.sparse_mla_host`) against the XLA
gather + einsum path (`ops.sparse_mla`, backend "xla"), one thread, DeepSeek-V3.2 shapes.

h = 128 heads, D = 576 (512 + 64), d_v = 512, K = 2048 selected rows per query row, L = 32K latent rows in
bf16 (the XLA path reads the same values from a bf16 `LatentCache`). Rows: decode (T = 1 and 4 query
rows) and a prefill block (T = 16). Times are CPU time (the process is pinned to one core, so other
processes on the machine do not inflate them), the best of `--repeats` after a warm-up; GFLOP/s count
2·h·(D + d_v) per selected row. Two peaks in the same run: the core's FMA peak on the SIMD path in use
(`host.fma_peak_gflops`, AVX-512 FMA chains here) and a float32 numpy matmul (the other benchmarks'
yardstick; OpenBLAS may use narrower vectors). docs/performance.md's target: ≥ 40% of the FMA peak.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import _single_thread  # noqa: F401  (before numpy and jax)
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dsa_hybrid import host
from dsa_hybrid._timing import best_time
from dsa_hybrid.ops.latent_cache import LatentCache
from dsa_hybrid.ops.sparse_mla import sparse_mla


def cpu_best(fn: Callable[[], Any], repeats: int) -> float:
    """Best process CPU time of `repeats` calls after one untimed call (JAX results waited for)."""
    return best_time(fn, repeats, clock=time.process_time)


def matmul_peak() -> float:
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    return 2 * 2048**3 / cpu_best(lambda: a @ a, 5) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--length", type=int, default=32_768)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-xla", action="store_true", help="skip the XLA baseline")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    h, L, K, scale = args.heads, args.length, args.k, 0.1352338
    c_kv = rng.standard_normal((L, 512)).astype(np.float32)
    k_pe = rng.standard_normal((L, 64)).astype(np.float32)
    kv = np.concatenate([c_kv, k_pe], axis=1).astype(ml_dtypes.bfloat16)
    kv32 = kv.astype(np.float32)
    cache = LatentCache.create(L // 64, 64, kind="bf16").write(jnp.arange(L), jnp.asarray(c_kv), jnp.asarray(k_pe))
    xla = jax.jit(lambda q, c, s: sparse_mla(q, c, s, scale=scale, backend="xla"))
    fma_peak = host.fma_peak_gflops()
    mm_peak = matmul_peak()
    path = host.cpu_features()["simd_path"]
    print(f"sparse MLA, h={h}, D=576, d_v=512, K={K}, L={L} bf16 latent rows, 1 thread, CPU time")
    print(f"FMA peak ({path} FMA chains): {fma_peak:.1f} GFLOP/s; numpy 2048² f32 matmul: {mm_peak:.1f} GFLOP/s")
    print(
        f"{'T':>4} {'xla ms':>9} {'ours bf16':>10} {'ours f32':>9} {'vs xla':>8} {'GFLOP/s':>8}"
        f" {'of FMA peak':>12} {'of matmul':>10} {'xla GFLOP/s':>12}"
    )
    for T in args.rows:
        q = (rng.standard_normal((T, h, 576)) / 24).astype(np.float32)
        idx = np.sort(rng.choice(L, size=(T, K), replace=True), axis=1).astype(np.int32)
        flops = 2 * T * h * K * (576 + 512)
        t_bf16 = cpu_best(lambda: host.sparse_mla_host(q, kv, idx, scale, 512, threads=1), args.repeats)  # noqa: B023
        t_f32 = cpu_best(lambda: host.sparse_mla_host(q, kv32, idx, scale, 512, threads=1), args.repeats)  # noqa: B023
        if args.no_xla:
            t_xla, err = float("nan"), float("nan")
        else:
            qj, sj = jnp.asarray(q), jnp.asarray(idx)
            t_xla = cpu_best(lambda: xla(qj, cache, sj), max(1, args.repeats - 1))  # noqa: B023
            ref = np.asarray(xla(qj, cache, sj)[0])
            err = float(np.abs(host.sparse_mla_host(q, kv, idx, scale, 512)[0] - ref).max())
        g = flops / t_bf16 / 1e9
        print(
            f"{T:>4} {t_xla * 1e3:9.1f} {t_bf16 * 1e3:10.2f} {t_f32 * 1e3:9.2f} {t_xla / t_bf16:7.1f}x {g:8.1f}"
            f" {g / fma_peak:12.0%} {g / mm_peak:10.0%} {flops / t_xla / 1e9:12.1f}"
            + (f"   (max |ours − xla| {err:.1e})" if err == err else "")
        )
    print("vs xla: the XLA path's CPU time over ours (bf16 latent); GFLOP/s and the peak fractions: ours, bf16")


if __name__ == "__main__":
    main()

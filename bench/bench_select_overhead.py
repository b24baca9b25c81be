"""Per-call overhead of the host indexer on decode-sized work: `IndexerKeyCache.select` of 1–4 rows and
`topk` of one [1, 4096] row, in microseconds per call (median and best of many calls).

These calls are too small for threads to pay off; what they measure is the fixed cost of a call (argument
checks, GIL release, the thread pool's wake-up) that a decode step pays per layer. Baseline: the same call
with `threads=1` (no pool at all), in the same run.
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np

import dsa_hybrid as dh


def per_call_us(fn, calls: int) -> tuple[float, float]:
    """(median, best) microseconds of `calls` calls of `fn`, after a few warm-up calls."""
    for _ in range(min(50, calls)):
        fn()
    t = np.empty(calls)
    for i in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        t[i] = time.perf_counter_ns() - t0
    return float(np.median(t)) / 1e3, float(t.min()) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--k", type=int, default=2048)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    H, D, k = args.heads, 128, args.k
    print(f"simd path {dh.cpu_features()['simd_path']}, H_I = {H}, D_I = {D}, k = {k}, {args.calls} calls each")
    print(f"{'call':<44} {'threads':>7} {'median us':>10} {'best us':>9}")
    for L in (256, 4096):
        cache = dh.IndexerKeyCache(num_blocks=4 * L // 64 + 4)
        for s in range(4):
            cache.add_sequence(s)
            cache.append(s, rng.standard_normal((L, D)).astype(np.float32))
        for T in (1, 4):
            q = rng.standard_normal((T, H, D)).astype(np.float32)
            w = (rng.random((T, H)) * H**-0.5).astype(np.float32)
            ids, pos = np.arange(T), np.full(T, L - 1)
            tables = np.stack([cache.block_table(s) for s in range(T)])
            for threads in (1, 2, None):
                call = functools.partial(cache.select, ids, q, w, pos, k, threads=threads)
                med, best = per_call_us(call, args.calls)
                name = f"select T={T} L={L}" + (" (no scoring: L <= k)" if L <= k else "")
                print(f"{name:<44} {threads!s:>7} {med:>10.1f} {best:>9.1f}")
            if hasattr(cache, "select_paged"):  # (absent from builds before it, which this also times)
                call = functools.partial(cache.select_paged, tables, pos, q, w, k, threads=None)
                med, best = per_call_us(call, args.calls)
                print(f"{f'select_paged T={T} L={L}':<44} {'None':>7} {med:>10.1f} {best:>9.1f}")
    scores = rng.standard_normal((1, 4096)).astype(np.float32)
    for threads in (1, 2, None):
        med, best = per_call_us(functools.partial(dh.topk, scores, k, threads=threads), args.calls)
        print(f"{'topk [1, 4096]':<44} {threads!s:>7} {med:>10.1f} {best:>9.1f}")
    scores = rng.standard_normal((8, 16384)).astype(np.float32)
    for threads in (1, 2, None):
        med, best = per_call_us(functools.partial(dh.topk, scores, k, threads=threads), max(1, args.calls // 4))
        print(f"{'topk [8, 16384] (threaded)':<44} {threads!s:>7} {med:>10.1f} {best:>9.1f}")


if __name__ == "__main__":
    main()

"""Host top-k (`dsa_hybrid.topk`) against numpy.argpartition, torch.topk and jax.lax.top_k, one thread.

Rows of f32 scores of length L (32K, 128K, 1M), k = 2048. Every library gets the same rows; each time is
the best of several runs per row. Also times one streaming read of the row (`np.max`), the floor any
top-k must pay. Prints µs per row and ratios; docs/performance.md's targets: ≥ 3× faster than the fastest baseline
at 128K, within 3× of the read.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import _single_thread  # noqa: F401  (before numpy/torch/jax)
import numpy as np
from _timing import best_time

import dsa_hybrid as dh


def baselines(k: int) -> dict[str, Callable[[np.ndarray], Callable[[], object]]]:
    out: dict[str, Callable[[np.ndarray], Callable[[], object]]] = {
        "numpy.argpartition": lambda row: lambda: np.argpartition(row, -k)[-k:],
    }
    try:
        import torch

        torch.set_num_threads(1)
        out["torch.topk"] = lambda row: (lambda t: lambda: torch.topk(t, k, sorted=False))(torch.from_numpy(row))
    except ImportError:
        print("(torch not installed: skipped)")
    try:
        import jax

        top_k = jax.jit(lambda x: jax.lax.top_k(x, k)[1])

        def jax_case(row: np.ndarray) -> Callable[[], object]:
            x = jax.device_put(row)
            return lambda: top_k(x).block_until_ready()

        out["jax.lax.top_k"] = jax_case
    except ImportError:
        print("(jax not installed: skipped)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32_768, 131_072, 1_048_576])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    k = args.k
    rng = np.random.default_rng(0)
    base = baselines(k)
    paths = [p for p in ("avx2", "avx512") if p in _available_paths()]
    print(f"top-{k} of one f32 row, 1 thread, µs per row (best of {args.repeats})")
    print(f"SIMD path: {dh.cpu_features()['simd_path']}; 'read' is one np.max over the row")
    names = [f"{n:>19}" for n in base] + [f"{'ours ' + p:>12}" for p in paths]
    print(f"{'L':>9} {'read':>8} " + " ".join(names) + "   vs fastest baseline   vs read")
    for L in args.lengths:
        row = rng.standard_normal(L).astype(np.float32)
        rows2d = row[None, :]
        want = set(np.argpartition(row, -k)[-k:].tolist())
        read = best_time(lambda: row.max(), args.repeats)  # noqa: B023
        tb = {name: best_time(make(row), args.repeats) for name, make in base.items()}
        ours = {}
        for p in paths:
            dh.set_simd_path(p)
            got = dh.topk(rows2d, k, threads=1)
            assert set(got[0].tolist()) == want, "selection differs from numpy"
            ours[p] = best_time(lambda: dh.topk(rows2d, k, threads=1), args.repeats)  # noqa: B023
        dh.set_simd_path(None)
        fastest = min(tb.values())
        best_ours = min(ours.values())
        cells = " ".join([f"{t * 1e6:19.1f}" for t in tb.values()] + [f"{t * 1e6:12.1f}" for t in ours.values()])
        print(f"{L:>9} {read * 1e6:8.1f} {cells}   {fastest / best_ours:8.1f}x faster    {best_ours / read:5.2f}x")
    print("ratios: fastest baseline time / our best time; our best time / one streaming read of the row")


def _available_paths() -> list[str]:
    out = []
    for p in ("scalar", "avx2", "avx512", "neon"):
        try:
            dh.set_simd_path(p)
            out.append(p)
        except ValueError:
            pass
    dh.set_simd_path(None)
    return out


if __name__ == "__main__":
    main()

"""Indexer-key quantization throughput: the Rust core against the numpy oracle, same keys, one run.

What the indexer-key cache does to each appended key (dsa.md §4): Hadamard-128, then FP8 e4m3fn with a
power-of-two scale. Prints tokens/s for both and their ratio. Usage:
    python bench/bench_fp8_quantize.py [--tokens 65536] [--repeats 5]
"""

from __future__ import annotations

import argparse

import numpy as np
from _timing import best_time

from dsa_hybrid import _core, reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    keys = np.random.default_rng(0).standard_normal((args.tokens, 128)).astype(np.float32)
    rust_codes, rust_scales = _core.fp8_quantize_rows(keys)
    ref_codes, ref_scales = reference.quantize_indexer_keys(keys)
    assert np.array_equal(rust_codes, ref_codes) and np.array_equal(rust_scales, ref_scales), "not bit-identical"

    t_rust = best_time(lambda: _core.fp8_quantize_rows(keys), args.repeats)
    t_ref = best_time(lambda: reference.quantize_indexer_keys(keys), max(1, args.repeats // 2))
    n = args.tokens
    print(f"Hadamard-128 + FP8 quantize of {n} keys (bit-identical outputs checked), 1 thread, best of runs")
    print(f"  numpy reference : {n / t_ref / 1e6:8.2f} M tokens/s")
    print(f"  Rust core       : {n / t_rust / 1e6:8.2f} M tokens/s")
    print(f"  ratio           : {t_ref / t_rust:8.1f}x")


if __name__ == "__main__":
    main()

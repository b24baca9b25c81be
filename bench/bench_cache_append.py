"""IndexerKeyCache.append throughput against the numpy oracle's quantize-and-pack, same keys, one run.

Appends `--tokens` post-RoPE keys in chunks of `--chunk` (a prefill-like stream) into a fresh cache,
and times the oracle doing the same work (Hadamard, FP8, page packing). Prints tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dsa_hybrid import IndexerKeyCache, reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n, chunk = args.tokens, args.chunk
    keys = np.random.default_rng(0).standard_normal((n, 128)).astype(np.float32)

    def run_cache() -> IndexerKeyCache:
        c = IndexerKeyCache(num_blocks=-(-n // 64))
        c.add_sequence(0)
        for i in range(0, n, chunk):
            c.append(0, keys[i : i + chunk])
        return c

    def run_oracle() -> np.ndarray:
        codes, scales = reference.quantize_indexer_keys(keys)
        return reference.pack_indexer_pages(codes, scales)

    assert np.array_equal(run_cache().pages(), run_oracle()), "cache pages differ from the oracle"
    best = {}
    for name, fn in (("numpy oracle", run_oracle), ("IndexerKeyCache", run_cache)):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        best[name] = min(times)
    print(f"append {n} keys in chunks of {chunk} (pages checked identical to the oracle), 1 thread, best of runs")
    for name, t in best.items():
        print(f"  {name:<16}: {n / t / 1e6:6.2f} M tokens/s")
    print(f"  ratio           : {best['numpy oracle'] / best['IndexerKeyCache']:6.1f}x")


if __name__ == "__main__":
    main()

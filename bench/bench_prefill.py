"""Prefill of one long prompt through the Engine against transformers (docs/performance.md row 6), alone.

The same table as the prefill part of `dsa-hybrid bench` (`cli.bench.bench_prefill`): `DSAConfig.small()`
with random weights shared by both sides, FP8 indexer, one thread, chunks of 1024 tokens; one
`--context`-token prefill per side, timed after every chunk, so each of `--lengths` is read off the same
run; the Engine's CPU time less JAX's tracing and compilation. Needs torch and transformers.
"""

from __future__ import annotations

import argparse
import sys

import _single_thread  # noqa: F401  (before numpy and jax)

from dsa_hybrid.cli.bench import Table, bench_prefill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=16_384)
    ap.add_argument("--lengths", type=int, nargs="*", default=[4096, 8192])
    ap.add_argument("--placements", nargs="+", default=["device", "host"], choices=["device", "host", "auto"])
    args = ap.parse_args()
    bench_prefill(Table(sys.stdout), args.context, tuple(args.lengths), tuple(args.placements))


if __name__ == "__main__":
    main()

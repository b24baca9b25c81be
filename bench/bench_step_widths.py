"""Decode step cost at neighbouring context lengths: the staircase check (docs/performance.md, target 8).

One decode row through the whole model on the device placement (`models.causal_lm.forward_jit`,
`DSAConfig.small()`), its block table as wide as the engine pads it
(`serving.runner.table_width`: 8 widths per octave) and, for comparison in the same run, padded to a
power of two of pages (the engine's rule before). The caches are left empty: the step's cost
does not depend on the key values. Every point is compiled first and then timed in `--repeats` rounds that
call each point once in turn; prints each point's fastest round (process CPU time) and the ratio between
each pair of neighbouring lengths (target: no jump above 15%).
"""

from __future__ import annotations

import argparse
import sys

import _single_thread  # noqa: F401  (before numpy/jax)

from dsa_hybrid.cli.bench import Table, bench_staircase


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, nargs="+", default=[16_384, 16_960, 32_768, 33_792, 65_536, 67_584],
                    help="context lengths, in neighbouring pairs")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rows", type=int, default=1, help="decode rows (one sequence each, same length)")
    args = ap.parse_args()
    if len(args.pairs) % 2:
        ap.error("--pairs takes an even number of lengths")
    bench_staircase(Table(sys.stdout), args.pairs, args.repeats, args.rows, power_of_two=True)


if __name__ == "__main__":
    main()

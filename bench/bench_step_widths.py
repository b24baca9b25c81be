"""Decode step cost at neighbouring context lengths: the staircase check (docs/performance.md, target 8).

One decode row through the whole model on the device placement (`models.causal_lm.forward_jit`,
`DSAConfig.small()`), its block table as wide as the engine pads it
(`serving.runner.table_width`: 8 widths per octave) and, for comparison in the same run, padded to a
power of two of pages (the engine's rule before). The caches are left empty: the step's cost
does not depend on the key values. Prints the median process CPU time of `--repeats` calls per point and
the ratio between each pair of neighbouring lengths (target: no jump above 15%).
"""

from __future__ import annotations

import argparse
import time

import _single_thread  # noqa: F401  (before numpy/jax)
import jax.numpy as jnp
import numpy as np

from dsa_hybrid.models.causal_lm import ModelParams, create_caches, forward_jit
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.serving.runner import table_width

PAGE = 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, nargs="+", default=[16_384, 16_960, 32_768, 33_792, 65_536, 67_584],
                    help="context lengths, in neighbouring pairs")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rows", type=int, default=1, help="decode rows (one sequence each, same length)")
    args = ap.parse_args()
    if len(args.pairs) % 2:
        ap.error("--pairs takes an even number of lengths")
    cfg = DSAConfig.small()
    params = ModelParams.random(cfg, seed=0)
    caches = create_caches(cfg, -(-max(args.pairs) // PAGE) + 2, PAGE, latent_kind="f32")
    cost: dict[tuple[int, str], float] = {}
    for L in args.pairs:
        need = -(-L // PAGE)
        widths = {"power of two": 1 << (need - 1).bit_length(), "table_width": table_width(need, 1 << 30)}
        for rule, width in widths.items():
            tab = np.full((args.rows, width), -1, np.int32)
            tab[:, :need] = np.arange(need)
            pos = jnp.full((args.rows,), L - 1, jnp.int32)
            call = (params, cfg, jnp.zeros((args.rows,), jnp.int32), pos, pos, jnp.asarray(tab))
            logits, caches = forward_jit(*call, caches, "xla")  # compiles
            logits.block_until_ready()
            times = []
            for _ in range(args.repeats):
                c0 = time.process_time()
                logits, caches = forward_jit(*call, caches, "xla")
                logits.block_until_ready()
                times.append(time.process_time() - c0)
            cost[(L, rule)] = float(np.median(times))
            print(f"L = {L:6d}  {rule:12s}  width {width:5d} pages ({width * PAGE / L:.2f}× the keys)  "
                  f"{cost[(L, rule)] * 1e3:.2f} ms")  # fmt: skip
    print("\n| L → L' | power of two | table_width |\n|---|---|---|")
    for a, b in zip(args.pairs[::2], args.pairs[1::2], strict=True):
        ratios = [cost[(b, r)] / cost[(a, r)] for r in ("power of two", "table_width")]
        print(f"| {a} → {b} | {ratios[0]:.2f}× | {ratios[1]:.2f}× |")


if __name__ == "__main__":
    main()

"""Sparse MLA attention (XLA path, CPU) against dense MLA attention over all L tokens, one thread.

One decode query token per sequence (h = 128 heads, absorbed width 576, K = 2048 selected entries), the
latent cache in bf16 or FP8, L = 4K … 64K. Dense runs the same einsum code over every cached token with
a causal mask (no gather); sparse gathers its K rows first. Prints ms per token and the ratio. docs/performance.md's
target: cost flat in L, ≥ 20× faster than dense at L = 64K.
"""

from __future__ import annotations

import argparse

import _single_thread  # noqa: F401  (before jax)
import jax
import jax.numpy as jnp
import numpy as np
from _timing import best_time

from dsa_hybrid.ops.latent_cache import LatentCache
from dsa_hybrid.ops.sparse_mla import dense_mla, sparse_mla


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16_384, 32_768, 65_536])
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--kind", choices=["bf16", "fp8"], default="bf16")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    scale = 0.1352338
    sparse = jax.jit(lambda q, c, s: sparse_mla(q, c, s, scale=scale, backend="xla"))
    dense = jax.jit(lambda q, c, p: dense_mla(q, c, p, scale=scale))
    print(
        f"MLA decode, h={args.heads}, K={args.k}, {args.kind} latent cache,"
        f" XLA on {jax.devices()[0].platform}, 1 thread"
    )
    print(f"{'L':>7} {'dense ms':>10} {'sparse ms':>10} {'sparse faster':>14}")
    for L in args.lengths:
        cache = LatentCache.create(L // 64, 64, kind=args.kind)
        cache = cache.write(
            jnp.arange(L),
            jnp.asarray(rng.standard_normal((L, 512)), jnp.float32),
            jnp.asarray(rng.standard_normal((L, 64)), jnp.float32),
        )
        q = jnp.asarray(rng.standard_normal((1, args.heads, 576)) / 24, jnp.bfloat16)
        slots = jnp.asarray(np.sort(rng.choice(L, min(args.k, L), replace=False))[None, :], jnp.int32)
        pos = jnp.array([L - 1])
        t_dense = best_time(lambda: dense(q, cache, pos), args.repeats)  # noqa: B023
        t_sparse = best_time(lambda: sparse(q, cache, slots), args.repeats)  # noqa: B023
        print(f"{L:>7} {t_dense * 1e3:10.2f} {t_sparse * 1e3:10.2f} {t_dense / t_sparse:13.1f}x")


if __name__ == "__main__":
    main()

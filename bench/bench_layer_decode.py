"""One decode step of the DSA layer with the indexer on the host (Rust) vs on the device (XLA), CPU.

DeepSeek-V3.2 widths (h = 128, H_I = 64, D_I = 128, K = 2048), one sequence whose caches already hold
L − 1 tokens (filled directly, not through the layer), then one new token: projections, indexer,
top-k, sparse MLA, output projection. Prints ms per step for each placement and their ratio, at
L = 4K … 64K. docs/performance.md: the scheduler's "auto" placement must pick the faster one at every L.
"""

from __future__ import annotations

import argparse

import _single_thread  # noqa: F401  (before numpy/jax)
import jax
import jax.numpy as jnp
import numpy as np
from _timing import best_time

import dsa_hybrid as dh
from dsa_hybrid.layers.dsa_attention import DSACaches, DSAParams, dsa_attention, dsa_attention_host

PAGE = 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16_384, 65_536])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="host select threads")
    args = ap.parse_args()
    cfg = dh.DSAConfig.deepseek_v32()
    params = DSAParams.random(cfg, seed=0, std=0.01)
    rng = np.random.default_rng(0)
    device_step = jax.jit(
        lambda p, x, pos, slots, tables, caches: dsa_attention(p, cfg, x, pos, slots, tables, caches, backend="xla")
    )
    print(f"DSA layer decode step, DeepSeek-V3.2 widths, 1 token, XLA on CPU, host select threads={args.threads}")
    print(f"{'L':>7} {'device ms':>10} {'host ms':>9} {'host/device':>12}")
    for L in args.lengths:
        n_pages = L // PAGE
        tables = jnp.arange(n_pages, dtype=jnp.int32)[None, :]
        caches = DSACaches.create(cfg, n_pages, PAGE)
        latent = caches.latent.write(
            jnp.arange(L - 1), jnp.asarray(rng.standard_normal((L - 1, 512)), jnp.float32),
            jnp.asarray(rng.standard_normal((L - 1, 64)), jnp.float32),
        )  # fmt: skip
        keys = rng.standard_normal((L - 1, 128)).astype(np.float32)
        index = caches.index.write(jnp.arange(L - 1), jnp.asarray(keys))
        caches = DSACaches(latent, index)
        host = dh.IndexerKeyCache(num_blocks=n_pages, block_size=PAGE)
        host.add_sequence(0)
        host.append(0, keys)
        x = jnp.asarray(rng.standard_normal((1, cfg.hidden_size)), jnp.float32)
        pos = jnp.array([L - 1], jnp.int32)

        def device(x=x, pos=pos, tables=tables, caches=caches) -> object:
            return device_step(params, x, pos, pos, tables, caches)[0]

        def host_step(x=x, pos=pos, tables=tables, caches=caches, host=host, L=L) -> object:
            host.truncate(0, L - 1)  # undo the previous step's append
            return dsa_attention_host(
                params, cfg, x, pos, pos, tables, caches, host, np.zeros(1), backend="xla", threads=args.threads
            )[0]

        t_dev = best_time(device, args.repeats)
        t_host = best_time(host_step, args.repeats)
        print(f"{L:>7} {t_dev * 1e3:10.1f} {t_host * 1e3:9.1f} {t_host / t_dev:11.2f}x")


if __name__ == "__main__":
    main()

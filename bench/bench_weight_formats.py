"""One DSA layer's projections (`project` + the output projection) at DeepSeek-V3.2 widths with its linear
weights resident as float32, bfloat16 or FP8 (128 × 128 blocks), jitted on the default backend: seconds per
call and the ratio to float32, for T = 1 (decode) and T = 32 rows. Decides `weights="auto"` on CPU
(`models.causal_lm.default_weights_mode`; docs/models.md). Short: ~1 minute on a 2-core host.

    python bench/bench_weight_formats.py [--tokens 1 32] [--reps 5]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsa_hybrid import DSAConfig
from dsa_hybrid.layers.dsa_attention import NORM_PARAMS, DSAParams, linear, project
from dsa_hybrid.layers.weights import Fp8Weight, dense, quantize_fp8_blocks, tree_nbytes


def convert(p: DSAParams, fmt: str) -> DSAParams:
    out = {}
    for name in p.__dataclass_fields__:
        w = getattr(p, name)
        if w is None or name in NORM_PARAMS or fmt == "float32":
            out[name] = w
        elif fmt == "bfloat16":
            out[name] = w.astype(jnp.bfloat16)
        else:
            codes, scale = quantize_fp8_blocks(np.asarray(w))
            out[name] = Fp8Weight(jnp.asarray(codes), jnp.asarray(scale))
    return DSAParams(**out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    cfg = DSAConfig.deepseek_v32()
    base = DSAParams.random(cfg, 0, 0.02)

    @jax.jit
    def step(p: DSAParams, x: jax.Array, pos: jax.Array) -> jax.Array:
        proj = project(p, cfg, x, pos)
        h, v, r = cfg.num_attention_heads, cfg.v_head_dim, cfg.kv_lora_rank
        w_uv = dense(p.kv_b).reshape(h, cfg.qk_nope_head_dim + v, r)[:, cfg.qk_nope_head_dim :]
        o = jnp.einsum("thr,hvr->thv", proj.q_abs[..., :r], w_uv).reshape(x.shape[0], h * v)
        return linear(o, p.o).sum() + proj.w_idx.sum() + proj.k_idx.sum()

    print(f"backend {jax.default_backend()}, DeepSeek-V3.2 layer projections, {args.reps} reps (median)")
    for fmt in ("float32", "bfloat16", "fp8"):
        p = convert(base, fmt)
        row = []
        for T in args.tokens:
            x = jnp.asarray(np.random.default_rng(1).standard_normal((T, cfg.hidden_size)), jnp.float32)
            pos = jnp.arange(T, dtype=jnp.int32) + 100
            step(p, x, pos).block_until_ready()
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                step(p, x, pos).block_until_ready()
                times.append(time.perf_counter() - t0)
            row.append((T, float(np.median(times))))
        if fmt == "float32":
            ref = dict(row)
        cells = ", ".join(f"T={T}: {t * 1e3:.1f} ms ({t / ref[T]:.2f}x f32)" for T, t in row)
        print(f"{fmt:9s} resident {tree_nbytes(p) / 2**20:7.1f} MiB  {cells}")
        del p


if __name__ == "__main__":
    main()

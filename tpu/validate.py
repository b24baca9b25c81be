"""Validate and time the sparse MLA Pallas kernel on a real TPU VM.

    python tpu/validate.py                 # DeepSeek-V3.2 shapes: h = 128, K = 2048, bf16 and FP8 caches
    python tpu/validate.py --tokens 1 64   # decode (1 token) and a prefill chunk (64 tokens)

For each cache format and token count it (1) compiles the sparse MLA kernel, (2) checks it against the XLA path on
the same inputs (max abs error of out, of lse), (3) times both, and (4) prints the achieved HBM bandwidth
and FLOP/s as a fraction of the chip's roofline (docs/dsa.md §8), and the compiled program's cost
analysis (FLOPs, bytes accessed, the time they bound) next to the measured time. Then the same for the device
indexer's scoring kernel (H_I = 64, D_I = 128, FP8 pages, top-k over the whole context). Exit status 1
if any check fails.
Needs `pip install .` (or `pip install -e .`) on the TPU VM; runs anywhere with `--interpret` for a
smoke test of the script itself (tiny shapes, CPU).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsa_hybrid.ops.indexer import IndexerPages, select_topk_device
from dsa_hybrid.ops.latent_cache import LatentCache
from dsa_hybrid.ops.sparse_mla import sparse_mla

# HBM bandwidth (bytes/s) and dense bf16 peak (FLOP/s) per chip, dsa.md §8.
ROOFLINE = {
    "v5e": (0.82e12, 197e12),
    "v5p": (2.77e12, 459e12),
    "v6e": (1.64e12, 918e12),
    "tpu7x": (7.38e12, 2307e12),
}


def chip_name() -> str | None:
    """The chip generation of the target ("v5e", "v5p", "v6e", "tpu7x"), as the kernels' block tables name it."""
    from dsa_hybrid.ops.target import tpu_chip

    return tpu_chip()


def compiled_cost(jitted, *args) -> tuple[float, float]:
    """`(FLOPs, bytes accessed)` of the compiled program, from XLA's cost analysis (a Pallas kernel
    contributes the `CostEstimate` it declares)."""
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def cost_note(cost: tuple[float, float], seconds: float, chip: str | None) -> str:
    """The compiled cost next to the measured time: FLOPs, bytes, and the time they bound on this chip."""
    flops, nbytes = cost
    line = f"  cost {flops / 1e9:.2f} GFLOP {nbytes / 1e6:.2f} MB"
    if chip:
        bw, peak = ROOFLINE[chip]
        bound = max(nbytes / bw, flops / peak)
        line += f" (bound {bound * 1e6:.1f} us = {bound / seconds:5.1%} of measured)"
    return line


def best_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def validate_indexer(args, chip: str | None, rng: np.random.Generator) -> bool:
    """The device indexer's scoring kernel: FP8 pages streamed through VMEM, H_I = 64, D_I = 128, top-k
    over `--context` keys for 1 and 8 query rows. Checks the selection against the XLA path; returns
    whether a check failed."""
    heads, d, L = (4, 32, 256) if args.interpret else (64, 128, args.context)
    k = min(args.k, L // 4)
    pages = IndexerPages.create(L // 64, 64, d).write(
        jnp.arange(L), jnp.asarray(rng.standard_normal((L, d)), jnp.float32)
    )
    tables = jnp.arange(L // 64, dtype=jnp.int32)[None, :]
    failed = False
    for T in (1, 8):
        q = jnp.asarray(rng.standard_normal((T, heads, d)), jnp.float32)
        w = jnp.asarray(rng.random((T, heads)) / 8, jnp.float32)
        pos = jnp.full((T,), L - 1, jnp.int32)
        tabs = jnp.repeat(tables, T, axis=0)

        def run(backend: str, q=q, w=w, pos=pos, tabs=tabs):
            return select_topk_device(q, w, pages, tabs, pos, k, backend=backend, interpret=args.interpret)

        pallas, xla = jax.jit(lambda: run("pallas_tpu")), jax.jit(lambda: run("xla"))
        try:
            got = pallas()
            cost = compiled_cost(pallas)
        except Exception as e:
            print(f"  indexer T={T:<3} COMPILE/RUN FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            failed = True
            continue
        overlap = float(
            np.mean([len(set(a) & set(b)) / k for a, b in zip(np.asarray(got), np.asarray(xla()), strict=True)])
        )
        ok = overlap > 0.999  # identical up to accumulation-order near-ties
        failed |= not ok
        t_p, t_x = best_time(pallas, args.repeats), best_time(xla, args.repeats)
        line = f"  indexer T={T:<3} {'ok ' if ok else 'BAD'} overlap {overlap:.4f}"
        line += f"  pallas {t_p * 1e6:9.1f} us  xla {t_x * 1e6:9.1f} us"
        if chip:
            bw, peak = ROOFLINE[chip]
            line += (
                f"  HBM {T * L * (d + 4) / t_p / bw:6.1%}  MXU {2 * T * heads * d * L / t_p / peak:6.1%} of roofline"
            )
        print(line + cost_note(cost, t_p, chip))
    return failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--context", type=int, default=65_536, help="cache slots")
    ap.add_argument("--kinds", nargs="+", default=["bf16", "fp8"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--interpret", action="store_true", help="CPU smoke test in TPU interpret mode (tiny shapes)")
    args = ap.parse_args()
    if args.interpret:
        args.heads, args.k, args.tokens, args.context, args.repeats = 2, 16, [2], 256, 1
    elif jax.default_backend() != "tpu":
        print(f"no TPU here (JAX backend: {jax.default_backend()}); use --interpret for a smoke test")
        return 2
    chip = chip_name()
    print(f"device: {jax.devices()[0].device_kind} ({chip or 'unknown chip: no roofline'}), jax {jax.__version__}")
    rng = np.random.default_rng(0)
    scale = 0.1352338
    failed = False
    for kind in args.kinds:
        cache = LatentCache.create(args.context // 64, 64, kind=kind)
        cache = cache.write(
            jnp.arange(args.context),
            jnp.asarray(rng.standard_normal((args.context, 512)), jnp.float32),
            jnp.asarray(rng.standard_normal((args.context, 64)), jnp.float32),
        )
        for T in args.tokens:
            q = jnp.asarray(rng.standard_normal((T, args.heads, 576)) / 24, jnp.bfloat16)
            slots = jnp.asarray(
                np.stack([rng.choice(args.context, args.k, replace=False) for _ in range(T)]), jnp.int32
            )
            pallas = jax.jit(
                lambda q, c, s: sparse_mla(q, c, s, scale=scale, backend="pallas_tpu", interpret=args.interpret)
            )
            xla = jax.jit(lambda q, c, s: sparse_mla(q, c, s, scale=scale, backend="xla"))
            try:
                out, lse = pallas(q, cache, slots)
                cost = compiled_cost(pallas, q, cache, slots)
            except Exception as e:  # a compile failure is a finding to report, not a crash
                print(f"  {kind:5} T={T:<4} COMPILE/RUN FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                failed = True
                continue
            ref_out, ref_lse = xla(q, cache, slots)
            err_out = float(jnp.max(jnp.abs(out - ref_out)))
            err_lse = float(jnp.max(jnp.abs(lse - ref_lse)))
            ok = err_out < 2e-2 and err_lse < 2e-2  # bf16 matmul inputs on the MXU
            failed |= not ok
            t_pallas = best_time(lambda: pallas(q, cache, slots), args.repeats)  # noqa: B023
            t_xla = best_time(lambda: xla(q, cache, slots), args.repeats)  # noqa: B023
            bytes_moved = T * args.k * cache.bytes_per_token + q.size * 2 + T * args.heads * (512 + 1) * 4
            flops = 2 * T * args.heads * args.k * (576 + 512)
            line = (
                f"  {kind:5} T={T:<4} {'ok ' if ok else 'BAD'} |out err| {err_out:.1e} |lse err| {err_lse:.1e}"
                f"  pallas {t_pallas * 1e6:9.1f} us  xla {t_xla * 1e6:9.1f} us ({t_xla / t_pallas:4.1f}x)"
            )
            if chip:
                bw, peak = ROOFLINE[chip]
                line += f"  HBM {bytes_moved / t_pallas / bw:6.1%}  MXU {flops / t_pallas / peak:6.1%} of roofline"
            print(line + cost_note(cost, t_pallas, chip))
    failed |= validate_indexer(args, chip, rng)
    print("FAILED" if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

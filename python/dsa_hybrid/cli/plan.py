"""`dsa-hybrid plan`: compile a full-size model for a TPU slice ahead of time (libtpu, no chip) and print
its per-device HBM, collectives and cost (`parallel.plan`); `--table` prints the docs/parallel.md tables.

Every flag is checked by the parser (docs/errors.md): an absurd size, an unknown TPU generation or step
is a usage error (one line, exit status 2) before libtpu is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from dsa_hybrid.cli.args import int_in

TABLE_TOPOLOGIES = ("v5p:4x4x4", "v6e:8x8", "tpu7x:2x2x4")
GENERATIONS = ("v5e", "v5p", "v6e", "tpu7x")
# Temporaries assumed on other slices than the compiled one (the most measured here: 2.8 GiB, DeepSeek-V3.2
# decode on tpu7x:2x2x4; a smaller slice holds more experts per device and needs more).
SLICE_TEMP_FLOOR = 3 << 30


def _topology(text: str) -> str:
    """An argparse type: `<generation>:<shape>` with a known generation (libtpu checks the shape later)."""
    gen, _, shape = text.partition(":")
    if gen not in GENERATIONS or not shape:
        raise argparse.ArgumentTypeError(
            f"expected <generation>:<shape> with a generation of {GENERATIONS}, got {text!r}"
        )
    return text


def _steps(text: str) -> str:
    """An argparse type: a comma-separated subset of decode, prefill."""
    steps = [s.strip() for s in text.split(",") if s.strip()]
    if not steps or any(s not in ("decode", "prefill") for s in steps):
        raise argparse.ArgumentTypeError(f"expected decode, prefill or decode,prefill, got {text!r}")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=["deepseek_v32", "glm_moe_dsa"], default="deepseek_v32")
    p.add_argument("--topology", type=_topology, default="v5p:4x4x4",
                   help="a libtpu topology, e.g. v5p:4x4x4, v6e:8x8, tpu7x:2x2x4")  # fmt: skip
    p.add_argument("--context", type=int_in(1, 2**24), default=131072,
                   help="tokens per sequence in the caches (default 131072)")  # fmt: skip
    p.add_argument(
        "--batch", type=int_in(1, 2**20), default=32, help="sequences, spread over the DP ranks (default 32)"
    )
    p.add_argument("--weights", choices=["fp8", "bf16"], default="fp8", help="resident weight format (default fp8)")
    p.add_argument(
        "--tp", type=int_in(1, 1024), default=None, help="tensor-parallel width (default: 8, or less to divide)"
    )
    p.add_argument("--prefill-chunk", type=int_in(1, 2**20), default=256,
                   help="new tokens per DP rank in the prefill step")  # fmt: skip
    p.add_argument("--steps", type=_steps, default="decode,prefill", help="steps to compile: decode, prefill or both")
    p.add_argument("--full", action="store_true",
                   help="also compile 0- and 1-layer programs to scale collectives and cost to all layers")  # fmt: skip
    p.add_argument("--table", action="store_true",
                   help="both models on v5p:4x4x4, v6e:8x8 and tpu7x:2x2x4 (decode) as markdown tables")  # fmt: skip


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_plan(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Run the command (quiet libtpu; progress on stderr)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from dsa_hybrid.parallel import plan as pl

    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    if args.table:
        return _table(args, out)
    p = pl.plan(args.model, args.topology, context=args.context, batch=args.batch, weights=args.weights, tp=args.tp,
                prefill_chunk=args.prefill_chunk, quick=not args.full, steps=steps, log=_log)  # fmt: skip
    print(pl.format_plan(p), file=out)
    cfg = pl.MODELS[args.model]()
    temp = max(SLICE_TEMP_FLOOR, *(s.temp_bytes for s in p.steps))
    print(f"smallest slice that fits {args.model} ({args.weights}, {args.batch} x {args.context} tokens; "
          f"temporaries {temp / 2**30:.1f} GiB):", file=out)  # fmt: skip
    for gen in GENERATIONS:
        n = pl.smallest_slice(cfg, gen, context=args.context, batch=args.batch, weights=args.weights, temp_bytes=temp)
        where = f"none up to {pl.CHIPS[gen].max_chips} chips" if n is None else f"{n[0]} chips (tp {n[1]})"
        print(f"  {gen}: {where}", file=out)
    return 0


def _table(args: argparse.Namespace, out: TextIO) -> int:
    from dsa_hybrid.parallel import plan as pl

    gib = pl.GiB
    print(f"Decode step, {args.batch} sequences x {args.context} tokens, {args.weights} weights, bf16 latent "
          f"cache; per device (TPU7x: per die, half a chip):\n", file=out)  # fmt: skip
    print("| model | topology | devices | mesh dp x tp | weights GiB | latent cache GiB | indexer cache GiB "
          "| temporaries GiB | total / HBM GiB | fits | collectives (compiled 1 dense + 1 MoE layer) "
          "| roofline ms (2 layers) |", file=out)  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", file=out)
    temps: dict[tuple[str, str], int] = {}
    for model in ("deepseek_v32", "glm_moe_dsa"):
        for topo in TABLE_TOPOLOGIES:
            _log(f"{model} on {topo}")
            p = pl.plan(model, topo, context=args.context, batch=args.batch, weights=args.weights, tp=args.tp,
                        quick=True, steps=("decode",), log=_log)  # fmt: skip
            s = p.steps[0]
            temps[(model, p.chip)] = s.temp_bytes
            c = pl.CHIPS[p.chip]
            roof = 1e3 * max(s.bytes_accessed / c.hbm_bw, s.flops / c.bf16_flops)
            coll = ", ".join(f"{k} {v}" for k, v in s.collectives.items() if v) or "none"
            print(f"| {model} | {topo} | {p.devices} | {p.dp} x {p.tp} | {p.weight_bytes / gib:.1f} | "
                  f"{p.latent_bytes / gib:.1f} | {p.indexer_bytes / gib:.1f} | {s.temp_bytes / gib:.1f} | "
                  f"{p.peak_bytes / gib:.1f} / {p.capacity / gib:.0f} | {'yes' if p.fits else 'no'} | {coll} | "
                  f"{roof:.2f} |", file=out, flush=True)  # fmt: skip
    print("\nSmallest slice (chips, and the TP width) on which each model fits, same load (weights and caches "
          "by the shard arithmetic, temporaries the most compiled above, at least 3 GiB):\n", file=out)  # fmt: skip
    print("| model | " + " | ".join(GENERATIONS) + " |", file=out)
    print("|---|" + "---|" * len(GENERATIONS), file=out)
    for model in ("deepseek_v32", "glm_moe_dsa"):
        cfg = pl.MODELS[model]()
        cells = []
        for gen in GENERATIONS:
            temp = max(SLICE_TEMP_FLOOR, *(t for (m, _), t in temps.items() if m == model))
            n = pl.smallest_slice(cfg, gen, context=args.context, batch=args.batch, weights=args.weights,
                                  temp_bytes=temp)  # fmt: skip
            cells.append("none" if n is None else f"{n[0]} (tp {n[1]})")
        print(f"| {model} | " + " | ".join(cells) + " |", file=out)
    return 0

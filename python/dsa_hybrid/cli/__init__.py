"""`dsa-hybrid` command line: `demo` (the main job), `bench` (the PERF table and plot), `oracle` (one
DSA step by the float64 reference) and `info` (what this machine offers)."""

from __future__ import annotations

import argparse
import platform
import sys

from dsa_hybrid import __version__, cpu_features
from dsa_hybrid.models.config import DSAConfig


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _cmd_demo(args: argparse.Namespace) -> int:
    from dsa_hybrid.cli.demo import run_demo

    run_demo(
        checkpoint=args.checkpoint, model_type=args.model, requests=args.requests, prompt_len=args.prompt_len,
        new_tokens=args.new_tokens, placement=args.placement, seed=args.seed, out=sys.stdout,
    )  # fmt: skip
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    # A fresh interpreter, so every library is pinned to one thread before numpy and JAX load.
    import os
    import subprocess

    from dsa_hybrid.cli.bench import SINGLE_THREAD_ENV

    cmd = [sys.executable, "-m", "dsa_hybrid.cli.bench", "--plot", args.plot] + (["--quick"] if args.quick else [])
    return subprocess.run(cmd, env={**os.environ, **SINGLE_THREAD_ENV}, check=False).returncode


def _cmd_oracle(args: argparse.Namespace) -> int:
    from dsa_hybrid.cli.oracle_demo import run_oracle_demo

    cfg = DSAConfig.glm5() if args.model == "glm5" else DSAConfig.deepseek_v32()
    run_oracle_demo(cfg, seq_len=args.seq_len, query_tokens=args.tokens, seed=args.seed)
    return 0


def _cmd_info(_: argparse.Namespace) -> int:
    feats = cpu_features()
    print(f"dsa_hybrid {__version__} on Python {platform.python_version()} ({platform.machine()})")
    present = [k for k, v in feats.items() if v is True]
    print(f"CPU features: {', '.join(present) or 'none detected'}")
    print(f"SIMD path:    {feats['simd_path']}")
    try:
        import jax

        devices = ", ".join(str(d) for d in jax.devices())
        print(f"JAX {jax.__version__}: backend {jax.default_backend()}, devices [{devices}]")
    except Exception as e:  # noqa: BLE001 - info must still print the rest
        print(f"JAX: unavailable ({e})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsa-hybrid", description="DeepSeek Sparse Attention on CPU/TPU")
    parser.add_argument("--version", action="version", version=f"dsa_hybrid {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="serve long-prompt requests through the Engine and report")
    demo.add_argument("--checkpoint", help="a Hugging Face DeepseekV32ForCausalLM directory (default: random weights)")
    demo.add_argument("--model", choices=["deepseek_v32", "glm_moe_dsa"], default="deepseek_v32",
                      help="structure of the random model (default deepseek_v32)")  # fmt: skip
    demo.add_argument("--requests", type=_positive, default=4)
    demo.add_argument("--prompt-len", type=_positive, default=3072, help="tokens per prompt (default 3072)")
    demo.add_argument("--new-tokens", type=_positive, default=32)
    demo.add_argument("--placement", choices=["auto", "device", "host"], default="auto")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser("bench", help="run the docs/performance.md table and write a PNG plot of cost per token")
    bench.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every row")
    bench.add_argument("--plot", default="dsa_bench.png", help="PNG path (default dsa_bench.png; needs matplotlib)")
    bench.set_defaults(func=_cmd_bench)

    oracle = sub.add_parser("oracle", help="one DSA attention step by the float64 reference, at real widths")
    oracle.add_argument("--model", choices=["deepseek-v3.2", "glm5"], default="deepseek-v3.2")
    oracle.add_argument("--seq-len", type=_positive, default=6144, help="tokens in the sequence (default 6144)")
    oracle.add_argument("--tokens", type=_positive, default=4, help="query tokens at the end of the sequence")
    oracle.add_argument("--seed", type=int, default=0)
    oracle.set_defaults(func=_cmd_oracle)

    info = sub.add_parser("info", help="CPU features, SIMD path, JAX backend and devices")
    info.set_defaults(func=_cmd_info)

    args = parser.parse_args(argv)
    if args.command == "oracle" and args.tokens > args.seq_len:
        parser.error("--tokens cannot exceed --seq-len")
    if args.command in ("demo", "oracle"):  # JAX's persistent compilation cache (DSA_HYBRID_CACHE_DIR)
        from dsa_hybrid.serving.compile_cache import enable_compilation_cache

        enable_compilation_cache()
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

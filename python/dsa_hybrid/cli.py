"""`dsa-hybrid` command line: `demo` (the main job) and `info` (what this machine offers)."""

from __future__ import annotations

import argparse
import platform
import sys

from . import __version__, cpu_features
from .config import DSAConfig


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    cfg = DSAConfig.glm5() if args.model == "glm5" else DSAConfig.deepseek_v32()
    run_demo(cfg, seq_len=args.seq_len, query_tokens=args.tokens, seed=args.seed)
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

    demo = sub.add_parser("demo", help="run one DSA attention step with the float64 oracle and report it")
    demo.add_argument("--model", choices=["deepseek-v3.2", "glm5"], default="deepseek-v3.2")
    demo.add_argument("--seq-len", type=int, default=6144, help="tokens in the sequence (default 6144)")
    demo.add_argument("--tokens", type=int, default=4, help="query tokens at the end of the sequence")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    info = sub.add_parser("info", help="CPU features, SIMD path, JAX backend and devices")
    info.set_defaults(func=_cmd_info)

    args = parser.parse_args(argv)
    if getattr(args, "seq_len", 1) < 1 or getattr(args, "tokens", 1) < 1:
        parser.error("--seq-len and --tokens must be positive")
    if getattr(args, "tokens", 0) > getattr(args, "seq_len", 1 << 62):
        parser.error("--tokens cannot exceed --seq-len")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""`dsa-hybrid` command line: `demo` (the main job), `bench` (the PERF table and plot), `oracle` (one
DSA step by the float64 reference) and `info` (what this machine offers).

Errors (docs/errors.md): a usage error (a bad or absurd flag) is one line on stderr and exit status 2; any
other error while a command runs is one line `dsa-hybrid: error: <Type>: <message>` and exit status 1;
Ctrl-C exits with 130 without a traceback. `--debug` (or `DSA_HYBRID_DEBUG=1`) prints the traceback too.
A new subcommand only adds its parser in `main`: the error handling (`run_command`) applies to every command."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from dsa_hybrid import __version__, cpu_features
from dsa_hybrid.cli.args import int_in
from dsa_hybrid.models.config import DSAConfig


class _Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose usage errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _real_in(lo: float, hi: float, *, open_low: bool = False):  # noqa: ANN202 - an argparse type callable
    """An argparse type: a finite number in `[lo, hi]` (`(lo, hi]` with `open_low`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (lo < value if open_low else lo <= value) or not value <= hi:  # NaN fails too
            raise argparse.ArgumentTypeError(f"must lie in {'(' if open_low else '['}{lo}, {hi}], got {text}")
        return value

    parse.__name__ = "number"
    return parse


_positive = int_in(1, 2**31 - 1)
_seed = int_in(0, 2**32 - 1)


def _checkpoint_dir(text: str) -> str:
    """An argparse type: an existing directory holding a Hugging Face `config.json`."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {text!r}")
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text!r} holds no config.json (not a Hugging Face checkpoint)")
    return text


def _output_file(text: str) -> str:
    """An argparse type: a file path whose directory exists (checked before a long run, not after it)."""
    parent = Path(text).parent
    if not text or not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: no such directory {str(parent)!r}")
    return text


def _debug() -> bool:
    return os.environ.get("DSA_HYBRID_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command (`args.func(args)`) with the CLI's error handling; every subcommand goes through
    here. Returns the exit status: the command's, 1 after an error (one line on stderr), 130 after Ctrl-C."""
    debug = bool(getattr(args, "debug", False)) or _debug()  # `--debug` anywhere, or DSA_HYBRID_DEBUG=1
    try:
        if args.command in ("demo", "oracle", "generate"):  # JAX's persistent compilation cache (DSA_HYBRID_CACHE_DIR)
            from dsa_hybrid.serving.compile_cache import enable_compilation_cache

            enable_compilation_cache()
        return int(args.func(args))
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("dsa-hybrid: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's one place that turns any error into one line
        if debug:
            traceback.print_exc()
        message = " ".join(str(e).split()) or "(no message)"
        hint = "" if debug else " (--debug shows the traceback)"
        print(f"dsa-hybrid: error: {type(e).__name__}: {message}{hint}", file=sys.stderr)
        return 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from dsa_hybrid.cli.demo import run_demo, run_recall_demo, shipped_recall_weights

    # Each demo has its own defaults for what was not given (None).
    given = {n: getattr(args, n) for n in ("requests", "prompt_len") if getattr(args, n) is not None}
    if not args.checkpoint and not args.random_weights and shipped_recall_weights():
        run_recall_demo(placement=args.placement, seed=args.seed, out=sys.stdout, **given)
        return 0
    run_demo(
        checkpoint=args.checkpoint, model_type=args.model, new_tokens=args.new_tokens, placement=args.placement,
        seed=args.seed, out=sys.stdout, **given,
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


def _cmd_generate(args: argparse.Namespace) -> int:
    from dsa_hybrid.cli.generate import GenerateError, run_generate

    try:
        run_generate(
            args.checkpoint, args.prompt, chat=args.chat, thinking=args.thinking, system=args.system,
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
            placement=args.placement, progress=True if args.progress else None,
        )  # fmt: skip
    except GenerateError as e:
        print(f"dsa-hybrid generate: error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from dsa_hybrid.cli.plan import run_plan

    return run_plan(args)


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
    parser = _Parser(prog="dsa-hybrid", description="DeepSeek Sparse Attention on CPU/TPU")
    parser.add_argument("--version", action="version", version=f"dsa_hybrid {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (DSA_HYBRID_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="serve long-prompt requests through the Engine and report")
    demo.add_argument(
        "--checkpoint",
        type=_checkpoint_dir,
        help="a Hugging Face DeepseekV32ForCausalLM directory (default: random weights)",
    )
    demo.add_argument("--model", choices=["deepseek_v32", "glm_moe_dsa"], default="deepseek_v32",
                      help="structure of the random model (default deepseek_v32)")  # fmt: skip
    demo.add_argument("--random-weights", action="store_true",
                      help="serve a random model, long prompts (default: the recall model trained here)")  # fmt: skip
    demo.add_argument("--requests", type=int_in(1, 1024), help="requests (default 16 recall prompts; 4 random)")
    demo.add_argument("--prompt-len", type=int_in(2, 2**20),
                      help="tokens per prompt (default 256 recall; 3072 random)")  # fmt: skip
    demo.add_argument("--new-tokens", type=int_in(1, 2**16), default=32)
    demo.add_argument("--placement", choices=["auto", "device", "host"], default="auto")
    demo.add_argument("--seed", type=_seed, default=0)
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser("bench", help="run the docs/performance.md table and write a PNG plot of cost per token")
    bench.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every row")
    bench.add_argument(
        "--plot", type=_output_file, default="dsa_bench.png", help="PNG path (default dsa_bench.png; needs matplotlib)"
    )
    bench.set_defaults(func=_cmd_bench)

    oracle = sub.add_parser("oracle", help="one DSA attention step by the float64 reference, at real widths")
    oracle.add_argument("--model", choices=["deepseek-v3.2", "glm5"], default="deepseek-v3.2")
    oracle.add_argument("--seq-len", type=int_in(1, 2**17), default=6144, help="tokens in the sequence (default 6144)")
    oracle.add_argument("--tokens", type=int_in(1, 1024), default=4, help="query tokens at the end of the sequence")
    oracle.add_argument("--seed", type=_seed, default=0)
    oracle.set_defaults(func=_cmd_oracle)

    gen = sub.add_parser("generate", help="stream text from a Hugging Face checkpoint directory through the Engine")
    gen.add_argument(
        "--checkpoint",
        type=_checkpoint_dir,
        required=True,
        help="directory with config.json, *.safetensors, tokenizer.json",
    )
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="encode the prompt as a user turn of the model's chat format")
    gen.add_argument("--thinking", action="store_true", help="with --chat: thinking mode (the reply opens <think>)")
    gen.add_argument("--system", help="with --chat: a system message")
    gen.add_argument("--max-tokens", type=_positive, default=64)
    gen.add_argument("--temperature", type=_real_in(0.0, 100.0), default=0.0, help="0 (default): greedy")
    gen.add_argument("--top-p", type=_real_in(0.0, 1.0, open_low=True), default=1.0)
    gen.add_argument("--seed", type=_seed, default=0)
    gen.add_argument(
        "--placement",
        choices=["auto", "device", "host"],
        default=None,
        help="default: host on a CPU, device on an accelerator (Engine.default_placement)",
    )
    gen.add_argument("--progress", action="store_true", help="a loading progress bar even when stderr is no terminal")
    gen.set_defaults(func=_cmd_generate)

    plan = sub.add_parser("plan", help="per-chip HBM, collectives and cost of a full-size model on a TPU slice (AOT)")
    from dsa_hybrid.cli.plan import add_arguments as add_plan_arguments

    add_plan_arguments(plan)
    plan.set_defaults(func=_cmd_plan)

    from dsa_hybrid.cli import train as train_cli

    train_cli.add_parser(sub)

    info = sub.add_parser("info", help="CPU features, SIMD path, JAX backend and devices")
    info.set_defaults(func=_cmd_info)

    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:cut]  # accepted anywhere before "--", for every subcommand
    args = parser.parse_args([a for i, a in enumerate(argv) if i >= cut or a != "--debug"])
    args.debug = debug
    if args.command == "oracle" and args.tokens > args.seq_len:
        parser.error("--tokens cannot exceed --seq-len")
    if args.command == "demo" and (args.requests or 4) * ((args.prompt_len or 3072) + args.new_tokens) > 2**22:
        parser.error("--requests × (--prompt-len + --new-tokens) must stay <= 4194304 tokens")
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())

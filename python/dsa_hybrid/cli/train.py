"""`dsa-hybrid train --recipe recall`: reproduce the shipped recall model (train, save, evaluate).

Every flag is checked by the parser (docs/errors.md): a bad value is a usage error, one line on stderr
and exit status 2, before anything is trained."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from dsa_hybrid.cli.args import int_in

RECIPES = ("recall",)
MAX_STEPS = 10**7
MAX_EVAL_LENGTH = 2**17


def _lengths(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated contexts, each at least the task's shortest sequence."""
    from dsa_hybrid.train.recipes import RECALL_TASK

    lo = RECALL_TASK.min_length()
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one length")
    bad = [v for v in values if not lo <= v <= MAX_EVAL_LENGTH]
    if bad:
        raise argparse.ArgumentTypeError(f"each length must lie in [{lo}, {MAX_EVAL_LENGTH}], got {bad[0]}")
    return values


def _out_dir(text: str) -> str:
    """An argparse type: a directory to write into (it may exist; its parent must; not a file)."""
    path = Path(text)
    if not text or path.is_file() or not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write into {text!r} (a file, or no such parent directory)")
    return text


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `train` subcommand on the CLI's subparsers."""
    p = sub.add_parser("train", help="train a DSA model by a recipe (needs optax: the 'train' extra)")
    p.add_argument("--recipe", choices=RECIPES, default="recall", help="what to train (default recall)")
    p.add_argument(
        "--out", type=_out_dir, default="dsa_recall_model", help="output directory (default dsa_recall_model)"
    )
    steps = int_in(0, MAX_STEPS)
    p.add_argument("--dense-steps", type=steps, help="override the recipe's dense steps")
    p.add_argument("--warmup-steps", type=steps, help="override the recipe's indexer warm-up steps")
    p.add_argument("--sparse-steps", type=steps, help="override the recipe's sparse steps (default 0)")
    p.add_argument("--seed", type=int_in(0, 2**32 - 1), help="override the recipe's seed")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation table")
    p.add_argument(
        "--eval-lengths",
        type=_lengths,
        default=(128, 256, 512, 1024, 2048),
        help="contexts of the evaluation table (comma separated; default 128,256,512,1024,2048)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dsa_hybrid.train.recipes import RecallRecipe, run_recall_recipe

    recipe = RecallRecipe()
    overrides = {
        "dense_steps": args.dense_steps, "warmup_steps": args.warmup_steps, "sparse_steps": args.sparse_steps,
        "seed": args.seed,
    }  # fmt: skip
    recipe = dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    lengths = tuple(args.eval_lengths)
    summary = run_recall_recipe(args.out, recipe, evaluate=not args.no_eval, lengths=lengths)
    print(f"trained in {summary['train_seconds']} s; weights, config.json, losses.png in {args.out}")
    for stage, parts in summary["final"].items():
        print(f"  {stage}: " + ", ".join(f"{n} {v:.4f}" for n, v in parts.items()))
    if "table" in summary:
        print(summary["table"])
    sys.stdout.flush()
    return 0

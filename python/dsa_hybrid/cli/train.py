"""`dsa-hybrid train --recipe recall`: reproduce the shipped recall model (train, save, evaluate)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

RECIPES = ("recall",)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `train` subcommand on the CLI's subparsers."""
    p = sub.add_parser("train", help="train a DSA model by a recipe (needs optax: the 'train' extra)")
    p.add_argument("--recipe", choices=RECIPES, default="recall", help="what to train (default recall)")
    p.add_argument("--out", default="dsa_recall_model", help="output directory (default dsa_recall_model)")
    p.add_argument("--dense-steps", type=int, help="override the recipe's dense steps")
    p.add_argument("--warmup-steps", type=int, help="override the recipe's indexer warm-up steps")
    p.add_argument("--sparse-steps", type=int, help="override the recipe's sparse steps (default 0)")
    p.add_argument("--seed", type=int, help="override the recipe's seed")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation table")
    p.add_argument(
        "--eval-lengths", default="128,256,512,1024,2048", help="contexts of the evaluation table (comma separated)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dsa_hybrid.train.recipes import RecallRecipe, run_recall_recipe

    recipe = RecallRecipe()
    overrides = {
        "dense_steps": args.dense_steps, "warmup_steps": args.warmup_steps, "sparse_steps": args.sparse_steps,
        "seed": args.seed,
    }  # fmt: skip
    for name, value in overrides.items():
        if value is not None:
            if value < 0:
                raise SystemExit(f"dsa-hybrid train: --{name.replace('_', '-')} must be >= 0, got {value}")
            recipe = dataclasses.replace(recipe, **{name: value})
    try:
        lengths = tuple(int(x) for x in args.eval_lengths.split(",") if x)
    except ValueError:
        raise SystemExit(f"dsa-hybrid train: --eval-lengths: expected integers, got {args.eval_lengths!r}") from None
    summary = run_recall_recipe(args.out, recipe, evaluate=not args.no_eval, lengths=lengths)
    print(f"trained in {summary['train_seconds']} s; weights, config.json, losses.png in {args.out}")
    for stage, parts in summary["final"].items():
        print(f"  {stage}: " + ", ".join(f"{n} {v:.4f}" for n, v in parts.items()))
    if "table" in summary:
        print(summary["table"])
    sys.stdout.flush()
    return 0

"""The shipped recipe `recall`: a small DSA model trained here on key-value recall (`tasks.RecallTask`),
its evaluation table, and saving / loading it as a Hugging Face style checkpoint directory.

`train_recall` trains the model dense from scratch, then warms up its indexer (the paper's dense
warm-up), optionally trains sparse; `evaluate_recall` measures, at several contexts, the accuracy of
dense attention, of DSA at `k = L/8 … L/64`, of `k` random positions and of a sliding window of `k`, the
attention mass the indexer's selection keeps and its recall of dense attention's top-`k`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from dsa_hybrid.models.causal_lm import ModelParams
from dsa_hybrid.models.checkpoint import write_safetensors
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.ops.checks import check_int, check_real
from dsa_hybrid.train.forward import forward_train
from dsa_hybrid.train.loop import History, plot_history, train
from dsa_hybrid.train.tasks import RecallTask

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
RECALL_TASK = RecallTask(n_keys=8, n_values=8, n_filler=32, pairs=8, queries=8)
TASK_FILE = "task.json"


def recall_config(task: RecallTask = RECALL_TASK) -> DSAConfig:
    """The recall model: 2 layers, hidden 128, 4 heads, latent 64 + rope 16, an indexer of 4 × 32."""
    return DSAConfig.tiny().replace(
        hidden_size=128, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, index_n_heads=4, index_head_dim=32, index_topk=64,
        num_hidden_layers=2, vocab_size=task.vocab_size, intermediate_size=256, first_k_dense_replace=2,
        n_routed_experts=0, max_position_embeddings=16384, rope_scaling=None,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RecallRecipe:
    """What `train_recall` does (the defaults are the shipped run)."""

    seed: int = 0
    batch: int = 16
    lengths: tuple[int, ...] = (64, 128)  # training contexts of the dense stage's phases (then the last)
    dense_steps: int = 1500
    dense_lr: float = 3e-3
    warmup_steps: int = 200
    warmup_lr: float = 1e-3
    sparse_steps: int = 0
    sparse_lr: float = 3e-4
    sparse_k: int = 16

    def __post_init__(self) -> None:
        check_int("RecallRecipe.seed", self.seed, 0, 2**32 - 1)
        check_int("RecallRecipe.batch", self.batch, 1, 2**16)
        if not isinstance(self.lengths, tuple) or not self.lengths:
            raise ValueError(f"RecallRecipe.lengths: expected a non-empty tuple, got {self.lengths!r}")
        for j, n in enumerate(self.lengths):
            check_int(f"RecallRecipe.lengths[{j}]", n, RECALL_TASK.min_length(), 2**17)
        for name in ("dense_steps", "warmup_steps", "sparse_steps"):
            check_int(f"RecallRecipe.{name}", getattr(self, name), 0, 10**7)
        for name in ("dense_lr", "warmup_lr", "sparse_lr"):
            check_real(f"RecallRecipe.{name}", getattr(self, name), 0.0, open_low=True)
        check_int("RecallRecipe.sparse_k", self.sparse_k, 1)


def train_recall(
    recipe: RecallRecipe = RecallRecipe(), *, progress: bool = True, stream: TextIO | None = None
) -> tuple[ModelParams, DSAConfig, list[History]]:
    """Train the recall model from scratch (stages "dense", "warmup", then "sparse" if asked).
    `TypeError` if `recipe` is not a `RecallRecipe` (its fields are checked when it is made)."""
    if not isinstance(recipe, RecallRecipe):
        raise TypeError(f"recipe: expected a RecallRecipe, got {type(recipe).__name__}")
    task, cfg = RECALL_TASK, recall_config()
    params = ModelParams.random(cfg, seed=recipe.seed, std=0.02)
    rng = np.random.default_rng(recipe.seed)

    def curriculum(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The dense stage goes through `recipe.lengths` in equal consecutive phases (short first)."""
        phase = min(len(recipe.lengths) - 1, i * len(recipe.lengths) // max(1, recipe.dense_steps))
        return task.batch(rng, recipe.batch, recipe.lengths[phase])

    def longest(_i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return task.batch(rng, recipe.batch, recipe.lengths[-1])

    kw: dict[str, Any] = dict(progress=progress, stream=stream)
    params, h_dense = train(
        params, cfg, curriculum, stage="dense", steps=recipe.dense_steps, learning_rate=recipe.dense_lr, **kw
    )
    params, h_warm = train(
        params, cfg, longest, stage="warmup", steps=recipe.warmup_steps, learning_rate=recipe.warmup_lr, **kw
    )
    histories = [h_dense, h_warm]
    if recipe.sparse_steps:
        params, h_sparse = train(
            params, cfg, longest, stage="sparse", steps=recipe.sparse_steps, learning_rate=recipe.sparse_lr,
            k=recipe.sparse_k, **kw,
        )  # fmt: skip
        histories.append(h_sparse)
    return params, cfg, histories


def save_model(params: ModelParams, cfg: DSAConfig, directory: str | Path, task: RecallTask | None = None) -> Path:
    """Write `model.safetensors` + `config.json` (+ `task.json`) into `directory`: a checkpoint that
    `DSAConfig.from_hf_config` and `ModelParams.from_checkpoint` (and so `dsa-hybrid demo --checkpoint`)
    read."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_safetensors(
        d / "model.safetensors", {k: np.ascontiguousarray(v, np.float32) for k, v in params.state_dict().items()}
    )
    (d / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=1) + "\n")
    if task is not None:
        (d / TASK_FILE).write_text(json.dumps(dataclasses.asdict(task), indent=1) + "\n")
    return d


def load_model(directory: str | Path | None = None) -> tuple[ModelParams, DSAConfig, RecallTask]:
    """The model saved in `directory` (default: the shipped recall weights), float32, and its task.
    `FileNotFoundError` for a directory without `config.json`; a hostile `task.json` is a `ValueError`
    naming the file (the config and weights are checked by `DSAConfig` and the checkpoint reader)."""
    d = WEIGHTS_DIR / "recall" if directory is None else Path(directory)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"directory: {str(d)!r} holds no config.json")
    task_file = d / TASK_FILE
    task = RECALL_TASK
    if task_file.exists():
        try:
            fields = json.loads(task_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{task_file}: not valid JSON ({e})") from None
        known = {f.name for f in dataclasses.fields(RecallTask)}
        if not isinstance(fields, dict) or set(fields) - known:
            raise ValueError(f"{task_file}: expected an object with fields of {sorted(known)}")
        try:
            task = RecallTask(**fields)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{task_file}: {e}") from None
    cfg = DSAConfig.from_hf_config(d / "config.json")
    if cfg.vocab_size < task.vocab_size:
        raise ValueError(f"{task_file}: the task needs {task.vocab_size} tokens, the model has {cfg.vocab_size}")
    params = ModelParams.from_checkpoint(d, cfg, weights="float32")
    return params, cfg, task


@dataclasses.dataclass(frozen=True)
class EvalRow:
    """One context length of the evaluation table: accuracies (fraction of answers right) and, per `k`,
    the attention mass the indexer's selection keeps and its recall of dense attention's top-`k`
    (at the scored rows, mean over layers)."""

    length: int
    queries: int
    dense: float
    dsa: dict[int, float]
    random: dict[int, float]
    window: dict[int, float]
    mass: dict[int, float]
    recall: dict[int, float]


def _accuracy(logits: jax.Array, targets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    pred = np.asarray(jnp.argmax(logits[:, rows], axis=-1))
    return pred == targets[:, rows]


def evaluate_recall(
    params: ModelParams,
    cfg: DSAConfig,
    task: RecallTask,
    lengths: tuple[int, ...] = (128, 256, 512, 1024, 2048),
    fractions: tuple[int, ...] = (8, 16, 32, 64),
    *,
    sequences: int = 16,
    batch: int = 8,
    seed: int = 1234,
    stream: TextIO | None = None,
) -> list[EvalRow]:
    """The evaluation table on a fixed set of `sequences` sequences per length (seeded). `ValueError` for
    no lengths, a length below `task.min_length()`, fractions or sizes < 1 (before any forward)."""
    if not lengths or not fractions:
        raise ValueError("lengths, fractions: expected at least one of each")
    for j, n in enumerate(lengths):
        check_int(f"lengths[{j}]", n, task.min_length())
    for j, f in enumerate(fractions):
        check_int(f"fractions[{j}]", f, 1)
    sequences = check_int("sequences", sequences, 1)
    batch = check_int("batch", batch, 1)
    check_int("seed", seed, 0)
    rows_out = []
    for L in lengths:
        rng = np.random.default_rng(seed + L)
        tokens, targets, _ = task.batch(rng, sequences, L)
        rows = task.ask_positions(L)
        ks = [max(1, L // f) for f in fractions]
        hits: dict[str, list[np.ndarray]] = {}
        mass: dict[int, list[float]] = {k: [] for k in ks}
        recall: dict[int, list[float]] = {k: [] for k in ks}
        t0 = time.perf_counter()
        for b0 in range(0, sequences, batch):
            tok = jnp.asarray(tokens[b0 : b0 + batch])
            tgt = targets[b0 : b0 + batch]
            logits, aux = _eval_forward(params, cfg, tok, jnp.asarray(rows), "dense", 1)
            hits.setdefault("dense", []).append(_accuracy(logits, tgt, rows))
            for a in aux:
                if a.scores is None:
                    continue
                target, scores = np.asarray(a.target), np.asarray(a.scores)  # [B, R, L]
                for k in ks:
                    top_i = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
                    top_p = np.argsort(-target, axis=-1, kind="stable")[..., :k]
                    mass[k].append(float(np.take_along_axis(target, top_i, -1).sum(-1).mean()))
                    inter = [
                        len(np.intersect1d(x, y))
                        for x, y in zip(top_i.reshape(-1, k), top_p.reshape(-1, k), strict=True)
                    ]
                    recall[k].append(float(np.mean(inter)) / k)
            for k in ks:
                for mode in ("sparse", "random", "window"):
                    logits, _ = _eval_forward(params, cfg, tok, jnp.asarray(rows), mode, k)
                    hits.setdefault(f"{mode}{k}", []).append(_accuracy(logits, tgt, rows))
        acc = {n: float(np.concatenate(v).mean()) for n, v in hits.items()}
        row = EvalRow(
            L, sequences * len(rows), acc["dense"], {k: acc[f"sparse{k}"] for k in ks},
            {k: acc[f"random{k}"] for k in ks}, {k: acc[f"window{k}"] for k in ks},
            {k: float(np.mean(v)) for k, v in mass.items()}, {k: float(np.mean(v)) for k, v in recall.items()},
        )  # fmt: skip
        rows_out.append(row)
        if stream is not None:
            stream.write(f"  evaluated L={L} in {time.perf_counter() - t0:.0f} s\n")
            stream.flush()
    return rows_out


def _eval_forward_impl(params, cfg, tokens, rows, mode, k):
    return forward_train(params, cfg, tokens, mode=mode, k=k, aux_rows=rows, query_block=512)


_eval_forward = jax.jit(_eval_forward_impl, static_argnames=("cfg", "mode", "k"))


def format_table(rows: list[EvalRow], fractions: tuple[int, ...] = (8, 16, 32, 64)) -> str:
    """The evaluation as a Markdown table: one line per (context, k)."""
    lines = [
        "| context L | answers | k | dense | DSA | random k | window k | mass kept | recall of dense top-k |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for f, k in zip(fractions, sorted(r.dsa, reverse=True), strict=False):
            lines.append(
                f"| {r.length} | {r.queries} | {k} (L/{f}) | {r.dense:.3f} | {r.dsa[k]:.3f} | {r.random[k]:.3f} | "
                f"{r.window[k]:.3f} | {r.mass[k]:.3f} | {r.recall[k]:.3f} |"
            )
    return "\n".join(lines)


def run_recall_recipe(
    out_dir: str | Path, recipe: RecallRecipe = RecallRecipe(), *, evaluate: bool = True,
    lengths: tuple[int, ...] = (128, 256, 512, 1024, 2048), stream: TextIO | None = None,
) -> dict[str, Any]:  # fmt: skip
    """`dsa-hybrid train --recipe recall`: train, save the checkpoint and the loss curves
    (`losses.png`), evaluate and write `eval.md`. Returns a summary dict. An `out_dir` that is a file,
    or whose parent does not exist, is refused (`FileExistsError` / `FileNotFoundError`) before training;
    so are bad evaluation `lengths` (`ValueError`)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir: {str(out)!r} is a file")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"out_dir: no such parent directory {str(out.parent)!r}")
    if not isinstance(recipe, RecallRecipe):
        raise TypeError(f"recipe: expected a RecallRecipe, got {type(recipe).__name__}")
    if evaluate:
        if not lengths:
            raise ValueError("lengths: expected at least one evaluation length")
        for j, n in enumerate(lengths):
            check_int(f"lengths[{j}]", n, RECALL_TASK.min_length())
    stream = sys.stderr if stream is None else stream
    t0 = time.perf_counter()
    params, cfg, histories = train_recall(recipe, stream=stream)
    train_s = time.perf_counter() - t0
    d = save_model(params, cfg, out_dir, RECALL_TASK)
    plotted = plot_history(histories, str(d / "losses.png"))
    summary: dict[str, Any] = {
        "train_seconds": round(train_s, 1), "recipe": dataclasses.asdict(recipe),
        "final": {h.stage: {n: h.last(n, 5) for n in h.losses} for h in histories}, "plot": plotted,
    }  # fmt: skip
    if evaluate:
        rows = evaluate_recall(params, cfg, RECALL_TASK, lengths, stream=stream)
        table = format_table(rows)
        (d / "eval.md").write_text(table + "\n")
        summary["table"] = table
    (d / "train_summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary

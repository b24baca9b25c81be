"""The training loop: the three stages of turning a (dense) MLA model into a DSA model (dsa.md §7).

- `"dense"`: the language-model loss under dense attention, every weight but the indexer's trained (for
  training a model from scratch, before DSA; not a stage of the paper's recipe, which starts from a
  trained dense model).
- `"warmup"`: the paper's dense warm-up. The main model is frozen and attention dense; only the
  indexer learns, on `Σ_t KL(P[t] ‖ softmax(I[t]))` with `P` the main attention summed over heads and
  L1-normalised (`losses.indexer_kl_loss`).
- `"sparse"`: the paper's sparse training. Attention runs over the indexer's top-`k`; the main model
  learns from the LM loss, the indexer from the KL divergence restricted to the selected set, its input
  detached from the main model's graph (so neither loss reaches the other's weights).

Optimiser: optax AdamW (the `train` extra), gradient clipping at norm 1, a linear warm-up then cosine
decay. `train` shows a progress bar on stderr and returns the loss history; `plot_history` writes the
curves as a PNG (matplotlib optional).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from dsa_hybrid.layers.dsa_attention import INDEXER_PARAMS
from dsa_hybrid.models.causal_lm import ModelParams
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.train.forward import forward_train
from dsa_hybrid.train.losses import indexer_kl_loss, lm_loss

Stage = Literal["dense", "warmup", "sparse"]
STAGES = ("dense", "warmup", "sparse")
Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # tokens, targets, weights: [B, L] each


def indexer_mask(params: ModelParams) -> ModelParams:
    """A pytree like `params` with True at the indexer's weights (`INDEXER_PARAMS`), False elsewhere."""
    mask = jax.tree_util.tree_map(lambda _: False, params)
    blocks = tuple(
        dataclasses.replace(
            m, attn=dataclasses.replace(m.attn, **{n: True for n in INDEXER_PARAMS if getattr(b.attn, n) is not None})
        )
        for m, b in zip(mask.blocks, params.blocks, strict=True)
    )
    return dataclasses.replace(mask, blocks=blocks)


def _split(params: Any, mask: Any, want: bool) -> Any:
    return jax.tree_util.tree_map(lambda p, m: p if m == want else None, params, mask)


def _merge(a: Any, b: Any) -> Any:
    return jax.tree_util.tree_map(lambda x, y: y if x is None else x, a, b, is_leaf=lambda x: x is None)


def stage_loss(
    params: ModelParams, cfg: DSAConfig, batch: tuple[jax.Array, jax.Array, jax.Array], stage: Stage, k: int
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss a stage minimises and its parts (`lm`, `kl`: mean per sequence, summed over layers)."""
    tokens, targets, weights = batch
    if stage == "dense":
        logits, _ = forward_train(params, cfg, tokens, mode="dense")
        lm = lm_loss(logits, targets, weights)
        return lm, {"lm": lm}
    logits, aux = forward_train(params, cfg, tokens, mode="dense" if stage == "warmup" else "sparse", k=k)
    B, L = tokens.shape
    kl = jnp.zeros((), jnp.float32)
    for a in aux:
        if a.scores is None:
            continue
        target = jax.lax.stop_gradient(a.target)
        sel = a.selected
        # Mean over the batch of Σ_t KL(P[t] ‖ softmax(I[t])), divided by L for a per-token figure.
        per_seq = (
            jax.vmap(lambda p, s, q: indexer_kl_loss(p, s, q))(target, a.scores, sel)
            if sel is not None
            else (jax.vmap(lambda p, s: indexer_kl_loss(p, s))(target, a.scores))
        )
        kl = kl + per_seq.mean() / L
    if stage == "warmup":
        return kl, {"kl": kl}
    lm = lm_loss(logits, targets, weights)
    return lm + kl, {"lm": lm, "kl": kl}


@dataclasses.dataclass
class History:
    """Per logged step: the step number, each loss part, and wall seconds since the start."""

    stage: str
    steps: list[int] = dataclasses.field(default_factory=list)
    losses: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    seconds: list[float] = dataclasses.field(default_factory=list)

    def last(self, name: str, n: int = 1) -> float:
        """Mean of the last `n` logged values of `name`."""
        v = self.losses[name][-n:]
        return float(np.mean(v))


class ProgressBar:
    """A one-line progress bar on `stream` (rewritten in place on a terminal, else a line each 10 %)."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.next_line = 0.1

    def update(self, done: int, info: str) -> None:
        if not self.enabled:
            return
        frac = done / max(1, self.total)
        rate = done / max(1e-9, time.perf_counter() - self.start)
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        line = f"{self.label} [{bar}] {done}/{self.total} {rate:.1f} it/s {info}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done >= self.total else ""))
        elif frac >= self.next_line or done >= self.total:
            self.stream.write(line + "\n")
            self.next_line = math.floor(frac * 10 + 1) / 10
        self.stream.flush()


def make_optimizer(learning_rate: float, steps: int, warmup_steps: int | None = None, weight_decay: float = 0.0):
    """optax AdamW with global-norm clipping at 1 and a linear warm-up + cosine decay schedule."""
    try:
        import optax
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("dsa_hybrid.train needs optax: pip install 'dsa_hybrid[train]'") from e
    warm = max(1, steps // 20) if warmup_steps is None else max(1, warmup_steps)
    sched = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warm, max(steps, warm + 1), learning_rate * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=weight_decay))


def train(
    params: ModelParams,
    cfg: DSAConfig,
    batches: Iterator[Batch] | Callable[[int], Batch],
    *,
    stage: Stage,
    steps: int,
    learning_rate: float = 1e-3,
    k: int | None = None,
    log_every: int = 10,
    progress: bool = True,
    stream: TextIO | None = None,
) -> tuple[ModelParams, History]:
    """Train `params` for `steps` optimiser steps of `stage` (module docstring) on `batches`.

    Args:
        params: float32 model parameters (`ModelParams`); returned updated, the input is not changed.
        cfg: the model's config.
        batches: an iterator of `(tokens, targets, weights)` numpy batches, each `[B, L]` (int32, int32,
            float32: the LM loss is the weighted mean next-token cross entropy), or a function of the
            step number returning one.
        stage: "dense", "warmup" or "sparse". Weights trained: "dense" all but the indexer, "warmup" the
            indexer only, "sparse" all (the LM loss reaches only the main model, the KL loss only the
            indexer).
        steps, learning_rate: optimiser steps and peak learning rate (AdamW, warm-up + cosine).
        k: top-k of the sparse stage (default `cfg.index_topk`).
        log_every: history (and progress bar) every this many steps.
        progress: show the progress bar (stderr, or `stream`).

    Returns `(params, history)`.
    """
    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {STAGES}, got {stage!r}")
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    k = cfg.index_topk if k is None else int(k)
    mask = indexer_mask(params)
    if stage == "dense":
        mask = jax.tree_util.tree_map(lambda m: not m, mask)
    elif stage == "sparse":
        mask = jax.tree_util.tree_map(lambda _: True, mask)
    trainable, frozen = _split(params, mask, True), _split(params, mask, False)
    opt = make_optimizer(learning_rate, steps)
    opt_state = opt.init(trainable)

    def loss_fn(tr, fr, batch):
        return stage_loss(_merge(tr, fr), cfg, batch, stage, k)

    @jax.jit
    def step(tr, fr, state, batch):
        import optax

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(tr, fr, batch)
        updates, state = opt.update(grads, state, tr)
        return optax.apply_updates(tr, updates), state, parts

    next_batch = batches if callable(batches) else (lambda _i, it=batches: next(it))
    history = History(stage)
    bar = ProgressBar(steps, f"train {stage}", stream, progress)
    start = time.perf_counter()
    acc: dict[str, list[float]] = {}
    for i in range(steps):
        batch = tuple(jnp.asarray(a) for a in next_batch(i))
        trainable, opt_state, parts = step(trainable, frozen, opt_state, batch)
        for name, v in parts.items():
            acc.setdefault(name, []).append(float(v))
        if (i + 1) % log_every == 0 or i + 1 == steps:
            history.steps.append(i + 1)
            history.seconds.append(time.perf_counter() - start)
            for name, vs in acc.items():
                history.losses.setdefault(name, []).append(float(np.mean(vs)))
            bar.update(i + 1, " ".join(f"{n} {history.losses[n][-1]:.4f}" for n in acc))
            acc = {}
    return _merge(trainable, frozen), history


def plot_history(histories: list[History], path: str) -> bool:
    """Write the loss curves of `histories` (one panel per stage) as a PNG at `path`. Returns False (and
    writes nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(histories), figsize=(4.5 * len(histories), 3.4), squeeze=False)
    for ax, h in zip(axes[0], histories, strict=True):
        for name, vs in h.losses.items():
            ax.plot(h.steps, vs, label=name)
        ax.set_title(f"stage {h.stage}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

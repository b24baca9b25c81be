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
import os
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
from dsa_hybrid.ops.checks import check_choice, check_int, check_real
from dsa_hybrid.train.forward import forward_train
from dsa_hybrid.train.losses import indexer_kl_loss, lm_loss

Stage = Literal["dense", "warmup", "sparse"]
STAGES = ("dense", "warmup", "sparse")
Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # tokens, targets, weights: [B, L] each


def indexer_mask(params: ModelParams) -> ModelParams:
    """A pytree like `params` with True at the indexer's weights (`INDEXER_PARAMS`), False elsewhere.
    `TypeError` if `params` is not a `ModelParams`."""
    if not isinstance(params, ModelParams):
        raise TypeError(f"params: expected ModelParams, got {type(params).__name__}")
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
    """The loss a stage minimises and its parts (`lm`, `kl`: mean per sequence, summed over layers).
    `ValueError` for an unknown `stage` or a `batch` that is not three arrays; `k` as in `forward_train`."""
    check_choice("stage", stage, STAGES)
    if not isinstance(batch, (tuple, list)) or len(batch) != 3:
        raise ValueError("batch: expected (tokens, targets, weights)")
    k = check_int("k", k, 1)
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
        """Mean of the last `n` logged values of `name` (`KeyError` for a loss never logged, `ValueError`
        for `n` < 1)."""
        n = check_int("n", n, 1)
        if name not in self.losses or not self.losses[name]:
            raise KeyError(f"name: no loss {name!r} logged (have {sorted(self.losses)})")
        v = self.losses[name][-n:]
        return float(np.mean(v))


class ProgressBar:
    """A one-line progress bar on `stream` (rewritten in place on a terminal, else a line each 10 %)."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, enabled: bool = True) -> None:
        total = check_int("total", total, 0)
        if not isinstance(label, str):
            raise TypeError(f"label: expected a str, got {type(label).__name__}")
        if stream is not None and not callable(getattr(stream, "write", None)):
            raise TypeError(f"stream: expected a text stream, got {type(stream).__name__}")
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
    learning_rate = check_real("learning_rate", learning_rate, 0.0, open_low=True)
    steps = check_int("steps", steps, 1)
    warmup_steps = None if warmup_steps is None else check_int("warmup_steps", warmup_steps, 0)
    weight_decay = check_real("weight_decay", weight_decay, 0.0)
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

    Raises before the first step (docs/errors.md): `TypeError` for `params` not a `ModelParams`, `cfg`
    not a `DSAConfig`, `batches` neither an iterator nor callable, a bool / float `steps`, `k`,
    `log_every`, a non-number `learning_rate`; `ValueError` for an unknown `stage`, `steps`, `k` or
    `log_every` < 1, a `learning_rate` that is not finite and > 0. A batch of the wrong shape or dtype
    raises `ValueError` naming its step (`batches[i]`) before that step runs; the input params are never
    changed.
    """
    if not isinstance(params, ModelParams):
        raise TypeError(f"params: expected ModelParams, got {type(params).__name__}")
    if not isinstance(cfg, DSAConfig):
        raise TypeError(f"cfg: expected a DSAConfig, got {type(cfg).__name__}")
    check_choice("stage", stage, STAGES)
    steps = check_int("steps", steps, 1)
    learning_rate = check_real("learning_rate", learning_rate, 0.0, open_low=True)
    k = cfg.index_topk if k is None else check_int("k", k, 1)
    log_every = check_int("log_every", log_every, 1)
    if not callable(batches) and not hasattr(batches, "__next__"):
        raise TypeError(f"batches: expected an iterator or a function of the step, got {type(batches).__name__}")
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
        batch = _checked_batch(next_batch(i), i, cfg.vocab_size)
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


def _checked_batch(batch: Any, i: int, vocab: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Step `i`'s batch as device arrays, checked: `(tokens, targets, weights)` of one shape `[B, L]`,
    integer ids in `[0, vocab)`, finite weights (`ValueError` naming `batches[i]` otherwise)."""
    where = f"batches[{i}]"
    if not isinstance(batch, (tuple, list)) or len(batch) != 3:
        raise ValueError(f"{where}: expected (tokens, targets, weights), got {type(batch).__name__}")
    try:
        arrays = [np.asarray(a) for a in batch]
    except Exception as e:  # noqa: BLE001 - ragged lists and the like, named
        raise ValueError(f"{where}: not arrays ({e})") from None
    tokens, targets, weights = arrays
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"{where}: tokens: expected [B, L] with B, L >= 1, got {list(tokens.shape)}")
    for name, a in (("targets", targets), ("weights", weights)):
        if a.shape != tokens.shape:
            raise ValueError(f"{where}: {name}: expected {list(tokens.shape)}, got {list(a.shape)}")
    for name, a in (("tokens", tokens), ("targets", targets)):
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{where}: {name}: expected integers, got {a.dtype}")
        if a.min() < 0 or a.max() >= vocab:
            raise ValueError(f"{where}: {name}: ids must lie in [0, {vocab}), got min {a.min()}, max {a.max()}")
    if not np.issubdtype(weights.dtype, np.number) or np.issubdtype(weights.dtype, np.complexfloating):
        raise ValueError(f"{where}: weights: expected real numbers, got {weights.dtype}")
    if not np.isfinite(weights).all():
        raise ValueError(f"{where}: weights: must be finite")
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(targets, jnp.int32), jnp.asarray(weights, jnp.float32)


def plot_history(histories: list[History], path: str) -> bool:
    """Write the loss curves of `histories` (one panel per stage) as a PNG at `path`. Returns False (and
    writes nothing) when matplotlib is not installed. `ValueError` for no histories, `TypeError` for an
    entry that is not a `History`, `FileNotFoundError` when `path`'s directory does not exist (checked
    before matplotlib is imported)."""
    if not isinstance(histories, (list, tuple)) or not histories:
        raise ValueError("histories: expected a non-empty list of History")
    for j, h in enumerate(histories):
        if not isinstance(h, History):
            raise TypeError(f"histories[{j}]: expected a History, got {type(h).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a path, got {type(path).__name__}")
    parent = os.path.dirname(os.fspath(path)) or "."
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"path: no such directory {parent!r}")
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

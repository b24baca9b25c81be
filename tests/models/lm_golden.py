"""Helpers for the language-model goldens of `tests/golden/make_golden.py` (not a test module): load one,
run its prompt layer by layer, and compare top-k selections with transformers' sets.

Each golden's `io.npz` holds `prompt [30]`, transformers' `logits [30, vocab]`, `layer_out [L, 30, hidden]`
(each decoder layer's output), `topk [L, 30, K]` (each layer's selection; a GLM-5 "shared" layer's is the
previous full layer's) and `generated` (greedy tokens; fewer than 12 when transformers stopped at EOS)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dsa_hybrid import DSAConfig
from dsa_hybrid.layers.dsa_attention import DSACaches, dsa_attention
from dsa_hybrid.models.causal_lm import (
    BlockParams,
    ModelParams,
    WeightsMode,
    create_caches,
    embed,
    forward,
    lm_head,
    pre_norm,
    residual_mlp,
)

GOLDEN = Path(__file__).parents[1] / "golden"


def load(name: str, weights: WeightsMode = "auto") -> tuple[DSAConfig, ModelParams, dict[str, np.ndarray]]:
    """Golden `name`'s config, its parameters loaded with `weights`, and its `io.npz` (a fresh dict of
    read-only arrays). Loaded once per process and `(name, weights)`: the parameters are immutable."""
    cfg, params, io = _load(name, weights)
    return cfg, params, dict(io)


@functools.cache
def _load(name: str, weights: WeightsMode) -> tuple[DSAConfig, ModelParams, dict[str, np.ndarray]]:
    d = GOLDEN / name
    cfg = DSAConfig.from_hf_config(d)
    io = dict(np.load(d / "io.npz"))
    for a in io.values():
        a.flags.writeable = False
    return cfg, ModelParams.from_checkpoint(d, cfg, weights=weights), io


PAGE = 8  # tokens per cache page; a golden's prompt (30) plus its 12 greedy tokens fit in 6 pages
# XLA's CPU backend at optimization level 0: these tiny shapes run in milliseconds either way, and compiling
# takes about half the time (measured: one MoE layer 6.7 s -> 3.2 s of CPU, outputs within 1e-6, the
# same selections). The goldens' time is almost all compiling.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def rows(n: int, pages: int = 4) -> tuple[jax.Array, jax.Array]:
    """Positions = slots `[n]` and block tables `[n, pages]` of one sequence in `pages` pages of 8."""
    pos = jnp.arange(n, dtype=jnp.int32)
    return pos, jnp.tile(jnp.arange(pages, dtype=jnp.int32), (n, 1))


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",), compiler_options=FAST_COMPILE)
def layer_step(
    blk: BlockParams,
    cfg: DSAConfig,
    x: jax.Array,
    pos: jax.Array,
    table: jax.Array,
    cache: DSACaches,
    shared_topk: jax.Array | None,
) -> tuple[jax.Array, DSACaches, jax.Array]:
    """One decoder layer as `forward` runs it, on its own: `(output [T, hidden], updated cache, top-k [T, K]
    int32)` for the layer input `x [T, hidden]` (rows at positions = slots `pos [T]`, block tables
    `table [T, pages]`; `shared_topk` a GLM-5 "shared" layer's borrowed selection, else None). Jitted once
    per layer kind (dense / MoE block, full / shared indexer), weight format and shape: the layers of a
    model and the goldens of one shape share the compiled programs, where a whole-model jit would compile
    every layer again for each model."""
    h, cache, topk = dsa_attention(
        blk.attn, cfg, pre_norm(blk, cfg, x), pos, pos, table, cache, shared_topk=shared_topk, backend="xla"
    )
    return residual_mlp(blk, cfg, x, h), cache, topk


def prompt_layers(
    params: ModelParams, cfg: DSAConfig, tokens: jax.Array, caches: tuple[DSACaches, ...], pages: int = 4
) -> tuple[jax.Array, jax.Array, jax.Array, tuple[DSACaches, ...]]:
    """`forward` over a prompt (≤ 8 · `pages` tokens, from position 0), layer by layer, keeping every
    layer's output and selection: `(logits [T, vocab], layer outputs [L, T, hidden], top-k [L, T, K] int32,
    −1 where a row has fewer than K visible tokens, the updated caches)`. `caches` are donated."""
    pos, table = rows(tokens.shape[0], pages)
    x = embed(params, tokens)
    outs, sels, new_caches = [], [], []
    topk: jax.Array | None = None
    for i, (blk, cache) in enumerate(zip(params.blocks, caches, strict=True)):
        shared = topk if cfg.layer_indexer_type(i) == "shared" else None
        x, cache, topk = layer_step(blk, cfg, x, pos, table, cache, shared)
        outs.append(x)
        sels.append(topk)
        new_caches.append(cache)
    return lm_head(params, cfg, x), jnp.stack(outs), jnp.stack(sels), tuple(new_caches)


# The model's own `forward` under the decode step's jit (as `forward_jit`), compiled as above.
forward_step = jax.jit(
    forward, static_argnames=("cfg", "backend"), donate_argnames=("caches",), compiler_options=FAST_COMPILE
)


@functools.partial(jax.jit, static_argnames=("cfg",), compiler_options=FAST_COMPILE)
def layer_topk(blk: BlockParams, cfg: DSAConfig, x: jax.Array, cache: DSACaches) -> jax.Array:
    """One full layer's selection `[T, K]` for the layer input `x [T, hidden]` (before its input norm)."""
    pos, table = rows(x.shape[0])
    return dsa_attention(blk.attn, cfg, pre_norm(blk, cfg, x), pos, pos, table, cache, backend="xla")[2]


def recall(ours: np.ndarray, theirs: np.ndarray, k: int) -> float:
    """Mean of |ours[t] ∩ theirs[t]| / k over the rows `t ≥ k` (those whose selection drops tokens)."""
    return float(np.mean([len(set(ours[t].tolist()) & set(theirs[t].tolist())) / k for t in range(k, len(ours))]))


def fp8_indexer_recall(params: ModelParams, cfg: DSAConfig, io: dict[str, np.ndarray]) -> list[float]:
    """The deployed FP8 indexer's recall of transformers' sets, per layer that runs an indexer, each layer
    fed transformers' own input to it (so earlier layers' differences do not carry over)."""
    inputs = [np.asarray(embed(params, jnp.asarray(io["prompt"])))] + list(io["layer_out"][:-1])
    out = []
    for i, blk in enumerate(params.blocks):
        if cfg.layer_indexer_type(i) == "shared":
            continue
        (cache,) = create_caches(cfg.replace(num_hidden_layers=1), 4, 8, latent_kind="f32", indexer="fp8")
        # The MLP weights do not enter: pass the block with only its input norm, so that dense and MoE
        # blocks share one compiled program.
        attn_only = dataclasses.replace(blk, gate=None, up=None, down=None, moe=None)
        ours = layer_topk(attn_only, cfg, jnp.asarray(inputs[i]), cache)
        out.append(recall(np.asarray(ours), io["topk"][i], cfg.index_topk))
    return out


def check_prompt_and_greedy(params: ModelParams, cfg: DSAConfig, io: dict[str, np.ndarray]) -> None:
    """With the exact indexer: every layer's output and the logits within float32 tolerance of
    transformers', every layer's top-k set equal to transformers' (rows with K visible tokens or more;
    shorter rows select their whole prefix), and the greedy tokens identical: the prompt's caches, as the
    layer-by-layer run wrote them, continued one token per step by the model's own `forward` (the decode
    step `generate_greedy` runs, jitted as `forward_jit` is: one compiled program for all steps), argmax each step."""
    k, n, new = cfg.index_topk, int(io["prompt"].size), 12
    pages = -(-(n + new) // PAGE)
    caches = create_caches(cfg, pages, PAGE, latent_kind="f32", indexer="exact")
    logits_j, outs_j, sels_j, caches = prompt_layers(params, cfg, jnp.asarray(io["prompt"], jnp.int32), caches, pages)
    logits, outs, sels = np.asarray(logits_j), np.asarray(outs_j), np.asarray(sels_j)
    for i in range(cfg.num_hidden_layers):
        ref = io["layer_out"][i]
        np.testing.assert_allclose(outs[i], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=f"layer {i}")
        assert recall(sels[i], io["topk"][i], k) == 1.0, f"layer {i}: top-k sets differ from transformers'"
        for t in range(k):
            assert set(sels[i, t].tolist()) - {-1} == set(range(t + 1)), (i, t)
    np.testing.assert_allclose(logits, io["logits"], rtol=1e-4, atol=1e-4 * np.abs(io["logits"]).max())
    table = jnp.arange(pages, dtype=jnp.int32)[None, :]
    got = [int(np.argmax(logits[-1]))]
    for step in range(1, new):
        p = jnp.array([n + step - 1], jnp.int32)
        step_logits, caches = forward_step(params, cfg, jnp.array([got[-1]], jnp.int32), p, p, table, caches, "xla")
        got.append(int(jnp.argmax(step_logits[-1])))
    want = io["generated"].tolist()
    # transformers stops at EOS (kept as the last token); the tokens up to there must agree.
    assert len(want) == new or want[-1] in cfg.eos_token_id, want
    assert got[: len(want)] == want

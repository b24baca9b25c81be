"""A pure, cache-free, differentiable full-sequence forward of the package's causal LM, for training.

Built from the public pieces the serving forward uses (`layers.dsa_attention.project`,
`models.causal_lm.embed`, `pre_norm`, `residual_mlp`, `lm_head`), so a model trained here computes what
the Engine serves. Per layer the attention runs one of:

- `"dense"`: causal attention over every previous position (absorbed MLA form, dsa.md §3);
- `"sparse"`: DSA: attention over the `k` positions of the highest exact (float32) indexer scores
  (dsa.md §4–§5), through `ops.sparse_mla.sparse_attention` (the memory-lean backward);
- `"random"`: `k` visible positions drawn uniformly (a baseline); `"window"`: the last `k` positions.

The indexer's scores are computed from the layer input *detached* from the main model (dsa.md §7): its
loss trains the indexer alone. Every layer also reports, for the rows asked for, what the indexer's
training and the evaluation need (`LayerAux`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from dsa_hybrid.layers.dsa_attention import DSAParams, project
from dsa_hybrid.models.causal_lm import ModelParams, embed, lm_head, pre_norm, residual_mlp
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.ops.checks import check_array, check_choice, check_int, check_int_array, is_concrete
from dsa_hybrid.ops.sparse_mla import sparse_attention

AttentionMode = Literal["dense", "sparse", "random", "window"]
MODES = ("dense", "sparse", "random", "window")
_HIGHEST = jax.lax.Precision.HIGHEST
_NEG = -jnp.inf


@dataclasses.dataclass(frozen=True)
class LayerAux:
    """What one layer reports for the rows `R` asked for (all float32 unless said otherwise):

    - `scores` `[B, R, L]`: exact indexer scores `I` (−inf where not visible), from the detached input;
    - `target` `[B, R, L]`: the main attention's distribution summed over heads and L1-normalised
      (`P`, dsa.md §7), detached — dense attention's in `"dense"` mode, zero outside the selection in the
      other modes;
    - `selected` int32 `[B, R, k]`: the positions attended (−1 padded), None in `"dense"` mode.
    None for every field in a layer without an indexer (GLM-5 "shared")."""

    scores: jax.Array | None
    target: jax.Array | None
    selected: jax.Array | None


jax.tree_util.register_dataclass(LayerAux, data_fields=["scores", "target", "selected"], meta_fields=[])


def indexer_scores(q_idx: jax.Array, w_idx: jax.Array, k_idx: jax.Array, q_pos: jax.Array) -> jax.Array:
    """Exact lightning-indexer scores (dsa.md §4, Eq. 1) of queries at positions `q_pos` `[R]` against
    keys `0 … L−1`: `I[t, s] = Σ_j w[t, j] · ReLU(D_I^(−1/2) · qI[t, j] · kI[s])`, −inf for `s > q_pos[t]`.

    `q_idx` `[R, H_I, D_I]`, `w_idx` `[R, H_I]` (already × `H_I^(−1/2)`, as `project` returns it),
    `k_idx` `[L, D_I]`, float32. Returns `[R, L]`; differentiable (ReLU, weights) in all three.
    Shapes that do not fit raise `ValueError` naming the argument (`TypeError` for a non-array)."""
    for name, a in (("q_idx", q_idx), ("w_idx", w_idx), ("k_idx", k_idx)):
        check_array(name, a)
    check_int_array("q_pos", q_pos, 1)
    if q_idx.ndim != 3:
        raise ValueError(f"q_idx: expected [R, H_I, D_I], got {list(q_idx.shape)}")
    R, H, D = q_idx.shape
    if tuple(w_idx.shape) != (R, H):
        raise ValueError(f"w_idx: expected [{R}, {H}], got {list(w_idx.shape)}")
    if k_idx.ndim != 2 or k_idx.shape[1] != D:
        raise ValueError(f"k_idx: expected [L, {D}], got {list(k_idx.shape)}")
    if q_pos.shape[0] != R:
        raise ValueError(f"q_pos: expected [{R}], got {list(q_pos.shape)}")
    d = q_idx.shape[-1]
    dots = jnp.einsum("rjd,sd->rjs", q_idx, k_idx, precision=_HIGHEST) * d**-0.5
    scores = jnp.einsum("rj,rjs->rs", w_idx, jax.nn.relu(dots), precision=_HIGHEST)
    visible = jnp.arange(k_idx.shape[0])[None, :] <= q_pos[:, None]
    return jnp.where(visible, scores, _NEG)


def _detached_indexer(attn: DSAParams, cfg: DSAConfig, h: jax.Array, positions: jax.Array):
    """The indexer's projections from the layer input and main weights detached (dsa.md §7)."""
    sg = jax.lax.stop_gradient
    frozen = dataclasses.replace(
        attn, q_a=sg(attn.q_a), q_a_norm=sg(attn.q_a_norm), q_b=sg(attn.q_b), kv_a=sg(attn.kv_a),
        kv_a_norm=sg(attn.kv_a_norm), kv_b=sg(attn.kv_b), o=sg(attn.o),
    )  # fmt: skip
    proj = project(frozen, cfg, sg(h), positions)
    return proj.q_idx, proj.w_idx, proj.k_idx


def _topk_positions(scores: jax.Array, k: int) -> jax.Array:
    """int32 `[R, k]` positions of the `k` largest scores per row (lowest position on ties), −1 where
    fewer than `k` are visible (finite)."""
    k = min(k, scores.shape[-1])
    vals, idx = jax.lax.top_k(scores, k)
    return jnp.where(jnp.isfinite(vals), idx, -1).astype(jnp.int32)


def _in_blocks(fn, n: int, block: int, *xs):
    """`fn` over row blocks of `xs` (leading dim `n`), results concatenated: bounds `[block, L]` buffers."""
    if block >= n:
        return fn(*xs)
    pad = -n % block
    bs = [jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(-1, block, *x.shape[1:]) for x in xs]
    out = jax.lax.map(lambda a: fn(*a), tuple(bs))
    return jax.tree_util.tree_map(lambda o: o.reshape(-1, *o.shape[2:])[:n], out)


def _dense_attention(q_abs: jax.Array, kv: jax.Array, q_pos: jax.Array, scale: float, r_kv: int):
    """Causal absorbed attention of queries at `q_pos`: `(o_lat [R, h, r_kv], probs [R, h, L])`."""
    logits = scale * jnp.einsum("thd,sd->ths", q_abs, kv, precision=_HIGHEST)
    visible = jnp.arange(kv.shape[0])[None, None, :] <= q_pos[:, None, None]
    p = jax.nn.softmax(jnp.where(visible, logits, _NEG), axis=-1)
    return jnp.einsum("ths,sr->thr", p, kv[:, :r_kv], precision=_HIGHEST), p


def _normalise(p: jax.Array) -> jax.Array:
    total = p.sum(-1, keepdims=True)
    return p / jnp.where(total > 0, total, 1.0)


def _output(attn: DSAParams, cfg: DSAConfig, o_lat: jax.Array) -> jax.Array:
    """`W_UV` then `W_o` (dsa.md §3): `[T, h, r_kv]` → `[T, hidden]`."""
    h, nope, v, r_kv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    w_uv = jnp.asarray(attn.kv_b).reshape(h, nope + v, r_kv)[:, nope:]
    o = jnp.einsum("thr,hvr->thv", o_lat, w_uv, precision=_HIGHEST).reshape(o_lat.shape[0], h * v)
    return jnp.einsum("ti,oi->to", o, jnp.asarray(attn.o), precision=_HIGHEST)


def _sequence_forward(
    params: ModelParams,
    cfg: DSAConfig,
    tokens: jax.Array,
    key: jax.Array,
    aux_rows: jax.Array,
    mode: str,
    k: int,
    block: int,
) -> tuple[jax.Array, tuple[LayerAux, ...]]:
    L = tokens.shape[0]
    positions = jnp.arange(L, dtype=jnp.int32)
    x = embed(params, tokens)
    auxes = []
    selected = None
    for i, blk in enumerate(params.blocks):
        attn = blk.attn
        h = pre_norm(blk, cfg, x)
        proj = project(attn, cfg, h, positions)
        kv = jnp.concatenate([proj.c_kv, proj.k_pe], axis=-1)  # [L, r_kv + rope]
        has_indexer = attn.idx_wq_b is not None and cfg.layer_indexer_type(i) == "full"
        q_idx = w_idx = k_idx = None
        if has_indexer:
            q_idx, w_idx, k_idx = _detached_indexer(attn, cfg, h, positions)
        scale, r_kv = cfg.softmax_scale, cfg.kv_lora_rank
        if mode == "dense":
            o_lat = _in_blocks(
                lambda q, p, kv=kv, scale=scale, r_kv=r_kv: _dense_attention(q, kv, p, scale, r_kv)[0],
                L,
                block,
                proj.q_abs,
                positions,
            )
            aux_sel = None
        else:
            if mode == "sparse" and not has_indexer:
                if selected is None:
                    raise ValueError(f"layer {i}: a 'shared' layer needs a previous full layer's selection")
                sel = selected  # GLM-5 "shared": the previous full layer's selection
            elif mode == "sparse":

                def pick(qi, wi, p, keys=k_idx):
                    return _topk_positions(indexer_scores(qi, wi, keys, p), k)

                sel = _in_blocks(pick, L, block, q_idx, w_idx, positions)
            elif mode == "random":
                u = jax.random.uniform(jax.random.fold_in(key, i), (L, L))
                sel = _in_blocks(
                    lambda uu, p: _topk_positions(jnp.where(jnp.arange(L)[None] <= p[:, None], uu, _NEG), k),
                    L, block, u, positions,
                )  # fmt: skip
            else:  # window: the last k positions t−k+1 … t
                win = positions[:, None] - jnp.arange(min(k, L))[None, :]
                sel = jnp.where(win >= 0, win, -1).astype(jnp.int32)
            selected = sel
            o_lat, _ = sparse_attention(proj.q_abs, kv, sel, scale=scale, d_v=r_kv)
            aux_sel = sel[aux_rows]
        x = residual_mlp(blk, cfg, x, _output(attn, cfg, o_lat))
        auxes.append(_layer_aux(proj.q_abs, kv, aux_rows, q_idx, w_idx, k_idx, aux_sel, scale, r_kv, has_indexer))
    return lm_head(params, cfg, x), tuple(auxes)


def _layer_aux(q_abs, kv, rows, q_idx, w_idx, k_idx, sel, scale, r_kv, has_indexer):
    """`LayerAux` of the rows `rows`: detached attention target, indexer scores, the selection."""
    if not has_indexer:
        return LayerAux(None, None, None)
    sg = jax.lax.stop_gradient
    scores = indexer_scores(q_idx[rows], w_idx[rows], k_idx, rows)
    _, probs = _dense_attention(sg(q_abs[rows]), sg(kv), rows, scale, r_kv)
    target = probs.sum(axis=1)  # [R, L]
    if sel is not None:  # the distribution of the attention that ran: restricted to the selection, renormalised
        mask = jnp.zeros(target.shape, bool).at[jnp.arange(rows.shape[0])[:, None], jnp.maximum(sel, 0)].set(sel >= 0)
        target = jnp.where(mask, target, 0.0)
    return LayerAux(scores, _normalise(target), sel)


def forward_train(
    params: ModelParams,
    cfg: DSAConfig,
    tokens: jax.Array,
    *,
    mode: AttentionMode = "dense",
    k: int | None = None,
    aux_rows: jax.Array | None = None,
    key: jax.Array | None = None,
    query_block: int = 1024,
) -> tuple[jax.Array, tuple[LayerAux, ...]]:
    """Logits `[B, L, vocab]` of whole sequences `tokens` int `[B, L]` (positions `0 … L−1`, no cache).

    Args:
        params: the model (float32 arrays; e.g. `ModelParams.random` or loaded with `weights="float32"`).
        cfg: its config (static under `jit`).
        mode: `"dense"`, `"sparse"` (indexer top-`k`), `"random"` or `"window"` (see the module docstring).
        k: positions per query for the non-dense modes (default `cfg.index_topk`).
        aux_rows: int `[R]` query positions to report `LayerAux` for (default: every position; the
            indexer's losses need all of them, the evaluation only the answer positions).
        key: PRNG key for `"random"` (default `PRNGKey(0)`).
        query_block: attention and selection run over blocks of this many queries, so no `[L, L]` buffer
            larger than `query_block × L` per head is built (the aux rows' own `[R, L]` excepted).

    Raises (before any work; docs/errors.md): `TypeError` for `params` / `cfg` / `tokens` of the wrong
    type, a bool or float `k` / `query_block`, quantized weights; `ValueError` for an unknown `mode`,
    `tokens` that are not integers `[B, L]` (B, L >= 1) or (when concrete) hold ids outside the
    vocabulary, `k` / `query_block` < 1, a block count unlike the config's, `aux_rows` not integers
    `[R]`; `IndexError` for concrete `aux_rows` outside `[0, L)`.

    Returns `(logits, aux)`: `aux` one `LayerAux` per layer, each field with a leading batch axis.
    Jit-able with `cfg`, `mode`, `k`, `query_block` static; differentiable (the main model through the
    attention, the indexer only through `aux[i].scores`).
    """
    if not isinstance(params, ModelParams):
        raise TypeError(f"params: expected ModelParams, got {type(params).__name__}")
    if not isinstance(cfg, DSAConfig):
        raise TypeError(f"cfg: expected a DSAConfig, got {type(cfg).__name__}")
    check_choice("mode", mode, MODES)
    check_array("tokens", tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens: expected integers of shape [B, L], got {tokens.dtype} {list(tokens.shape)}")
    if tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"tokens: expected at least one sequence of at least one token, got {list(tokens.shape)}")
    if is_concrete(tokens):
        lo, hi = int(np.min(np.asarray(tokens))), int(np.max(np.asarray(tokens)))
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"tokens: ids must lie in [0, {cfg.vocab_size}), got min {lo}, max {hi}")
    k = cfg.index_topk if k is None else check_int("k", k, 1)
    query_block = check_int("query_block", query_block, 1)
    if len(params.blocks) != cfg.num_hidden_layers:
        raise ValueError(f"params: {len(params.blocks)} blocks for a config of {cfg.num_hidden_layers} layers")
    for i, blk in enumerate(params.blocks):
        for name in ("q_a", "q_b", "kv_a", "kv_b", "o"):
            if not isinstance(getattr(blk.attn, name), jax.Array):
                raise TypeError(
                    f"params.blocks[{i}].attn.{name}: training needs float arrays (load with weights='float32')"
                )
    if aux_rows is not None:
        if isinstance(aux_rows, (list, tuple)):
            aux_rows = np.asarray(aux_rows)
        check_int_array("aux_rows", aux_rows, 1)
        if is_concrete(aux_rows) and aux_rows.size:
            lo, hi = int(np.min(np.asarray(aux_rows))), int(np.max(np.asarray(aux_rows)))
            if lo < 0 or hi >= tokens.shape[1]:
                raise IndexError(f"aux_rows: positions must lie in [0, {tokens.shape[1]}), got min {lo}, max {hi}")
    L = tokens.shape[1]
    rows = jnp.arange(L, dtype=jnp.int32) if aux_rows is None else jnp.asarray(aux_rows, jnp.int32)
    key = jax.random.PRNGKey(0) if key is None else key
    keys = jax.random.split(key, tokens.shape[0])
    return jax.vmap(lambda t, kk: _sequence_forward(params, cfg, t, kk, rows, mode, k, query_block))(tokens, keys)

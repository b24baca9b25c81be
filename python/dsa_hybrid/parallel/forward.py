"""The causal LM's forward on a `("dp", "tp")` mesh (`parallel.mesh`), sharded by `parallel.rules`.

One jitted program per step, three kinds of per-device code inside it (`jax.shard_map`, all axes manual,
so the Pallas kernels, which run per device, are called per device too):

- attention (per layer): each DP rank runs `layers.dsa_attention` on its own rows against its own
  cache shard, with `num_attention_heads / tp` heads on each TP rank (`q_b`, `kv_b`, `o` split by head)
  and a `psum` over `"tp"` after the output projection. The latent rows and the indexer (its weights
  replicated) are computed alike on every TP rank of a DP rank, so every rank that computes a row's
  top-k computes the same one (exact, deterministic top-k on the same bytes; the tests compare every TP
  rank's copy, `layer_topk_copies`).
- dense MLP: `gate`/`up` columns and `down` rows split over `"tp"`, a `psum` over `"tp"`.
- MoE: the rows of all DP ranks are all-gathered, every device routes all of them (replicated router)
  and runs its own `E / (dp·tp)` experts on the (row, expert) pairs that chose them (a grouped matmul,
  `jax.lax.ragged_dot`); a reduce-scatter over `"dp"` returns each DP rank its rows' partial sums, the
  shared experts (split over `"tp"`) are added, and a `psum` over `"tp"` completes them.

Embedding and LM head are plain `jit` code under sharding constraints (vocabulary over `"tp"`).

Rows are laid out DP-major: the `T` rows of a step are `dp` equal groups of `T / dp`, group `r` DP rank
`r`'s, and their `slots` and `block_tables` number pages *within that rank's shard* (page `p` of rank
`r` is global page `r · pages_per_rank + p`). `place_rows` builds such rows from per-rank lists.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsa_hybrid.layers.dsa_attention import DSACaches, dsa_attention, linear, rms_norm
from dsa_hybrid.layers.weights import dense
from dsa_hybrid.models.causal_lm import BlockParams, ModelParams, create_caches, embed, lm_head
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.models.moe import route
from dsa_hybrid.ops.sparse_mla import Backend
from dsa_hybrid.parallel.mesh import DP, TP, mesh_shape
from dsa_hybrid.parallel.rules import cache_specs, check_model_divides, named, param_specs

_HIGHEST = jax.lax.Precision.HIGHEST
ROWS = P(DP)
TABLES = P(DP, None)
HIDDEN = P(DP, None)


def local_config(cfg: DSAConfig, tp: int) -> DSAConfig:
    """The config one TP rank's attention runs with: `num_attention_heads / tp` heads, all else equal."""
    return cfg.replace(num_attention_heads=cfg.num_attention_heads // tp)


def _attention(
    cfg_local: DSAConfig, backend: Backend, eps: float, norm_w, attn_p, x, pos, slots, tables, cache, shared
):
    h = rms_norm(x, norm_w, eps)
    out, cache, topk = dsa_attention(
        attn_p, cfg_local, h, pos, slots, tables, cache, shared_topk=shared, backend=backend
    )
    return jax.lax.psum(out, TP), cache, topk


def _local_experts(gate, up, down, x, experts, weights, first: jax.Array) -> jax.Array:
    """`Σ_j w_j · expert_{e_j}(x_t)` over the pairs whose expert is one of this device's
    `gate.shape[0]` experts (`first ..`); other pairs contribute zero. `x` `[T, d]`."""
    T, k = experts.shape
    n_local = gate.shape[0]
    flat = experts.reshape(-1) - first
    valid = (flat >= 0) & (flat < n_local)
    key = jnp.where(valid, flat, n_local)  # foreign pairs sort last, outside every group
    order = jnp.argsort(key, stable=True)
    token = order // k
    sizes = jnp.bincount(key, length=n_local + 1)[:n_local].astype(jnp.int32)
    xs = x[token]

    def gmm(a: jax.Array, w: Any) -> jax.Array:  # w [E_local, out, in], any weight format
        return jax.lax.ragged_dot(a, jnp.swapaxes(dense(w), 1, 2), sizes, precision=_HIGHEST)

    hidden = jax.nn.silu(gmm(xs, gate)) * gmm(xs, up)
    keep = valid[order][:, None]
    y = jnp.where(keep, gmm(hidden, down) * weights.reshape(-1)[order][:, None], 0.0)
    return jnp.zeros_like(x).at[token].add(y)


def _swiglu(x, gate, up, down) -> jax.Array:
    return linear(jax.nn.silu(linear(x, gate)) * linear(x, up), down)


def _mlp(cfg: DSAConfig, tp: int, blk: BlockParams, x, attn_out):
    x = x + attn_out
    y = rms_norm(x, blk.post_norm, cfg.rms_norm_eps)
    if blk.moe is None:
        return x + jax.lax.psum(_swiglu(y, blk.gate, blk.up, blk.down), TP)
    m = blk.moe
    rows = jax.lax.all_gather(y, DP, axis=0, tiled=True)  # every DP rank's rows
    logits = jnp.einsum("td,ed->te", rows, dense(m.router), precision=_HIGHEST)
    experts, weights = route(logits, m.bias, cfg)
    device = jax.lax.axis_index(DP) * tp + jax.lax.axis_index(TP)
    routed = _local_experts(m.gate, m.up, m.down, rows, experts, weights, device * m.gate.shape[0])
    part = jax.lax.psum_scatter(routed, DP, scatter_dimension=0, tiled=True)  # this rank's rows
    if m.shared_gate is not None:
        part = part + _swiglu(y, m.shared_gate, m.shared_up, m.shared_down)
    return x + jax.lax.psum(part, TP)


def forward_sharded(
    params: ModelParams,
    cfg: DSAConfig,
    mesh: Mesh,
    tokens: jax.Array,
    positions: jax.Array,
    slots: jax.Array,
    block_tables: jax.Array,
    caches: tuple[DSACaches, ...],
    backend: Backend = "auto",
) -> tuple[jax.Array, tuple[DSACaches, ...]]:
    """`models.causal_lm.forward` on `mesh`: logits float32 `[T, vocab]` (sharded `P("dp", "tp")`) and
    the updated caches (sharded `P("dp")`). Rows are DP-major with rank-local slots and block tables (the
    module docstring); `T` a multiple of `dp`. `params` and `caches` sharded by `parallel.rules`
    (`shard_params`, `shard_caches`). Jit-able with `cfg`, `mesh` and `backend` static
    (`forward_sharded_jit`)."""
    dp, tp = mesh_shape(mesh)
    check_model_divides(cfg, mesh)
    if tokens.shape[0] % dp:
        raise ValueError(f"tokens: {tokens.shape[0]} rows do not divide over {dp} DP ranks")
    pspecs = param_specs(params, mesh)
    cspecs = cache_specs(caches, mesh)
    cfg_local = local_config(cfg, tp)
    x = jax.lax.with_sharding_constraint(embed(params, tokens), NamedSharding(mesh, HIDDEN))
    new_caches: list[DSACaches] = []
    topk: jax.Array | None = None
    for i, (blk, bspec, cache, cspec) in enumerate(zip(params.blocks, pspecs.blocks, caches, cspecs, strict=True)):
        shared = topk if cfg.layer_indexer_type(i) == "shared" else None
        attn = jax.shard_map(
            functools.partial(_attention, cfg_local, backend, cfg.rms_norm_eps),
            mesh=mesh,
            in_specs=(
                bspec.input_norm,
                bspec.attn,
                HIDDEN,
                ROWS,
                ROWS,
                TABLES,
                cspec,
                None if shared is None else TABLES,
            ),
            out_specs=(HIDDEN, cspec, TABLES),
            check_vma=False,  # the ops' loops start from unvarying carries; `tp_topk_copies` checks instead
        )
        h, cache, topk = attn(blk.input_norm, blk.attn, x, positions, slots, block_tables, cache, shared)
        mlp = jax.shard_map(
            functools.partial(_mlp, cfg, tp), mesh=mesh, in_specs=(bspec, HIDDEN, HIDDEN), out_specs=HIDDEN
        )
        x = mlp(blk, x, h)
        new_caches.append(cache)
    logits = jax.lax.with_sharding_constraint(lm_head(params, cfg, x), NamedSharding(mesh, P(DP, TP)))
    return logits, tuple(new_caches)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "backend"), donate_argnames=("caches",))
def forward_sharded_jit(params, cfg, mesh, tokens, positions, slots, block_tables, caches, backend="auto"):
    """`forward_sharded` under `jit` (caches donated)."""
    return forward_sharded(params, cfg, mesh, tokens, positions, slots, block_tables, caches, backend)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "backend"), donate_argnames=("caches",))
def greedy_step(params, cfg, mesh, tokens, positions, slots, block_tables, caches, last_rows, backend="auto"):
    """One step returning the argmax token of rows `last_rows` (int32 `[n]`, global row indices),
    replicated on every device (so every process can read it), and the updated caches."""
    logits, caches = forward_sharded(params, cfg, mesh, tokens, positions, slots, block_tables, caches, backend)
    ids = jnp.argmax(logits[last_rows], axis=-1).astype(jnp.int32)
    return jax.lax.with_sharding_constraint(ids, NamedSharding(mesh, P())), caches


# ----- placing arrays on the mesh ---------------------------------------------------------------------


def put(tree: Any, shardings: Any) -> Any:
    """Every leaf of `tree` (numpy or `jax.Array`, the same full value in every process) placed with the
    matching `NamedSharding` of `shardings` (`jax.make_array_from_callback`: each process builds only
    its own devices' shards, so it works across `jax.distributed` processes too)."""

    def one(leaf: Any, sharding: NamedSharding) -> jax.Array:
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree_util.tree_map(one, tree, shardings)


def shard_params(params: ModelParams, mesh: Mesh) -> ModelParams:
    """`params` placed on `mesh` by `parallel.rules.param_specs`."""
    return put(params, named(mesh, param_specs(params, mesh)))


def create_sharded_caches(
    cfg: DSAConfig, mesh: Mesh, pages_per_rank: int, page_size: int = 16, **kw: Any
) -> tuple[DSACaches, ...]:
    """Empty caches for every layer, `pages_per_rank` pages on each DP rank (`dp · pages_per_rank` in
    all), sharded `P("dp")` (`kw` as in `DSACaches.create`). Each device allocates only its shard."""
    dp, _ = mesh_shape(mesh)
    abstract = jax.eval_shape(lambda: create_caches(cfg, dp * pages_per_rank, page_size, **kw))
    shardings = named(mesh, cache_specs(abstract, mesh))
    zeros = jax.jit(lambda: create_caches(cfg, dp * pages_per_rank, page_size, **kw), out_shardings=shardings)
    return zeros()


def place_rows(mesh: Mesh, per_rank: Sequence[dict[str, np.ndarray]]) -> dict[str, jax.Array]:
    """Rows of one step from `dp` per-rank dicts (`tokens`, `positions`, `slots` int `[n_r]`,
    `block_tables` int `[n_r, W_r]`, rank-local pages): padded to the longest rank (padding rows: slot
    −1, table −1, position 0) and to a common table width, concatenated DP-major and sharded
    `P("dp")`. Returns the four global arrays."""
    dp, _ = mesh_shape(mesh)
    if len(per_rank) != dp:
        raise ValueError(f"per_rank: expected {dp} ranks' rows, got {len(per_rank)}")
    n = max(1, max(len(r["tokens"]) for r in per_rank))
    width = max(1, max(np.asarray(r["block_tables"]).reshape(len(r["tokens"]), -1).shape[1] for r in per_rank))
    out: dict[str, list[np.ndarray]] = {"tokens": [], "positions": [], "slots": [], "block_tables": []}
    for r in per_rank:
        m = len(r["tokens"])
        tab = np.asarray(r["block_tables"], np.int32).reshape(m, -1)
        out["tokens"].append(np.pad(np.asarray(r["tokens"], np.int32), (0, n - m)))
        out["positions"].append(np.pad(np.asarray(r["positions"], np.int32), (0, n - m)))
        out["slots"].append(np.pad(np.asarray(r["slots"], np.int32), (0, n - m), constant_values=-1))
        out["block_tables"].append(np.pad(tab, ((0, n - m), (0, width - tab.shape[1])), constant_values=-1))
    specs = {"tokens": ROWS, "positions": ROWS, "slots": ROWS, "block_tables": TABLES}
    return {k: put(np.concatenate(v), NamedSharding(mesh, specs[k])) for k, v in out.items()}


def generate_greedy_sharded(
    params: ModelParams,
    cfg: DSAConfig,
    mesh: Mesh,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    page_size: int = 16,
    backend: Backend = "auto",
    **cache_kw: Any,
) -> list[list[int]]:
    """Greedy continuations of several sequences on `mesh`: sequence `j` lives on DP rank `j % dp` (its
    pages in that rank's cache shard), one prefill step for all prompts, then one decode step per new
    token for all sequences at once. `params` as returned by `shard_params`. Returns each sequence's
    `max_new_tokens` tokens (the same in every process)."""
    dp, _ = mesh_shape(mesh)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: expected at least one non-empty prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    seqs = [[int(t) for t in p] for p in prompts]
    pages_per_seq = -(-(max(len(p) for p in seqs) + max_new_tokens) // page_size)
    rank_of = [j % dp for j in range(len(seqs))]
    local = [sum(1 for i in range(j) if rank_of[i] == rank_of[j]) for j in range(len(seqs))]  # index on its rank
    per_rank_seqs = -(-len(seqs) // dp)
    caches = create_sharded_caches(cfg, mesh, per_rank_seqs * pages_per_seq, page_size, **cache_kw)

    def table(j: int) -> np.ndarray:
        return np.arange(local[j] * pages_per_seq, (local[j] + 1) * pages_per_seq, dtype=np.int32)

    def step(rows: list[list[tuple[int, int, int]]]) -> np.ndarray:
        """rows[r]: (sequence, token, position) of rank r's rows; returns each sequence's argmax."""
        per_rank, last = [], {}
        n = max(1, max(len(r) for r in rows))
        for r, rr in enumerate(rows):
            for i, (j, _, _) in enumerate(rr):
                last[j] = r * n + i  # the sequence's last row wins
            per_rank.append({
                "tokens": np.array([t for _, t, _ in rr], np.int32),
                "positions": np.array([p for _, _, p in rr], np.int32),
                "slots": np.array([table(j)[p // page_size] * page_size + p % page_size for j, _, p in rr], np.int32),
                "block_tables": np.array([table(j) for j, _, _ in rr], np.int32).reshape(len(rr), pages_per_seq),
            })  # fmt: skip
        arrays = place_rows(mesh, per_rank)
        nonlocal caches
        order = sorted(last)
        want = put(np.array([last[j] for j in order], np.int32), NamedSharding(mesh, P()))
        ids, caches = greedy_step(params, cfg, mesh, **arrays, caches=caches, last_rows=want, backend=backend)
        got = np.asarray(ids)
        return np.array([got[order.index(j)] for j in range(len(seqs))])

    prefill: list[list[tuple[int, int, int]]] = [[] for _ in range(dp)]
    for j, p in enumerate(seqs):
        prefill[rank_of[j]] += [(j, t, i) for i, t in enumerate(p)]
    out = [[int(t)] for t in step(prefill)]
    for s in range(1, max_new_tokens):
        rows: list[list[tuple[int, int, int]]] = [[] for _ in range(dp)]
        for j, p in enumerate(seqs):
            rows[rank_of[j]].append((j, out[j][-1], len(p) + s - 1))
        for j, t in enumerate(step(rows)):
            out[j].append(int(t))
    return out


def layer_topk_copies(
    blk: BlockParams,
    cfg: DSAConfig,
    mesh: Mesh,
    x: jax.Array,
    positions: jax.Array,
    slots: jax.Array,
    block_tables: jax.Array,
    cache: DSACaches,
    backend: Backend = "auto",
) -> jax.Array:
    """Every TP rank's own top-k selection of one full-indexer layer (its attention as `forward_sharded`
    runs it), stacked: int32 `[tp, T, K]` (rows DP-major as in `forward_sharded`, `x` the layer input
    `[T, hidden]`). All `tp` copies must be equal: the check that every rank computing a row's
    selection computes the same one. `cache` is not consumed."""
    _, tp = mesh_shape(mesh)
    bspec = param_specs(blk, mesh)
    cspec = cache_specs(cache, mesh)

    def one(norm_w, attn_p, x, pos, slots, tables, cache):
        _, _, topk = _attention(local_config(cfg, tp), backend, cfg.rms_norm_eps, norm_w, attn_p, x, pos, slots,
                                tables, cache, None)  # fmt: skip
        return topk[None]

    f = jax.shard_map(
        one, mesh=mesh, in_specs=(bspec.input_norm, bspec.attn, HIDDEN, ROWS, ROWS, TABLES, cspec),
        out_specs=P(TP, DP, None), check_vma=False,
    )  # fmt: skip
    return jax.jit(f)(blk.input_norm, blk.attn, x, positions, slots, block_tables, cache)

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
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsa_hybrid.layers.dsa_attention import (
    DSACaches,
    Projections,
    attend,
    dsa_attention,
    linear,
    project_write_keys,
    rms_norm,
)
from dsa_hybrid.layers.weights import dense
from dsa_hybrid.models.causal_lm import BlockParams, ModelParams, create_caches, embed, lm_head
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.models.moe import route
from dsa_hybrid.ops.checks import check_int
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
    all), sharded `P("dp")` (`kw` as in `DSACaches.create`). Each device allocates only its shard.
    `pages_per_rank` and `page_size` integers >= 1 (TypeError / ValueError naming them)."""
    check_int("pages_per_rank", pages_per_rank, 1)
    check_int("page_size", page_size, 1)
    dp, _ = mesh_shape(mesh)
    abstract = jax.eval_shape(lambda: create_caches(cfg, dp * pages_per_rank, page_size, **kw))
    shardings = named(mesh, cache_specs(abstract, mesh))
    zeros = jax.jit(lambda: create_caches(cfg, dp * pages_per_rank, page_size, **kw), out_shardings=shardings)
    return zeros()


def place_rows(
    mesh: Mesh, per_rank: Sequence[dict[str, np.ndarray]], rows: int | None = None, width: int | None = None
) -> dict[str, jax.Array]:
    """Rows of one step from `dp` per-rank dicts (`tokens`, `positions`, `slots` int `[n_r]`,
    `block_tables` int `[n_r, W_r]`, rank-local pages): padded to the longest rank, or to `rows` rows per
    rank (padding rows: slot −1, table −1, position 0), and to a common table width (at least `width`),
    concatenated DP-major and sharded `P("dp")`. Returns the four global arrays (`T = dp · rows`)."""
    dp, _ = mesh_shape(mesh)
    if len(per_rank) != dp:
        raise ValueError(f"per_rank: expected {dp} ranks' rows, got {len(per_rank)}")
    longest = max(len(r["tokens"]) for r in per_rank)
    if rows is not None and rows < longest:
        raise ValueError(f"rows: {rows} rows per rank cannot hold a rank's {longest} rows")
    n = max(1, longest if rows is None else rows)

    def table(r: dict[str, np.ndarray]) -> np.ndarray:
        tab = np.asarray(r["block_tables"], np.int32)
        return tab.reshape(len(r["tokens"]), -1) if tab.size else tab.reshape(len(r["tokens"]), 0)

    width = max(1, max(table(r).shape[1] for r in per_rank), width or 0)
    out: dict[str, list[np.ndarray]] = {"tokens": [], "positions": [], "slots": [], "block_tables": []}
    for r in per_rank:
        m = len(r["tokens"])
        tab = table(r)
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
    check_int("max_new_tokens", max_new_tokens, 1)
    check_int("page_size", page_size, 1)
    seqs = []
    for j, p in enumerate(prompts):
        ids = np.asarray(p)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(
                f"prompts[{j}]: expected a sequence of integer token ids, got {ids.dtype} {list(ids.shape)}"
            )
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise ValueError(
                f"prompts[{j}]: token ids must be in [0, {cfg.vocab_size}), got [{ids.min()}, {ids.max()}]"
            )
        seqs.append(ids.tolist())
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


# ----- the engine's pieces: processes and ranks, the host-indexer forward, replicated sampling inputs ---


def local_dp_ranks(mesh: Mesh) -> tuple[int, ...]:
    """The DP ranks with at least one device in this process (`jax.process_index()`): the ranks whose
    rows and cache shards this process can read (`array.addressable_shards`). All ranks in one process."""
    me = jax.process_index()
    return tuple(r for r in range(mesh.devices.shape[0]) if any(d.process_index == me for d in mesh.devices[r]))


def rank_shards(array: jax.Array, rows_per_rank: int) -> dict[int, np.ndarray]:
    """This process's rows of a `P("dp")`-sharded `array` (rows DP-major, `rows_per_rank` per rank), by DP
    rank, read from its addressable shards only: nothing of another process's ranks is fetched. A rank's
    rows are replicated over `"tp"`; one copy is read."""
    out: dict[int, np.ndarray] = {}
    for shard in array.addressable_shards:
        start = shard.index[0].start or 0
        rank = start // rows_per_rank
        if rank not in out:
            out[rank] = np.asarray(shard.data)
    return out


def _project_keys(cfg_local: DSAConfig, eps: float, norm_w, attn_p, x, pos, slots, index):
    """Per device: the layer's projections and its new indexer keys, quantized and written (host steps)."""
    proj, codes, scales, index = project_write_keys(attn_p, cfg_local, rms_norm(x, norm_w, eps), pos, slots, index)
    return proj, codes, scales, index


def _attend(cfg_local: DSAConfig, backend: Backend, attn_p, proj, slots, tables, latent, topk, pos):
    """Per device: attention over the host's selection `topk`, then the `psum` over `"tp"` (host steps)."""
    out, latent = attend(attn_p, cfg_local, proj, slots, tables, latent, topk, backend, pos)
    return jax.lax.psum(out, TP), latent


def _proj_specs() -> Projections:
    """`Projections` of `T` DP-major rows: the absorbed queries split by head over `"tp"`, the rest (the
    latent rows and the indexer's, computed alike on every TP rank) by rows only."""
    rows = P(DP)
    return Projections(P(DP, TP), rows, rows, rows, rows, rows)  # type: ignore[arg-type]


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"), donate_argnames=("index",))
def host_project_jit(blk, cfg: DSAConfig, mesh: Mesh, x, positions, slots, index):
    """One indexer layer's first half on `mesh` (for the host indexer; `blk` the layer's `BlockParams`):
    `(proj, codes [T, D_I] e4m3fn,
    scales [T] f32, index)`, the new keys quantized once and written to the device pages (donated), so
    the device and host indexer caches hold the same bytes. Rows DP-major as in `forward_sharded`."""
    _, tp = mesh_shape(mesh)
    bspec = param_specs(blk, mesh)
    ispec = jax.tree_util.tree_map(lambda _: P(DP), index)
    f = jax.shard_map(
        functools.partial(_project_keys, local_config(cfg, tp), cfg.rms_norm_eps),
        mesh=mesh,
        in_specs=(bspec.input_norm, bspec.attn, HIDDEN, ROWS, ROWS, ispec),
        out_specs=(_proj_specs(), ROWS, ROWS, ispec),
        check_vma=False,
    )
    return f(blk.input_norm, blk.attn, x, positions, slots, index)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "backend"), donate_argnames=("latent",))
def host_attend_jit(blk, cfg: DSAConfig, mesh: Mesh, x, proj, positions, slots, block_tables, latent, topk, backend):
    """One indexer layer's second half on `mesh`: attention over the host's selection `topk` int32
    `[T, K]` (−1: none), the latent rows written (`latent` donated), the MLP. Returns `(x, latent)`."""
    _, tp = mesh_shape(mesh)
    bspec = param_specs(blk, mesh)
    lspec = jax.tree_util.tree_map(lambda _: P(DP), latent)
    attn = jax.shard_map(
        functools.partial(_attend, local_config(cfg, tp), backend),
        mesh=mesh,
        in_specs=(bspec.attn, _proj_specs(), ROWS, TABLES, lspec, TABLES, ROWS),
        out_specs=(HIDDEN, lspec),
        check_vma=False,
    )
    h, latent = attn(blk.attn, proj, slots, block_tables, latent, topk, positions)
    mlp = jax.shard_map(functools.partial(_mlp, cfg, tp), mesh=mesh, in_specs=(bspec, HIDDEN, HIDDEN), out_specs=HIDDEN)
    return mlp(blk, x, h), latent


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "backend"), donate_argnames=("cache",))
def shared_layer_jit(blk, cfg: DSAConfig, mesh: Mesh, x, positions, slots, block_tables, cache, topk, backend):
    """A layer without indexer (GLM-5 "shared") on `mesh`, attending over the previous layer's `topk`."""
    _, tp = mesh_shape(mesh)
    bspec = param_specs(blk, mesh)
    cspec = cache_specs(cache, mesh)
    attn = jax.shard_map(
        functools.partial(_attention, local_config(cfg, tp), backend, cfg.rms_norm_eps),
        mesh=mesh,
        in_specs=(bspec.input_norm, bspec.attn, HIDDEN, ROWS, ROWS, TABLES, cspec, TABLES),
        out_specs=(HIDDEN, cspec, TABLES),
        check_vma=False,
    )
    h, cache, _ = attn(blk.input_norm, blk.attn, x, positions, slots, block_tables, cache, topk)
    mlp = jax.shard_map(functools.partial(_mlp, cfg, tp), mesh=mesh, in_specs=(bspec, HIDDEN, HIDDEN), out_specs=HIDDEN)
    return mlp(blk, x, h), cache


@functools.partial(jax.jit, static_argnames=("mesh",))
def embed_sharded(params: ModelParams, mesh: Mesh, tokens: jax.Array) -> jax.Array:
    """The embedding of DP-major rows, sharded `P("dp", None)`."""
    return jax.lax.with_sharding_constraint(embed(params, tokens), NamedSharding(mesh, HIDDEN))


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"))
def lm_head_sharded(params: ModelParams, cfg: DSAConfig, mesh: Mesh, x: jax.Array) -> jax.Array:
    """Logits float32 `[T, vocab]`, sharded `P("dp", "tp")`."""
    return jax.lax.with_sharding_constraint(lm_head(params, cfg, x), NamedSharding(mesh, P(DP, TP)))


def forward_sharded_host(
    params: ModelParams,
    cfg: DSAConfig,
    mesh: Mesh,
    arrays: Mapping[str, jax.Array],
    per_rank: Mapping[int, Mapping[str, np.ndarray]],
    caches: tuple[DSACaches, ...],
    host_caches: Mapping[int, Sequence[Any]],
    backend: Backend = "auto",
    threads: int | None = None,
) -> tuple[jax.Array, tuple[DSACaches, ...]]:
    """`forward_sharded` with every indexer layer's selection on the host, per DP rank.

    `arrays`: the step's global rows (`place_rows`: `tokens`, `positions`, `slots`, `block_tables`, `T =
    dp · n` rows DP-major). `per_rank[r]`: DP rank `r`'s real rows as numpy (`positions`, `slots` `[m_r]`,
    `block_tables` `[m_r, W]`, rank-local pages), for every rank of this process (`local_dp_ranks`).
    `host_caches[r]`: rank `r`'s `IndexerKeyCache` per layer (None for a layer without indexer), paged as
    its cache shard. Per indexer layer: a sharded program projects and writes the new keys
    (`host_project_jit`); each process reads only its own ranks' keys and queries (`rank_shards`, its
    addressable shards), writes them to those ranks' host caches and selects there
    (`IndexerKeyCache.write_slots`, `select_paged`); the selection goes back to the same devices
    (`put`: every process builds only its own shards) for attention and MLP (`host_attend_jit`). No
    process reads or sends another's keys. The caches passed in are consumed. Returns `(logits [T,
    vocab] sharded P("dp", "tp"), caches)`."""
    dp, _ = mesh_shape(mesh)
    check_model_divides(cfg, mesh)
    T = int(arrays["tokens"].shape[0])
    n = T // dp
    K = cfg.index_topk
    pos, slots, tables = arrays["positions"], arrays["slots"], arrays["block_tables"]
    x = embed_sharded(params, mesh, arrays["tokens"])
    new_caches = list(caches)
    topk: jax.Array | None = None
    for i, blk in enumerate(params.blocks):
        cache = new_caches[i]
        if cfg.layer_indexer_type(i) == "shared":
            if topk is None:
                raise ValueError(f"cfg: layer {i} is 'shared' but no earlier layer selects")
            x, cache = shared_layer_jit(blk, cfg, mesh, x, pos, slots, tables, cache, topk, backend)
            new_caches[i] = cache
            continue
        proj, codes, scales, index = host_project_jit(blk, cfg, mesh, x, pos, slots, cache.index)
        parts = [rank_shards(a, n) for a in (codes, scales, proj.q_idx, proj.w_idx)]
        sel = np.full((T, K), -1, np.int32)
        for r, rows in per_rank.items():
            m = len(rows["slots"])
            if m == 0:
                continue
            host = host_caches[r][i]
            c, s, q, w = (part[r][:m] for part in parts)
            host.write_slots(np.asarray(rows["slots"], np.int32), np.ascontiguousarray(c).view(np.uint8), s)
            sel[r * n : r * n + m] = host.select_paged(
                np.ascontiguousarray(rows["block_tables"], np.int32), np.asarray(rows["positions"]),
                np.ascontiguousarray(q), np.ascontiguousarray(w), K, threads=threads,
            )  # fmt: skip
        topk = put(sel, NamedSharding(mesh, TABLES))
        x, latent = host_attend_jit(blk, cfg, mesh, x, proj, pos, slots, tables, cache.latent, topk, backend)
        new_caches[i] = DSACaches(latent, index)
    return lm_head_sharded(params, cfg, mesh, x), tuple(new_caches)


@functools.partial(jax.jit, static_argnames=("mesh",))
def replicated_argmax(logits: jax.Array, mesh: Mesh) -> jax.Array:
    """int32 `[T]`: each row's argmax (ties: the lowest id), replicated on every device (readable in
    every process)."""
    return jax.lax.with_sharding_constraint(jnp.argmax(logits, axis=-1).astype(jnp.int32), NamedSharding(mesh, P()))


@functools.partial(jax.jit, static_argnames=("mesh",))
def replicated_rows(logits: jax.Array, rows: jax.Array, mesh: Mesh) -> jax.Array:
    """float32 `[n, vocab]`: logits rows `rows` (int32 `[n]`, global indices), replicated on every device."""
    return jax.lax.with_sharding_constraint(logits[rows], NamedSharding(mesh, P()))

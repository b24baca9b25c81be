"""A small DSA causal language model in JAX, for the engine to drive (and to check against transformers).

`embed → N × [x + DSA-attention(RMSNorm(x)); x + MLP(RMSNorm(x))] → RMSNorm → LM head`, every layer's
attention a `dsa_attention`, its MLP a dense SwiGLU or, in the layers the config marks "sparse"
(`DSAConfig.layer_mlp_type`), the MoE block of `models.moe`. Weights come from a Hugging Face
`DeepseekV32ForCausalLM` / `GlmMoeDsaForCausalLM` checkpoint or are random. `forward` is pure and jit-able;
`generate_greedy` runs one sequence with paged caches (prefill, then one token per step).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np

from dsa_hybrid.layers import dsa_attention as layer_mod
from dsa_hybrid.layers.dsa_attention import DSACaches, DSAParams, dsa_attention, linear, rms_norm
from dsa_hybrid.models.checkpoint import load_layer_params as load_layer_params_from
from dsa_hybrid.models.checkpoint import load_tensors
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.models.moe import MoEParams, moe_block
from dsa_hybrid.ops.indexer import IndexerPages
from dsa_hybrid.ops.sparse_mla import Backend


@dataclasses.dataclass(frozen=True)
class BlockParams:
    """One decoder layer: its two norms, its attention and its MLP: a dense SwiGLU (`gate`, `up`, `down`;
    `moe` None) or the MoE block (`moe`; `gate`, `up`, `down` None)."""

    input_norm: jax.Array
    attn: DSAParams
    post_norm: jax.Array
    gate: jax.Array | None
    up: jax.Array | None
    down: jax.Array | None
    moe: MoEParams | None = None


jax.tree_util.register_dataclass(
    BlockParams, data_fields=["input_norm", "attn", "post_norm", "gate", "up", "down", "moe"], meta_fields=[]
)


@dataclasses.dataclass(frozen=True)
class ModelParams:
    embed: jax.Array  # [vocab, hidden]
    blocks: tuple[BlockParams, ...]
    norm: jax.Array  # [hidden]
    lm_head: jax.Array  # [vocab, hidden]

    @staticmethod
    def random(cfg: DSAConfig, seed: int = 0, std: float = 0.05) -> ModelParams:
        rng = np.random.default_rng(seed)
        d, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size

        def w(*shape: int) -> jax.Array:
            return jnp.asarray(std * rng.standard_normal(shape), jnp.float32)

        def norm() -> jax.Array:
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(d), jnp.float32)

        blocks = []
        for i in range(cfg.num_hidden_layers):
            attn = DSAParams.random(cfg, seed + 1 + i, std)
            if cfg.layer_indexer_type(i) == "shared":
                attn = attn.without_indexer()
            n1, n2 = norm(), norm()
            if cfg.layer_mlp_type(i) == "sparse":
                moe = MoEParams.random(cfg, seed + 1001 + i, std)
                blocks.append(BlockParams(n1, attn, n2, None, None, None, moe))
            else:
                blocks.append(BlockParams(n1, attn, n2, w(inter, d), w(inter, d), w(d, inter)))
        return ModelParams(w(vocab, d), tuple(blocks), norm(), w(vocab, d))

    @staticmethod
    def from_checkpoint(directory: str | os.PathLike[str], cfg: DSAConfig) -> ModelParams:
        """From a Hugging Face `DeepseekV32ForCausalLM` / `GlmMoeDsaForCausalLM` checkpoint directory
        (bf16 / fp32 / FP8, expanded to float32). MoE layers (`cfg.layer_mlp_type`) read `mlp.gate.*`,
        `mlp.experts.*` and `mlp.shared_experts.*` (`MoEParams.from_checkpoint`); "shared" indexer layers
        read no indexer tensors."""
        top = load_tensors(directory, ["model.embed_tokens.weight", "model.norm.weight"])
        try:
            head = load_tensors(directory, ["lm_head.weight"])["lm_head.weight"]
        except KeyError:
            head = top["model.embed_tokens.weight"]  # tied embeddings
        blocks = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            t = load_tensors(directory, [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"])
            n1, n2 = jnp.asarray(t[p + "input_layernorm.weight"]), jnp.asarray(t[p + "post_attention_layernorm.weight"])
            attn = load_layer_params_from(directory, cfg, i)
            if cfg.layer_mlp_type(i) == "sparse":
                blocks.append(BlockParams(n1, attn, n2, None, None, None, MoEParams.from_checkpoint(directory, cfg, i)))
                continue
            m = load_tensors(directory, [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")])
            gate, up, down = (jnp.asarray(m[p + f"mlp.{n}_proj.weight"]) for n in ("gate", "up", "down"))
            blocks.append(BlockParams(n1, attn, n2, gate, up, down))
        return ModelParams(
            jnp.asarray(top["model.embed_tokens.weight"]),
            tuple(blocks),
            jnp.asarray(top["model.norm.weight"]),
            jnp.asarray(head),
        )


jax.tree_util.register_dataclass(ModelParams, data_fields=["embed", "blocks", "norm", "lm_head"], meta_fields=[])


def create_caches(cfg: DSAConfig, num_pages: int, page_size: int = 64, **kw) -> tuple[DSACaches, ...]:
    """One `DSACaches` per layer, paged alike (`latent_kind`, `indexer` as in `DSACaches.create`)."""
    return tuple(DSACaches.create(cfg, num_pages, page_size, **kw) for _ in range(cfg.num_hidden_layers))


# One decoder layer's pieces around its attention, shared by `forward` and `forward_host` (jitted:
# inside `forward`'s own jit they simply inline).
@jax.jit
def embed(params: ModelParams, tokens: jax.Array) -> jax.Array:
    return params.embed[tokens]


@functools.partial(jax.jit, static_argnames=("cfg",))
def pre_norm(blk: BlockParams, cfg: DSAConfig, x: jax.Array) -> jax.Array:
    return rms_norm(x, blk.input_norm, cfg.rms_norm_eps)


@functools.partial(jax.jit, static_argnames=("cfg",))
def residual_mlp(blk: BlockParams, cfg: DSAConfig, x: jax.Array, attn_out: jax.Array) -> jax.Array:
    x = x + attn_out
    y = rms_norm(x, blk.post_norm, cfg.rms_norm_eps)
    if blk.moe is not None:
        return x + moe_block(blk.moe, cfg, y)
    assert blk.gate is not None and blk.up is not None and blk.down is not None
    return x + linear(jax.nn.silu(linear(y, blk.gate)) * linear(y, blk.up), blk.down)


@functools.partial(jax.jit, static_argnames=("cfg",))
def lm_head(params: ModelParams, cfg: DSAConfig, x: jax.Array) -> jax.Array:
    return linear(rms_norm(x, params.norm, cfg.rms_norm_eps), params.lm_head)


def forward(
    params: ModelParams,
    cfg: DSAConfig,
    tokens: jax.Array,
    positions: jax.Array,
    slots: jax.Array,
    block_tables: jax.Array,
    caches: tuple[DSACaches, ...],
    backend: Backend = "auto",
) -> tuple[jax.Array, tuple[DSACaches, ...]]:
    """Logits `[T, vocab]` of `T` new tokens (ids `[T]`; rows described as in `dsa_attention`) and the
    updated caches. GLM-5-style `"shared"` layers reuse the previous full layer's selection."""
    x = embed(params, tokens)
    new_caches: list[DSACaches] = []
    topk: jax.Array | None = None
    for i, (blk, cache) in enumerate(zip(params.blocks, caches, strict=True)):
        shared = topk if cfg.layer_indexer_type(i) == "shared" else None
        h, cache, topk = dsa_attention(
            blk.attn, cfg, pre_norm(blk, cfg, x), positions, slots, block_tables, cache,
            shared_topk=shared, backend=backend,
        )  # fmt: skip
        x = residual_mlp(blk, cfg, x, h)
        new_caches.append(cache)
    return lm_head(params, cfg, x), tuple(new_caches)


@functools.partial(jax.jit, static_argnames=("cfg", "backend"), donate_argnames=("caches",))
def forward_jit(params, cfg, tokens, positions, slots, block_tables, caches, backend="auto"):
    return forward(params, cfg, tokens, positions, slots, block_tables, caches, backend)


def generate_greedy(
    params: ModelParams,
    cfg: DSAConfig,
    prompt: list[int] | np.ndarray,
    max_new_tokens: int,
    *,
    page_size: int = 16,
    backend: Backend = "auto",
    **cache_kw,
) -> list[int]:
    """Greedy continuation of one sequence: one prefill call for the prompt, then one call per new token
    (the caches are paged; pages `0..` hold the sequence in order)."""
    prompt = [int(t) for t in prompt]
    total = len(prompt) + max_new_tokens
    n_pages = -(-total // page_size)
    caches = create_caches(cfg, n_pages, page_size, **cache_kw)
    table = jnp.arange(n_pages, dtype=jnp.int32)[None, :]
    pos = jnp.arange(len(prompt), dtype=jnp.int32)
    logits, caches = forward_jit(
        params, cfg, jnp.asarray(prompt, jnp.int32), pos, pos, jnp.repeat(table, len(prompt), 0), caches, backend
    )
    out = [int(jnp.argmax(logits[-1]))]
    for step in range(1, max_new_tokens):
        p = jnp.array([len(prompt) + step - 1], jnp.int32)
        logits, caches = forward_jit(params, cfg, jnp.array([out[-1]], jnp.int32), p, p, table, caches, backend)
        out.append(int(jnp.argmax(logits[-1])))
    return out


def padded_rows(n: int) -> int:
    """The row count a batch of `n` rows is padded to: the next power of two, so that only a few batch
    shapes are ever compiled (and a single decode row stays one row: at real widths the projections of
    padding rows cost as much as real ones)."""
    return 1 << (n - 1).bit_length()


def split_rows(seq_ids: np.ndarray, parts: int) -> list[slice]:
    """Contiguous row ranges of about equal size that never cut a sequence's rows apart (rows of one
    sequence must be contiguous). At most `parts` ranges, fewer when there are fewer sequences."""
    seq_ids = np.asarray(seq_ids)
    T = seq_ids.size
    starts = [0, *(np.flatnonzero(seq_ids[1:] != seq_ids[:-1]) + 1).tolist()]  # where each sequence begins

    def nearest_start(want: int) -> int:
        return min(starts, key=lambda s: abs(s - want))

    cuts = sorted({nearest_start(T * j // parts) for j in range(1, parts)} - {0})
    bounds = [0, *cuts, T]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def forward_host(
    params: ModelParams,
    cfg: DSAConfig,
    tokens: np.ndarray,
    positions: np.ndarray,
    slots: np.ndarray,
    block_tables: np.ndarray,
    caches: tuple[DSACaches, ...],
    host_caches: tuple,
    seq_ids: np.ndarray,
    backend: Backend = "auto",
    threads: int | None = None,
    micro_batches: int = 1,
) -> tuple[jax.Array, tuple[DSACaches, ...]]:
    """`forward` with every layer's indexer on the host: `host_caches` holds one `IndexerKeyCache` per
    layer (None for a layer that runs no indexer), paged like the device caches: each layer's new keys
    are written at the rows' `slots` and every row selects through its `block_tables` row
    (`dsa_attention.host_select_paged`; the host caches hold no sequences). The device FP8
    `IndexerPages` in `caches` are written with the same bytes. `seq_ids` int `[T]` names each row's
    sequence (a sequence's rows contiguous), only to split the rows into micro-batches. The caches passed
    in are consumed (updated in place); use the ones returned. Returns `(logits [T, vocab], caches)`.

    With `micro_batches` > 1 the rows are split into that many groups of whole sequences and pipelined:
    while the host selects for one group, the device computes the other's projections, attention and
    MLP (JAX dispatch is asynchronous and the Rust select releases the GIL)."""
    seq_ids = np.asarray(seq_ids, np.int64)
    tokens, positions = np.asarray(tokens, np.int32), np.asarray(positions, np.int32)
    slots, block_tables = np.asarray(slots, np.int32), np.asarray(block_tables, np.int32)
    groups = split_rows(seq_ids, max(1, micro_batches))

    def padded(a: np.ndarray, g: slice, fill: int) -> jax.Array:
        """Rows `g` of `a`, padded by `padded_rows`; padding rows write nothing (slot −1) and are never
        selected on the host."""
        n = g.stop - g.start
        pad = [(0, padded_rows(n) - n)] + [(0, 0)] * (a.ndim - 1)
        return jnp.asarray(np.pad(a[g], pad, constant_values=fill))

    pos = [padded(positions, g, 0) for g in groups]
    slot = [padded(slots, g, -1) for g in groups]
    table = [padded(block_tables, g, -1) for g in groups]
    xs = [embed(params, padded(tokens, g, 0)) for g in groups]
    layer_caches = list(caches)
    topk: list[jax.Array | None] = [None] * len(groups)

    def dispatch_projection(i: int, g: int) -> tuple:
        blk = params.blocks[i]
        h = pre_norm(blk, cfg, xs[g])
        if cfg.layer_indexer_type(i) == "shared":
            return layer_mod.project_jit(blk.attn, cfg, h, pos[g]), None, None
        proj, codes, scales, index = layer_mod.project_write_keys_donated(
            blk.attn, cfg, h, pos[g], slot[g], layer_caches[i].index
        )
        layer_caches[i] = dataclasses.replace(layer_caches[i], index=index)
        return proj, codes, scales

    # Group g's layer i+1 projections are dispatched right after its layer i attention, so the device
    # always has the other group's work queued while the host selects.
    pending = [dispatch_projection(0, g) for g in range(len(groups))]
    for i, blk in enumerate(params.blocks):
        shared = cfg.layer_indexer_type(i) == "shared"
        for g, rows in enumerate(groups):
            proj, codes, scales = pending[g]
            if not shared:
                n = rows.stop - rows.start
                sel = layer_mod.host_select_paged(
                    host_caches[i], block_tables[rows], slots[rows], codes, scales, proj, positions[rows],
                    cfg.index_topk, threads,
                )  # fmt: skip
                topk[g] = jnp.asarray(np.pad(sel, ((0, proj.q_abs.shape[0] - n), (0, 0)), constant_values=-1))
            out, latent = layer_mod.attend_donated(
                blk.attn, cfg, proj, slot[g], table[g], layer_caches[i].latent, topk[g], backend,
                None if shared else pos[g],
            )  # fmt: skip
            layer_caches[i] = dataclasses.replace(layer_caches[i], latent=latent)
            xs[g] = residual_mlp(blk, cfg, xs[g], out)
            if i + 1 < len(params.blocks):
                pending[g] = dispatch_projection(i + 1, g)
    logits = [lm_head(params, cfg, x)[: g.stop - g.start] for x, g in zip(xs, groups, strict=True)]
    return (logits[0] if len(logits) == 1 else jnp.concatenate(logits)), tuple(layer_caches)


@jax.jit
def new_index_rows(caches: tuple[DSACaches, ...], slots: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The FP8 codes `[layers, T, D]` and scales `[layers, T]` at `slots` of every layer's device
    `IndexerPages` (layers without an indexer included, unused): what a device step wrote, for the host
    caches to store at the same slots (`IndexerKeyCache.write_slots`) so that both stay identical."""
    safe = jnp.maximum(slots, 0)
    pages = [cast(IndexerPages, c.index) for c in caches]  # the FP8 device pages (what the host mirrors)
    codes = jnp.stack([p.codes.reshape(-1, p.head_dim)[safe] for p in pages])
    scales = jnp.stack([p.scales.reshape(-1)[safe] for p in pages])
    return codes, scales

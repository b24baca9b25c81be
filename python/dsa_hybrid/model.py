"""A small DSA causal language model in JAX, for the engine to drive (and to check against transformers).

`embed → N × [x + DSA-attention(RMSNorm(x)); x + SwiGLU-MLP(RMSNorm(x))] → RMSNorm → LM head`, every
layer's attention a `dsa_attention`, its MLP dense (DeepSeek-V3.2 checkpoints whose layers are all
dense, `first_k_dense_replace ≥ num_hidden_layers`; MoE layers are not supported yet). Weights come
from a Hugging Face `DeepseekV32ForCausalLM` checkpoint or are random. `forward` is pure and jit-able;
`generate_greedy` runs one sequence with paged caches (prefill, then one token per step).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from .checkpoint import load_layer_params as load_layer_params_from
from .checkpoint import load_tensors
from .config import DSAConfig
from .layer import DSACaches, DSAParams, _linear, _rms_norm, dsa_attention


@dataclasses.dataclass(frozen=True)
class BlockParams:
    """One decoder layer: its two norms, its attention and its dense SwiGLU MLP."""

    input_norm: jax.Array
    attn: DSAParams
    post_norm: jax.Array
    gate: jax.Array
    up: jax.Array
    down: jax.Array


jax.tree_util.register_dataclass(
    BlockParams, data_fields=["input_norm", "attn", "post_norm", "gate", "up", "down"], meta_fields=[]
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

        blocks = tuple(
            BlockParams(norm(), DSAParams.random(cfg, seed + 1 + i, std), norm(), w(inter, d), w(inter, d), w(d, inter))
            for i in range(cfg.num_hidden_layers)
        )
        return ModelParams(w(vocab, d), blocks, norm(), w(vocab, d))

    @staticmethod
    def from_checkpoint(directory: str | os.PathLike[str], cfg: DSAConfig) -> ModelParams:
        """From a Hugging Face `DeepseekV32ForCausalLM` checkpoint directory (bf16 / fp32 / FP8)."""
        if cfg.first_k_dense_replace < cfg.num_hidden_layers:
            raise NotImplementedError(
                f"layers {cfg.first_k_dense_replace}..{cfg.num_hidden_layers - 1} are MoE layers: not supported yet "
                "(only checkpoints whose layers are all dense, first_k_dense_replace >= num_hidden_layers)"
            )
        top = load_tensors(directory, ["model.embed_tokens.weight", "model.norm.weight"])
        try:
            head = load_tensors(directory, ["lm_head.weight"])["lm_head.weight"]
        except KeyError:
            head = top["model.embed_tokens.weight"]  # tied embeddings
        blocks = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            t = load_tensors(
                directory,
                [p + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                                 "mlp.up_proj.weight", "mlp.down_proj.weight")],
            )  # fmt: skip
            blocks.append(
                BlockParams(
                    jnp.asarray(t[p + "input_layernorm.weight"]),
                    load_layer_params_from(directory, cfg, i),
                    jnp.asarray(t[p + "post_attention_layernorm.weight"]),
                    jnp.asarray(t[p + "mlp.gate_proj.weight"]),
                    jnp.asarray(t[p + "mlp.up_proj.weight"]),
                    jnp.asarray(t[p + "mlp.down_proj.weight"]),
                )
            )
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
def _embed(params: ModelParams, tokens: jax.Array) -> jax.Array:
    return params.embed[tokens]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _pre_norm(blk: BlockParams, cfg: DSAConfig, x: jax.Array) -> jax.Array:
    return _rms_norm(x, blk.input_norm, cfg.rms_norm_eps)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _residual_mlp(blk: BlockParams, cfg: DSAConfig, x: jax.Array, attn_out: jax.Array) -> jax.Array:
    x = x + attn_out
    y = _rms_norm(x, blk.post_norm, cfg.rms_norm_eps)
    return x + _linear(jax.nn.silu(_linear(y, blk.gate)) * _linear(y, blk.up), blk.down)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _head(params: ModelParams, cfg: DSAConfig, x: jax.Array) -> jax.Array:
    return _linear(_rms_norm(x, params.norm, cfg.rms_norm_eps), params.lm_head)


def forward(
    params: ModelParams,
    cfg: DSAConfig,
    tokens: jax.Array,
    positions: jax.Array,
    slots: jax.Array,
    block_tables: jax.Array,
    caches: tuple[DSACaches, ...],
    backend: str = "auto",
) -> tuple[jax.Array, tuple[DSACaches, ...]]:
    """Logits `[T, vocab]` of `T` new tokens (ids `[T]`; rows described as in `dsa_attention`) and the
    updated caches. GLM-5-style `"shared"` layers reuse the previous full layer's selection."""
    x = _embed(params, tokens)
    new_caches, topk = [], None
    for i, (blk, cache) in enumerate(zip(params.blocks, caches, strict=True)):
        shared = topk if cfg.layer_indexer_type(i) == "shared" else None
        h, cache, topk = dsa_attention(
            blk.attn, cfg, _pre_norm(blk, cfg, x), positions, slots, block_tables, cache,
            shared_topk=shared, backend=backend,
        )  # fmt: skip
        x = _residual_mlp(blk, cfg, x, h)
        new_caches.append(cache)
    return _head(params, cfg, x), tuple(new_caches)


@functools.partial(jax.jit, static_argnames=("cfg", "backend"), donate_argnames=("caches",))
def _forward_jit(params, cfg, tokens, positions, slots, block_tables, caches, backend="auto"):
    return forward(params, cfg, tokens, positions, slots, block_tables, caches, backend)


def generate_greedy(
    params: ModelParams,
    cfg: DSAConfig,
    prompt: list[int] | np.ndarray,
    max_new_tokens: int,
    *,
    page_size: int = 16,
    backend: str = "auto",
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
    logits, caches = _forward_jit(
        params, cfg, jnp.asarray(prompt, jnp.int32), pos, pos, jnp.repeat(table, len(prompt), 0), caches, backend
    )
    out = [int(jnp.argmax(logits[-1]))]
    for step in range(1, max_new_tokens):
        p = jnp.array([len(prompt) + step - 1], jnp.int32)
        logits, caches = _forward_jit(params, cfg, jnp.array([out[-1]], jnp.int32), p, p, table, caches, backend)
        out.append(int(jnp.argmax(logits[-1])))
    return out


def forward_host(
    params: ModelParams,
    cfg: DSAConfig,
    tokens: jax.Array,
    positions: jax.Array,
    slots: jax.Array,
    block_tables: jax.Array,
    latents: tuple,
    host_caches: tuple,
    seq_ids: np.ndarray,
    backend: str = "auto",
    threads: int | None = None,
) -> tuple[jax.Array, tuple]:
    """`forward` with every layer's indexer on the host: `host_caches` holds one `IndexerKeyCache` per
    layer, with the rows' sequences (`seq_ids`) in it (see `dsa_attention_host`). Returns `(logits,
    latents)`."""
    from .layer import dsa_attention_host

    x = _embed(params, tokens)
    new_latents, topk = [], None
    for i, (blk, latent, host) in enumerate(zip(params.blocks, latents, host_caches, strict=True)):
        shared = topk if cfg.layer_indexer_type(i) == "shared" else None
        out, latent, topk = dsa_attention_host(
            blk.attn, cfg, _pre_norm(blk, cfg, x), positions, slots, block_tables, latent, host, seq_ids,
            shared_topk=shared, backend=backend, threads=threads,
        )  # fmt: skip
        x = _residual_mlp(blk, cfg, x, out)
        new_latents.append(latent)
    return _head(params, cfg, x), tuple(new_latents)

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
import logging
import os
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
import numpy as np

from dsa_hybrid.layers import dsa_attention as layer_mod
from dsa_hybrid.layers.dsa_attention import (
    NORM_PARAMS,
    DSACaches,
    DSAParams,
    dsa_attention,
    linear,
    resident_weight,
    rms_norm,
)
from dsa_hybrid.layers.weights import Fp8Weight, Weight, dense, quantize_fp8_blocks, tree_nbytes, weight_format
from dsa_hybrid.models.checkpoint import Checkpoint, LoadProgress
from dsa_hybrid.models.checkpoint import load_layer_params as load_layer_params_from
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
    gate: Weight | None
    up: Weight | None
    down: Weight | None
    moe: MoEParams | None = None


jax.tree_util.register_dataclass(
    BlockParams, data_fields=["input_norm", "attn", "post_norm", "gate", "up", "down", "moe"], meta_fields=[]
)


WeightsMode = Literal["auto", "checkpoint", "float32"]
_log = logging.getLogger("dsa_hybrid.models")


def default_weights_mode(backend: str | None = None) -> Literal["checkpoint", "float32"]:
    """What `weights="auto"` means on `backend` (default: JAX's default backend): "checkpoint" (bf16 /
    FP8 weights stay as stored, widened inside each matmul) everywhere except CPU, where XLA widens a
    bf16 or FP8 weight on every call at a cost measured in docs/models.md, so "float32" is kept there."""
    backend = backend or jax.default_backend()
    return "float32" if backend == "cpu" else "checkpoint"


@dataclasses.dataclass(frozen=True)
class ModelParams:
    """All weights of the causal LM (a pytree). Norms are float32; `embed` `[vocab, hidden]` is float32
    or bfloat16; every linear weight (`lm_head` `[vocab, hidden]`, the attention's, the MLPs') is a
    float32 / bfloat16 array or an `Fp8Weight`, as loaded (`from_checkpoint(weights=...)`)."""

    embed: jax.Array  # [vocab, hidden]
    blocks: tuple[BlockParams, ...]
    norm: jax.Array  # [hidden]
    lm_head: Weight  # [vocab, hidden]

    @staticmethod
    def random(cfg: DSAConfig, seed: int = 0, std: float = 0.05) -> ModelParams:
        """Random float32 weights of the right shapes (see `with_weight_format` for bf16 / FP8 ones)."""
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
    def from_checkpoint(
        directory: str | os.PathLike[str],
        cfg: DSAConfig,
        *,
        weights: WeightsMode = "auto",
        progress: bool | None = None,
    ) -> ModelParams:
        """From a Hugging Face `DeepseekV32ForCausalLM` / `GlmMoeDsaForCausalLM` checkpoint directory
        (one `*.safetensors` file or shards listed by `model.safetensors.index.json`; fp32, bf16 or FP8
        with 128 × 128 `weight_scale_inv` blocks), read lazily: files are memory-mapped and one layer at a
        time is read and placed on the device.

        weights: "checkpoint" keeps each weight as stored (bf16 stays bf16, FP8 stays `Fp8Weight`; norms
            float32), "float32" widens them all, "auto" (default) is `default_weights_mode()`: checkpoint
            format on TPU / GPU, float32 on CPU.
        progress: a progress bar on stderr; None (default) shows it only when stderr is a terminal.

        MoE layers (`cfg.layer_mlp_type`) read `mlp.gate.*`, `mlp.experts.*` and `mlp.shared_experts.*`
        (`MoEParams.from_checkpoint`); "shared" indexer layers read no indexer tensors; MTP / next-n
        layers (`model.layers.{n}.*` for n >= num_hidden_layers) are skipped with a one-line log message
        (logger `dsa_hybrid.models`). Missing or misshapen tensors raise errors naming them; a malformed
        file raises `CheckpointError`."""
        if weights not in ("auto", "checkpoint", "float32"):
            raise ValueError(f"weights: expected 'auto', 'checkpoint' or 'float32', got {weights!r}")
        mode = default_weights_mode() if weights == "auto" else weights
        ckpt = Checkpoint(directory)
        extra = ckpt.layers_beyond(cfg.num_hidden_layers)
        if extra:
            _log.warning(
                "%s: skipping %d MTP / next-n layer(s) (model.layers.%s.*; num_nextn_predict_layers=%d): "
                "not used for generation", ckpt.directory, len(extra), ",".join(map(str, extra)),
                cfg.num_nextn_predict_layers,
            )  # fmt: skip
        bar = LoadProgress(cfg.num_hidden_layers + 1, progress)

        def norm(name: str) -> jax.Array:
            return jnp.asarray(ckpt.weight(name, "float32"))

        embed = resident_weight(ckpt.weight("model.embed_tokens.weight", mode), mode)
        if isinstance(embed, Fp8Weight):
            embed = dense(embed)  # an FP8 embedding (none is released) is looked up as float32
        head = embed if "lm_head.weight" not in ckpt else resident_weight(ckpt.weight("lm_head.weight", mode), mode)
        blocks = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            n1, n2 = norm(p + "input_layernorm.weight"), norm(p + "post_attention_layernorm.weight")
            attn = load_layer_params_from(ckpt, cfg, i, weights=mode)
            if cfg.layer_mlp_type(i) == "sparse":
                moe = MoEParams.from_checkpoint(ckpt, cfg, i, weights=mode)
                blocks.append(BlockParams(n1, attn, n2, None, None, None, moe))
            else:
                mlp = [
                    resident_weight(ckpt.weight(p + f"mlp.{n}_proj.weight", mode), mode) for n in ("gate", "up", "down")
                ]
                d, inter = cfg.hidden_size, cfg.intermediate_size
                for n, w, shape in zip(("gate", "up", "down"), mlp, ((inter, d), (inter, d), (d, inter)), strict=True):
                    if tuple(w.shape) != shape:
                        raise ValueError(f"{p}mlp.{n}_proj.weight: expected shape {list(shape)}, got {list(w.shape)}")
                blocks.append(BlockParams(n1, attn, n2, mlp[0], mlp[1], mlp[2]))
            bar.step(tree_nbytes(blocks[-1]))
        params = ModelParams(embed, tuple(blocks), norm("model.norm.weight"), head)
        if tuple(params.embed.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise ValueError(
                f"model.embed_tokens.weight: expected shape {[cfg.vocab_size, cfg.hidden_size]}, "
                f"got {list(params.embed.shape)}"
            )
        bar.step(tree_nbytes((embed, head)))
        return params

    def state_dict(self) -> dict[str, np.ndarray]:
        """The model's Hugging Face tensors (transformers' names, per-expert MoE layout, float32 numpy;
        FP8 weights dequantized): what `write_safetensors` turns into a checkpoint."""
        out = {
            "model.embed_tokens.weight": np.asarray(dense(self.embed)),
            "model.norm.weight": np.asarray(self.norm),
            "lm_head.weight": np.asarray(dense(self.lm_head)),
        }
        for i, blk in enumerate(self.blocks):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = np.asarray(blk.input_norm)
            out[p + "post_attention_layernorm.weight"] = np.asarray(blk.post_norm)
            out.update(blk.attn.state_dict(i))
            if blk.moe is not None:
                out.update(blk.moe.state_dict(i))
            for n, w in (("gate", blk.gate), ("up", blk.up), ("down", blk.down)):
                if w is not None:
                    out[f"{p}mlp.{n}_proj.weight"] = np.asarray(dense(w))
        return out

    @property
    def nbytes(self) -> int:
        """Resident bytes of all weights (an array shared by two fields, tied embeddings, counted once)."""
        return tree_nbytes(self)

    def weight_formats(self) -> dict[str, int]:
        """Resident bytes per weight format ("float32", "bfloat16", "fp8"; norms count as float32)."""
        out: dict[str, int] = {}
        seen: set[int] = set()
        for leaf in jax.tree.leaves(self, is_leaf=lambda x: isinstance(x, Fp8Weight)):
            if id(leaf) in seen:
                continue
            seen.add(id(leaf))
            fmt = weight_format(leaf)
            out[fmt] = out.get(fmt, 0) + int(leaf.nbytes)
        return out

    def with_weight_format(self, fmt: Literal["float32", "bfloat16", "fp8"]) -> ModelParams:
        """The same model with every linear weight converted to `fmt` (FP8: 128 × 128 block quantized as
        DeepSeek's checkpoints are; the embedding and LM head at most bf16, the router and norms
        unchanged): for benchmarks and tests of the resident formats."""
        if fmt not in ("float32", "bfloat16", "fp8"):
            raise ValueError(f"fmt: expected 'float32', 'bfloat16' or 'fp8', got {fmt!r}")

        def conv(w: Any, allow_fp8: bool = True) -> Any:
            if w is None:
                return None
            f = fmt if allow_fp8 or fmt != "fp8" else "bfloat16"
            v = dense(w)
            if f == "float32":
                return v
            if f == "bfloat16":
                return v.astype(jnp.bfloat16)
            codes, scale = quantize_fp8_blocks(np.asarray(v))
            return Fp8Weight(jnp.asarray(codes), jnp.asarray(scale))

        def attn(a: DSAParams) -> DSAParams:
            changes = {
                f.name: conv(getattr(a, f.name))
                for f in dataclasses.fields(a)
                if f.name not in NORM_PARAMS and getattr(a, f.name) is not None
            }
            return dataclasses.replace(a, **changes)

        def moe(m: MoEParams | None) -> MoEParams | None:
            if m is None:
                return None
            return dataclasses.replace(
                m, gate=conv(m.gate), up=conv(m.up), down=conv(m.down), shared_gate=conv(m.shared_gate),
                shared_up=conv(m.shared_up), shared_down=conv(m.shared_down),
            )  # fmt: skip

        blocks = tuple(
            dataclasses.replace(
                b, attn=attn(b.attn), gate=conv(b.gate), up=conv(b.up), down=conv(b.down), moe=moe(b.moe)
            )
            for b in self.blocks
        )
        return ModelParams(conv(self.embed, False), blocks, self.norm, conv(self.lm_head, False))


def checkpoint_nbytes(directory: str | os.PathLike[str], cfg: DSAConfig) -> int:
    """Bytes of the tensors a checkpoint stores for the model `cfg` describes (its MTP / next-n layers
    left out): what `ModelParams.nbytes` is compared against."""
    ckpt = Checkpoint(directory)
    extra = tuple(f"model.layers.{n}." for n in ckpt.layers_beyond(cfg.num_hidden_layers))
    return sum(ckpt.nbytes(n) for n in ckpt.index if not n.startswith(extra))


jax.tree_util.register_dataclass(ModelParams, data_fields=["embed", "blocks", "norm", "lm_head"], meta_fields=[])


def create_caches(cfg: DSAConfig, num_pages: int, page_size: int = 64, **kw) -> tuple[DSACaches, ...]:
    """One `DSACaches` per layer, paged alike (`latent_kind`, `indexer` as in `DSACaches.create`)."""
    return tuple(DSACaches.create(cfg, num_pages, page_size, **kw) for _ in range(cfg.num_hidden_layers))


# One decoder layer's pieces around its attention, shared by `forward` and `forward_host` (jitted:
# inside `forward`'s own jit they simply inline).
@jax.jit
def embed(params: ModelParams, tokens: jax.Array) -> jax.Array:
    return params.embed[tokens].astype(jnp.float32)


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
    updated caches. GLM-5-style `"shared"` layers reuse the previous full layer's selection. TypeError /
    ValueError naming the argument for misshapen rows or a wrong number of caches; token ids outside
    `[0, vocab_size)` are refused when `tokens` is concrete (under `jit` their values are not known: check
    them before, as `Engine.add_request` does)."""
    _check_tokens(cfg, tokens, caches)
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


def _check_tokens(cfg: DSAConfig, tokens: Any, caches: Any) -> None:
    """`forward`'s own arguments (the rows' positions, slots and tables are checked by each layer)."""
    if not (hasattr(tokens, "shape") and hasattr(tokens, "dtype")):
        raise TypeError(f"tokens: expected an integer array [T], got {type(tokens).__name__}")
    if tokens.ndim != 1 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens: expected integers of shape [T], got {tokens.dtype} {list(tokens.shape)}")
    if not isinstance(caches, (tuple, list)) or len(caches) != cfg.num_hidden_layers:
        got = len(caches) if isinstance(caches, (tuple, list)) else type(caches).__name__
        raise ValueError(f"caches: expected one DSACaches per layer ({cfg.num_hidden_layers}), got {got}")
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"tokens: ids must lie in [0, {cfg.vocab_size}), got {lo if lo < 0 else hi}")


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
    (the caches are paged; pages `0..` hold the sequence in order). Returns the `max_new_tokens` new ids.
    ValueError / TypeError naming the argument for an empty prompt, ids that are not integers or lie
    outside the vocabulary, `max_new_tokens < 1` or `page_size < 1`."""
    arr = np.asarray(prompt)
    if arr.ndim != 1 or arr.size == 0 or not (np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_):
        raise TypeError(f"prompt: expected a non-empty 1-D sequence of integer ids, got {arr.dtype} {list(arr.shape)}")
    if arr.min() < 0 or arr.max() >= cfg.vocab_size:
        raise ValueError(f"prompt: token ids must lie in [0, {cfg.vocab_size}), got {arr.min()}..{arr.max()}")
    for name, value in (("max_new_tokens", max_new_tokens), ("page_size", page_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    prompt = arr.tolist()
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


@dataclasses.dataclass(frozen=True)
class StepLogits:
    """A step's logits as the device returns them: per row group (`forward_host`'s micro-batches; one group
    for a device step) the padded logits (`padded_rows`) and their argmax, computed on the device, so a
    greedy step moves one int32 per row to the host and only the rows that draw move whole.

    `logits[g]` float32 `[P_g, vocab]` and `argmax[g]` int32 `[P_g]` hold group `g`'s `rows[g]` real rows
    first (rows past them are padding); the groups are consecutive row ranges of the step."""

    logits: tuple[jax.Array, ...]
    argmax: tuple[jax.Array, ...]
    rows: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        return sum(self.rows)

    def greedy(self) -> np.ndarray:
        """int32 `[T]`: the argmax of every real row (ties to the lowest id)."""
        parts = [np.asarray(a)[:n] for a, n in zip(self.argmax, self.rows, strict=True)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 `[len(rows), vocab]`: the logits of the real rows `rows` (int, step row numbers)."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((rows.size, self.logits[0].shape[-1]), np.float32)
        first = 0
        for lg, n in zip(self.logits, self.rows, strict=True):
            mine = (rows >= first) & (rows < first + n)
            if mine.any():
                out[mine] = np.asarray(lg[np.asarray(rows[mine] - first, np.int32)])
            first += n
        return out

    def dense(self) -> jax.Array:
        """float32 `[T, vocab]`: the real rows' logits, in row order (one device array)."""
        parts = [lg if lg.shape[0] == n else lg[:n] for lg, n in zip(self.logits, self.rows, strict=True)]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts)

    def block_until_ready(self) -> StepLogits:
        jax.block_until_ready((self.logits, self.argmax))
        return self


@jax.jit
def greedy_rows(logits: jax.Array) -> jax.Array:
    """int32 `[T]` argmax of each row of `logits` `[T, vocab]` (ties to the lowest id), jitted."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def padded_rows(n: int) -> int:
    """The row count a batch of `n` rows is padded to: the next power of two, so that only a few batch
    shapes are ever compiled (and a single decode row stays one row: at real widths the projections of
    padding rows cost as much as real ones)."""
    return 1 << (n - 1).bit_length()


def pad_rows(a: np.ndarray, rows: int, fill: int) -> np.ndarray:
    """`a` (numpy, rows on axis 0) with `rows - len(a)` rows of `fill` appended (`a` itself when none)."""
    n = a.shape[0]
    if n == rows:
        return a
    out = np.full((rows, *a.shape[1:]), fill, a.dtype)
    out[:n] = a
    return out


def split_rows(seq_ids: np.ndarray, parts: int) -> list[slice]:
    """Contiguous row ranges of about equal size that never cut a sequence's rows apart (rows of one
    sequence must be contiguous). At most `parts` ranges, fewer when there are fewer sequences."""
    seq_ids = np.asarray(seq_ids)
    T = seq_ids.size
    if parts <= 1 or T == 0 or seq_ids[0] == seq_ids[-1]:  # one range (one sequence: never cut)
        return [slice(0, T)] if T else []
    starts = [0, *(np.flatnonzero(seq_ids[1:] != seq_ids[:-1]) + 1).tolist()]  # where each sequence begins

    def nearest_start(want: int) -> int:
        return min(starts, key=lambda s: abs(s - want))

    cuts = sorted({nearest_start(T * j // parts) for j in range(1, parts)} - {0})
    bounds = [0, *cuts, T]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


# ----- the host placement's device halves, fused -------------------------------------------------------
# A host step runs, per layer, the host's selection (and, on a float32 CPU latent cache, the host's
# attention) between two device programs. Everything between two host calls is one jitted program: the
# embedding and layer 0's projections; then per layer its attention output (or the device attention),
# residual and MLP together with the next layer's norm, projections and cache writes; after the last layer
# the final norm, the LM head and the argmax. So a step dispatches `layers + 1` programs, and its row
# arrays go in as numpy (jit moves them; no `jnp.asarray` per array).


def project_stage(
    blk: BlockParams,
    cfg: DSAConfig,
    x: jax.Array,
    positions: jax.Array,
    slots: jax.Array,
    cache: DSACaches,
    write_keys: bool,
    write_latent: bool,
) -> tuple[layer_mod.Projections, jax.Array | None, jax.Array | None, DSACaches]:
    """A layer's start in a host step: pre-norm of `x` `[P, hidden]`, the projections, the new indexer
    keys quantized once and written to the device pages (`write_keys`: the same bytes then go to the host
    cache) and the new latent rows written (`write_latent`: when the host attends, it reads them there).
    Returns `(projections, FP8 codes [P, D_I] | None, scales [P] | None, the layer's caches)`."""
    h = rms_norm(x, blk.input_norm, cfg.rms_norm_eps)
    index: Any = cache.index
    codes = scales = None
    if write_keys:
        proj, codes, scales, index = layer_mod.project_write_keys(blk.attn, cfg, h, positions, slots, index)
    else:
        proj = layer_mod.project(blk.attn, cfg, h, positions)
    latent = layer_mod.write_latent(cache.latent, slots, proj) if write_latent else cache.latent
    return proj, codes, scales, DSACaches(latent, index)


def _stage_end(
    blk: BlockParams,
    cfg: DSAConfig,
    x: jax.Array,
    attn_out: jax.Array,
    nxt: BlockParams | None,
    next_cache: DSACaches | None,
    head: tuple[jax.Array, Weight] | None,
    positions: jax.Array,
    slots: jax.Array,
    write_keys: bool,
    write_latent: bool,
) -> tuple[jax.Array, tuple]:
    x = residual_mlp(blk, cfg, x, attn_out)
    if nxt is not None:
        assert next_cache is not None
        return x, project_stage(nxt, cfg, x, positions, slots, next_cache, write_keys, write_latent)
    assert head is not None
    norm, lm_w = head
    logits = linear(rms_norm(x, norm, cfg.rms_norm_eps), lm_w)
    return x, (logits, jnp.argmax(logits, axis=-1).astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("cfg", "write_keys", "write_latent"), donate_argnames=("cache",))
def host_step_first(
    embed_w: jax.Array,
    blk: BlockParams,
    cfg: DSAConfig,
    tokens: jax.Array,
    positions: jax.Array,
    slots: jax.Array,
    cache: DSACaches,
    write_keys: bool = True,
    write_latent: bool = True,
) -> tuple:
    """A host step's first program: the embedding of `tokens` `[P]` and layer 0's `project_stage` (its
    caches donated). Returns `(x [P, hidden], projections, codes, scales, caches)`."""
    x = embed_w[tokens].astype(jnp.float32)
    return (x, *project_stage(blk, cfg, x, positions, slots, cache, write_keys, write_latent))


@functools.partial(jax.jit, static_argnames=("cfg", "write_keys", "write_latent"), donate_argnames=("next_cache",))
def host_step_next(
    blk: BlockParams,
    cfg: DSAConfig,
    x: jax.Array,
    o_lat: jax.Array,
    nxt: BlockParams | None,
    next_cache: DSACaches | None,
    head: tuple[jax.Array, Weight] | None,
    positions: jax.Array,
    slots: jax.Array,
    write_keys: bool = True,
    write_latent: bool = True,
) -> tuple:
    """After the host attended layer `blk` (`o_lat` float32 `[P, h, kv_lora_rank]`): its output projection,
    residual and MLP, then the next layer's `project_stage` (`nxt`, its caches donated) or, after the last
    layer (`nxt` None, `head` = (final norm, LM head)), the logits and their argmax. Returns `(x, stage)`:
    `stage` is `(projections, codes, scales, caches)` or `(logits [P, vocab], argmax int32 [P])`."""
    out = layer_mod.output_projection(blk.attn, cfg, o_lat)
    return _stage_end(blk, cfg, x, out, nxt, next_cache, head, positions, slots, write_keys, write_latent)


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "backend", "write_keys", "write_latent"),
    donate_argnames=("latent", "next_cache"),
)
def host_step_attend_next(
    blk: BlockParams,
    cfg: DSAConfig,
    x: jax.Array,
    proj: layer_mod.Projections,
    block_tables: jax.Array,
    latent: Any,
    topk: jax.Array,
    prefix_positions: jax.Array | None,
    nxt: BlockParams | None,
    next_cache: DSACaches | None,
    head: tuple[jax.Array, Weight] | None,
    positions: jax.Array,
    slots: jax.Array,
    backend: Backend = "auto",
    write_keys: bool = True,
    write_latent: bool = True,
) -> tuple:
    """`host_step_next` with the attention on the device (`dsa_attention.attend` over the host's `topk`
    positions, the latent cache donated). Returns `(x, latent, stage)`."""
    out, latent = layer_mod.attend(blk.attn, cfg, proj, slots, block_tables, latent, topk, backend, prefix_positions)
    x, stage = _stage_end(blk, cfg, x, out, nxt, next_cache, head, positions, slots, write_keys, write_latent)
    return x, latent, stage


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
    host_attention: bool | None = None,
) -> tuple[jax.Array, tuple[DSACaches, ...]]:
    """`forward` with every layer's indexer on the host: `host_caches` holds one `IndexerKeyCache` per
    layer (None for a layer that runs no indexer), paged like the device caches: each layer's new keys
    are written at the rows' `slots` and every row selects through its `block_tables` row
    (`dsa_attention.host_select_paged`; the host caches hold no sequences). The device FP8
    `IndexerPages` in `caches` are written with the same bytes. `seq_ids` int `[T]` names each row's
    sequence (a sequence's rows contiguous), only to split the rows into micro-batches. The caches passed
    in are consumed (updated in place); use the ones returned. Returns `(logits [T, vocab], caches)`
    (`forward_host_step` returns the logits as the device holds them, with each row's argmax).

    With `micro_batches` > 1 the rows are split into that many groups of whole sequences and pipelined:
    while the host selects for one group, the device computes the other's projections, attention and
    MLP (JAX dispatch is asynchronous and the Rust select releases the GIL).

    Sparse MLA runs in the Rust core as well (the fused CPU kernel `host.attention.sparse_mla_host` on
    `threads` workers, reading the latent cache in place, as `dsa_attention.attend_host` does) when
    `host_attention` allows it (`dsa_attention.use_host_attention`: by default whenever the latent caches
    are float32 in CPU memory, the engine's CPU default); otherwise the device attends (`attend`,
    `backend`). Between two host calls the device runs one jitted program (`host_step_first`,
    `host_step_next`, `host_step_attend_next`)."""
    out, new_caches = forward_host_step(
        params, cfg, tokens, positions, slots, block_tables, caches, host_caches, seq_ids, backend, threads,
        micro_batches, host_attention,
    )  # fmt: skip
    return out.dense(), new_caches


def forward_host_step(
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
    host_attention: bool | None = None,
) -> tuple[StepLogits, tuple[DSACaches, ...]]:
    """`forward_host` (same arguments), returning the logits as a `StepLogits` (per micro-batch, padded,
    with the argmax of every row computed on the device): what the engine's runner samples from."""
    seq_ids = np.asarray(seq_ids, np.int64)
    tokens, positions = np.ascontiguousarray(tokens, np.int32), np.ascontiguousarray(positions, np.int32)
    slots, block_tables = np.ascontiguousarray(slots, np.int32), np.ascontiguousarray(block_tables, np.int32)
    T = tokens.shape[0]
    if not (positions.shape == slots.shape == (T,) and block_tables.ndim == 2 and block_tables.shape[0] == T):
        raise ValueError(
            f"tokens, positions, slots, block_tables: expected [T], [T], [T], [T, W] for T = {T}, got "
            f"{list(positions.shape)}, {list(slots.shape)}, {list(block_tables.shape)}"
        )
    if seq_ids.shape != (T,):
        raise ValueError(f"seq_ids: expected shape [{T}], got {list(seq_ids.shape)}")
    if not isinstance(caches, (tuple, list)) or len(caches) != cfg.num_hidden_layers:
        raise ValueError(f"caches: expected one DSACaches per layer ({cfg.num_hidden_layers})")
    if T and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
        bad = tokens.min() if tokens.min() < 0 else tokens.max()
        raise ValueError(f"tokens: ids must lie in [0, {cfg.vocab_size}), got {bad}")
    groups = split_rows(seq_ids, max(1, micro_batches))
    n_layers = len(params.blocks)
    shared = [cfg.layer_indexer_type(i) == "shared" for i in range(n_layers)]
    if shared and shared[0]:
        raise ValueError("forward_host: the first layer must run an indexer (a 'shared' layer reuses the one before)")
    on_host = [layer_mod.use_host_attention(c.latent, backend, host_attention) for c in caches]
    as_slots = all(on_host)  # the host's selection as cache slots: what the host attention reads
    head = (params.norm, params.lm_head)
    P = [padded_rows(g.stop - g.start) for g in groups]
    tok = [pad_rows(tokens[g], p, 0) for g, p in zip(groups, P, strict=True)]
    pos = [pad_rows(positions[g], p, 0) for g, p in zip(groups, P, strict=True)]
    slot = [pad_rows(slots[g], p, -1) for g, p in zip(groups, P, strict=True)]
    table = [pad_rows(block_tables[g], p, -1) for g, p in zip(groups, P, strict=True)] if not as_slots else []
    layer_caches = list(caches)
    state: list[tuple] = []
    for gi in range(len(groups)):
        x, *stage, layer_caches[0] = host_step_first(
            params.embed, params.blocks[0], cfg, tok[gi], pos[gi], slot[gi], layer_caches[0],
            write_keys=not shared[0], write_latent=on_host[0],
        )  # fmt: skip
        state.append((x, *stage))
    sel: list[np.ndarray | None] = [None] * len(groups)  # each group's latest selection ([n, K], numpy)
    results: list[tuple[jax.Array, jax.Array]] = [None] * len(groups)  # type: ignore[list-item]
    for i, blk in enumerate(params.blocks):
        last = i + 1 == n_layers
        nxt = None if last else params.blocks[i + 1]
        flags = {} if last else {"write_keys": not shared[i + 1], "write_latent": on_host[i + 1]}
        for gi, g in enumerate(groups):
            x, proj, codes, scales = state[gi]
            if not shared[i]:
                sel[gi] = layer_mod.host_select_paged(
                    host_caches[i], block_tables[g], slots[g], codes, scales, proj, positions[g],
                    cfg.index_topk, threads, as_slots=as_slots,
                )  # fmt: skip
            chosen = sel[gi]
            assert chosen is not None  # the first layer always has an indexer
            next_cache = None if last else layer_caches[i + 1]
            if on_host[i]:
                # Only the real rows attend: padding rows (slot -1 everywhere) get zeros.
                picked = (
                    chosen
                    if as_slots
                    else layer_mod.selected_slots(chosen, block_tables[g], layer_caches[i].latent.page_size)
                )
                o_lat = layer_mod.host_attention_rows(
                    cfg, proj, layer_caches[i].latent, pad_rows(picked, P[gi], -1), threads
                )
                x, stage = host_step_next(
                    blk, cfg, x, o_lat, nxt, next_cache, None if nxt else head, pos[gi], slot[gi], **flags
                )
            else:
                x, latent, stage = host_step_attend_next(
                    blk, cfg, x, proj, table[gi], layer_caches[i].latent, pad_rows(chosen, P[gi], -1),
                    None if shared[i] else pos[gi], nxt, next_cache, None if nxt else head, pos[gi], slot[gi],
                    backend=backend, **flags,
                )  # fmt: skip
                layer_caches[i] = dataclasses.replace(layer_caches[i], latent=latent)
            if last:
                results[gi] = stage
            else:
                *stage_proj, layer_caches[i + 1] = stage
                state[gi] = (x, *stage_proj)
    out = StepLogits(
        tuple(r[0] for r in results), tuple(r[1] for r in results), tuple(g.stop - g.start for g in groups)
    )
    return out, tuple(layer_caches)


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

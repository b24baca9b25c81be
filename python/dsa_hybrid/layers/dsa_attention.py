"""`dsa_attention`: one DeepSeek Sparse Attention layer in JAX, pure-functional (dsa.md §3–§5).

A call takes the new tokens of a batch of sequences, flattened (`T` rows: prefill chunks, decodes and
mixed batches alike), writes their latent rows and indexer keys into the caches, selects each row's
top-k visible tokens with the lightning indexer on the device, runs sparse MLA attention over them in
absorbed form, and applies the output projection. Caches come back updated (functional style: donate
them under `jit`). Rows are described by the caller: the absolute `positions` of the new tokens, the
cache `slots` they are written to, and each row's sequence's `block_tables` (the latent cache and the
indexer cache share the page size and the block tables).

Indexer precision follows the indexer cache passed in: `IndexerPages` (FP8 keys, Hadamard-rotated, FP8
queries: what DeepSeek deploys) or `ExactIndexerKeys` (float32: what the Hugging Face reference
computes, and what training uses). GLM-5's `"shared"` layers run no indexer: pass the previous full
layer's selection as `shared_topk`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsa_hybrid.host.attention import sparse_mla_host
from dsa_hybrid.layers.weights import Fp8Weight, Weight, dense, linear
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.ops.checks import check_int
from dsa_hybrid.ops.cpu_kernels import indexer_kernel_ok
from dsa_hybrid.ops.indexer import ExactIndexerKeys, IndexerPages, check_rows, quantize_keys, select_topk_device
from dsa_hybrid.ops.latent_cache import CacheKind, LatentCache
from dsa_hybrid.ops.sparse_mla import Backend, prefix_mla, sparse_mla

_HIGHEST = jax.lax.Precision.HIGHEST

# Parameter name → its Hugging Face name under `model.layers.{i}.self_attn.` (shapes: `param_shapes`).
HF_NAMES = {
    "q_a": "q_a_proj.weight",
    "q_a_norm": "q_a_layernorm.weight",
    "q_b": "q_b_proj.weight",
    "kv_a": "kv_a_proj_with_mqa.weight",
    "kv_a_norm": "kv_a_layernorm.weight",
    "kv_b": "kv_b_proj.weight",
    "o": "o_proj.weight",
    "idx_wq_b": "indexer.wq_b.weight",
    "idx_wk": "indexer.wk.weight",
    "idx_k_norm_w": "indexer.k_norm.weight",
    "idx_k_norm_b": "indexer.k_norm.bias",
    "idx_weights": "indexer.weights_proj.weight",
}
# The layer's norm weights and bias: always float32 (tiny). Every other parameter is a linear weight, kept
# in the checkpoint's format when loaded with `weights="checkpoint"` (`layers.weights`).
NORM_PARAMS = ("q_a_norm", "kv_a_norm", "idx_k_norm_w", "idx_k_norm_b")
# The indexer's parameters: absent (None) in a GLM-5 "shared" layer, which runs no indexer (transformers
# stores no indexer tensors for it).
INDEXER_PARAMS = ("idx_wq_b", "idx_wk", "idx_k_norm_w", "idx_k_norm_b", "idx_weights")


def param_shapes(cfg: DSAConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter of the layer (linear weights are `[out, in]`, as in the checkpoints)."""
    h, d = cfg.num_attention_heads, cfg.hidden_size
    return {
        "q_a": (cfg.q_lora_rank, d),
        "q_a_norm": (cfg.q_lora_rank,),
        "q_b": (h * cfg.qk_head_dim, cfg.q_lora_rank),
        "kv_a": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, d),
        "kv_a_norm": (cfg.kv_lora_rank,),
        "kv_b": (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        "o": (d, h * cfg.v_head_dim),
        "idx_wq_b": (cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank),
        "idx_wk": (cfg.index_head_dim, d),
        "idx_k_norm_w": (cfg.index_head_dim,),
        "idx_k_norm_b": (cfg.index_head_dim,),
        "idx_weights": (cfg.index_n_heads, d),
    }


@dataclasses.dataclass(frozen=True)
class DSAParams:
    """The attention and indexer weights of one layer (a pytree; names in `HF_NAMES`). Norm weights are
    float32 arrays; linear weights (`[out, in]`) are float32 or bfloat16 arrays or `Fp8Weight` (FP8
    codes + 128 × 128 block scales), as loaded (`from_state_dict(weights=...)`).

    The indexer weights (`INDEXER_PARAMS`) are None in a layer without an indexer (GLM-5 "shared":
    `without_indexer`); such a layer must be given `shared_topk`."""

    q_a: Weight
    q_a_norm: jax.Array
    q_b: Weight
    kv_a: Weight
    kv_a_norm: jax.Array
    kv_b: Weight
    o: Weight
    idx_wq_b: Weight | None
    idx_wk: Weight | None
    idx_k_norm_w: jax.Array | None
    idx_k_norm_b: jax.Array | None
    idx_weights: Weight | None

    @property
    def has_indexer(self) -> bool:
        return self.idx_wq_b is not None

    def without_indexer(self) -> DSAParams:
        """The same layer with no indexer weights (a GLM-5 "shared" layer)."""
        return dataclasses.replace(
            self, idx_wq_b=None, idx_wk=None, idx_k_norm_w=None, idx_k_norm_b=None, idx_weights=None
        )

    @staticmethod
    def random(cfg: DSAConfig, seed: int = 0, std: float = 0.05) -> DSAParams:
        """Random weights of the right shapes (norm weights near 1), for tests and benchmarks (always
        with indexer weights; `without_indexer()` drops them)."""
        rng = np.random.default_rng(seed)
        arrays = {}
        for name, shape in param_shapes(cfg).items():
            if name.endswith("norm") or name == "idx_k_norm_w":
                arrays[name] = 1.0 + 0.1 * rng.standard_normal(shape)
            elif name == "idx_k_norm_b":
                arrays[name] = 0.1 * rng.standard_normal(shape)
            else:
                arrays[name] = std * rng.standard_normal(shape)
        return DSAParams(**{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()})

    @staticmethod
    def from_state_dict(
        tensors: Mapping[str, Any], cfg: DSAConfig, layer: int, *, weights: str = "float32"
    ) -> DSAParams:
        """From Hugging Face tensors (`model.layers.{layer}.self_attn.*`, dsa.md §4b): numpy / JAX arrays
        of any float dtype, or `Fp8Weight` for FP8 block-quantized ones. `weights` "float32" widens every
        linear weight to float32; "checkpoint" keeps bfloat16 as bfloat16 and FP8 as `Fp8Weight` (norms
        are float32 either way). A missing or misshapen tensor raises `KeyError` / `ValueError` naming it.
        A "shared" layer (`cfg.layer_indexer_type(layer)`) runs no indexer: its indexer tensors are not
        read (nor needed) and its indexer parameters are None."""
        if weights not in ("float32", "checkpoint"):
            raise ValueError(f"weights: expected 'float32' or 'checkpoint', got {weights!r}")
        prefix = f"model.layers.{layer}.self_attn."
        shapes = param_shapes(cfg)
        arrays: dict[str, Any] = dict.fromkeys(INDEXER_PARAMS)
        for name in layer_param_names(cfg, layer):
            full = prefix + HF_NAMES[name]
            if full not in tensors:
                raise KeyError(f"{full}: missing from the checkpoint")
            t = tensors[full]
            if not isinstance(t, Fp8Weight) and not hasattr(t, "shape"):
                t = np.asarray(t)
            if tuple(t.shape) != shapes[name]:
                raise ValueError(f"{full}: expected shape {list(shapes[name])}, got {list(t.shape)}")
            arrays[name] = resident_weight(t, weights if name not in NORM_PARAMS else "float32")
        return DSAParams(**arrays)

    def state_dict(self, layer: int) -> dict[str, np.ndarray]:
        """The Hugging Face tensors of this layer (float32 numpy; no indexer tensors without an indexer)
        under `model.layers.{layer}.` (`layer` an integer >= 0: TypeError / ValueError otherwise)."""
        layer = check_int("layer", layer, 0)
        prefix = f"model.layers.{layer}.self_attn."
        return {
            prefix + hf: np.asarray(dense(getattr(self, name)))
            for name, hf in HF_NAMES.items()
            if getattr(self, name) is not None
        }


def layer_param_names(cfg: DSAConfig, layer: int) -> tuple[str, ...]:
    """The parameters layer `layer` has: all of `HF_NAMES`, less the indexer's in a "shared" layer."""
    # (`layer` names the tensors; a layer past the config's, as in a single-layer test, is a full layer.)
    shared = layer < len(cfg.indexer_types) and cfg.indexer_types[layer] == "shared"
    return tuple(n for n in HF_NAMES if not (shared and n in INDEXER_PARAMS))


jax.tree_util.register_dataclass(DSAParams, data_fields=list(HF_NAMES), meta_fields=[])


@dataclasses.dataclass(frozen=True)
class DSACaches:
    """The two caches of one layer, paged alike (same page size, same block tables)."""

    latent: LatentCache
    index: IndexerPages | ExactIndexerKeys

    @staticmethod
    def create(
        cfg: DSAConfig, num_pages: int, page_size: int = 64, *, latent_kind: CacheKind = "bf16", indexer: str = "fp8"
    ) -> DSACaches:
        """Empty caches; `latent_kind` "bf16" or "fp8", `indexer` "fp8" (deployed) or "exact"."""
        latent = LatentCache.create(
            num_pages, page_size, kind=latent_kind, latent_dim=cfg.kv_lora_rank, rope_dim=cfg.qk_rope_head_dim
        )
        if indexer == "fp8":
            index: IndexerPages | ExactIndexerKeys = IndexerPages.create(num_pages, page_size, cfg.index_head_dim)
        elif indexer == "exact":
            index = ExactIndexerKeys.create(num_pages, page_size, cfg.index_head_dim)
        else:
            raise ValueError(f"indexer: expected 'fp8' or 'exact', got {indexer!r}")
        return DSACaches(latent, index)


jax.tree_util.register_dataclass(DSACaches, data_fields=["latent", "index"], meta_fields=[])


def apply_rope(x: jax.Array, positions: jax.Array, freqs: np.ndarray, pairing: str) -> jax.Array:
    """`reference.apply_rope` in JAX: rotate the last dim of `x` by `positions · freqs` (positions
    broadcast against `x.shape[:-1]`)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(freqs, jnp.float32)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if pairing == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
        return jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, eps: float = 1e-6) -> jax.Array:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * w + b


def resident_weight(t: Any, weights: str = "float32") -> Weight:
    """One tensor as the layers keep it: `weights` "float32" → a float32 array (FP8 dequantized);
    "checkpoint" → bfloat16 stays bfloat16, an `Fp8Weight` stays FP8, anything else float32."""
    if isinstance(t, Fp8Weight):
        if weights == "checkpoint":
            return Fp8Weight.checked(jnp.asarray(t.codes), jnp.asarray(t.scale_inv, jnp.float32))
        return dense(Fp8Weight.checked(jnp.asarray(t.codes), jnp.asarray(t.scale_inv)))
    a = np.asarray(t)
    if weights == "checkpoint" and a.dtype == jnp.bfloat16:
        return jnp.asarray(a)
    return jnp.asarray(a.astype(np.float32))


@dataclasses.dataclass(frozen=True)
class Projections:
    """What one layer computes from its input before selection: the absorbed queries and the new latent
    rows (dsa.md §3), and the indexer's queries, keys and head weights (dsa.md §4), all float32."""

    q_abs: jax.Array  # [T, h, kv_lora_rank + rope]
    c_kv: jax.Array  # [T, kv_lora_rank]
    k_pe: jax.Array  # [T, rope] (rotated)
    # None for a layer without indexer weights (GLM-5 "shared"):
    q_idx: jax.Array | None  # [T, H_I, D_I] (rotated on the first rope dims)
    k_idx: jax.Array | None  # [T, D_I]
    w_idx: jax.Array | None  # [T, H_I] (× H_I^-0.5)


jax.tree_util.register_dataclass(
    Projections, data_fields=["q_abs", "c_kv", "k_pe", "q_idx", "k_idx", "w_idx"], meta_fields=[]
)


def project(params: DSAParams, cfg: DSAConfig, x: jax.Array, positions: jax.Array) -> Projections:
    """The layer's projections of the new tokens `x` `[T, hidden]` at `positions` `[T]` (no indexer ones
    for a layer without indexer weights). The latent norms use `cfg.latent_norm_eps`. ValueError /
    TypeError naming `x` or `positions` for a wrong shape or dtype."""
    T = check_rows("x", x, None, (cfg.hidden_size,))
    check_rows("positions", positions, T, (), integer=True)
    x = x.astype(jnp.float32)
    h, nope, rope, r_kv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    freqs = cfg.rope_freqs
    c_q = rms_norm(linear(x, params.q_a), params.q_a_norm, cfg.latent_norm_eps)
    q = linear(c_q, params.q_b).reshape(T, h, nope + rope)
    ckv = linear(x, params.kv_a)
    c_kv = rms_norm(ckv[:, :r_kv], params.kv_a_norm, cfg.latent_norm_eps)
    k_pe = apply_rope(ckv[:, r_kv:], positions, freqs, cfg.mla_rope_pairing)
    q_pe = apply_rope(q[..., nope:], positions[:, None], freqs, cfg.mla_rope_pairing)
    w_uk = dense(params.kv_b).reshape(h, nope + cfg.v_head_dim, r_kv)[:, :nope]
    q_abs = jnp.concatenate([jnp.einsum("thn,hnr->thr", q[..., :nope], w_uk, precision=_HIGHEST), q_pe], axis=-1)
    if (
        params.idx_wq_b is None
        or params.idx_wk is None
        or params.idx_k_norm_w is None
        or params.idx_k_norm_b is None
        or params.idx_weights is None
    ):
        return Projections(q_abs, c_kv, k_pe, None, None, None)
    H_I, D_I, pairing = cfg.index_n_heads, cfg.index_head_dim, cfg.indexer_rope_pairing
    q_idx = linear(c_q, params.idx_wq_b).reshape(T, H_I, D_I)
    k_idx = layer_norm(linear(x, params.idx_wk), params.idx_k_norm_w, params.idx_k_norm_b)
    q_idx = jnp.concatenate([apply_rope(q_idx[..., :rope], positions[:, None], freqs, pairing), q_idx[..., rope:]], -1)
    k_idx = jnp.concatenate([apply_rope(k_idx[:, :rope], positions, freqs, pairing), k_idx[:, rope:]], -1)
    w_idx = linear(x, params.idx_weights) * H_I**-0.5
    return Projections(q_abs, c_kv, k_pe, q_idx, k_idx, w_idx)


def attend(
    params: DSAParams,
    cfg: DSAConfig,
    proj: Projections,
    slots: jax.Array,
    block_tables: jax.Array,
    latent: LatentCache,
    topk: jax.Array,
    backend: Backend = "auto",
    positions: jax.Array | None = None,
) -> tuple[jax.Array, LatentCache]:
    """Write the new latent rows, attend over the selected positions `topk` `[T, K]` (dsa.md §3), project out.
    With `positions`, a batch whose rows all see at most K tokens (so each selects everything, dsa.md §5)
    takes the dense-prefix path (`prefix_mla`: whole pages instead of single rows)."""
    r_kv = cfg.kv_lora_rank
    latent = latent.write(slots, proj.c_kv, proj.k_pe)
    S = latent.page_size
    page = jnp.take_along_axis(block_tables, jnp.maximum(topk, 0) // S, axis=1)
    sel_slots = jnp.where((topk >= 0) & (page >= 0), page * S + topk % S, -1).astype(jnp.int32)

    def sparse() -> jax.Array:
        return sparse_mla(proj.q_abs, latent, sel_slots, scale=cfg.softmax_scale, d_v=r_kv, backend=backend)[0]

    def prefix() -> jax.Array:
        assert positions is not None  # the branch exists only when positions are given
        lengths = (positions + 1).astype(jnp.int32)
        # Taken only when every row sees at most K tokens: the pages past K are never read, and leaving
        # them out bounds this branch's buffers (XLA sizes both branches of a cond) by K, not the table.
        tables = block_tables[:, : -(-topk.shape[1] // S)]
        return prefix_mla(proj.q_abs, latent, tables, lengths, scale=cfg.softmax_scale, d_v=r_kv, backend=backend)[0]

    if positions is None:
        o_lat = sparse()
    else:
        o_lat = jax.lax.cond(jnp.all(positions < topk.shape[1]), prefix, sparse)
    return output_projection(params, cfg, o_lat), latent


def output_projection(params: DSAParams, cfg: DSAConfig, o_lat: jax.Array) -> jax.Array:
    """The layer's output from the attention over latent rows: `o_lat` float32 `[T, h, kv_lora_rank]` →
    the value up-projection (`W_UV`, absorbed form) → `o_proj`, float32 `[T, hidden]`."""
    T, h, r_kv = o_lat.shape[0], cfg.num_attention_heads, cfg.kv_lora_rank
    w_uv = dense(params.kv_b).reshape(h, cfg.qk_nope_head_dim + cfg.v_head_dim, r_kv)[:, cfg.qk_nope_head_dim :]
    o = jnp.einsum("thr,hvr->thv", o_lat, w_uv, precision=_HIGHEST).reshape(T, h * cfg.v_head_dim)
    return linear(o, params.o)


def write_latent(latent: LatentCache, slots: jax.Array, proj: Projections) -> LatentCache:
    """`latent` with the new rows of `proj` (`c_kv`, `k_pe`) written at `slots` (int32 `[T]`, −1 skipped)."""
    return latent.write(slots, proj.c_kv, proj.k_pe)


def host_attention_supported(latent: LatentCache) -> bool:
    """Whether `attend_host` can run on `latent`: a float32 cache (`kind="f32"`, whose `data` holds each
    token's whole `[c_kv | k_pe]` row, the host kernel's input) living in CPU memory, so that the kernel
    reads it in place (`np.asarray` of a CPU `jax.Array` is a view, no copy)."""
    if latent.kind != "f32" or isinstance(latent.data, jax.core.Tracer):
        return False
    try:
        return all(d.platform == "cpu" for d in latent.data.devices())
    except (AttributeError, RuntimeError):  # not a committed jax.Array (or already deleted)
        return False


def selected_slots(topk: np.ndarray, block_tables: np.ndarray, page_size: int) -> np.ndarray:
    """The cache slots of the selected positions (numpy, what `attend` computes on the device): int32
    `[T, K]`, slot `block_tables[t, p // S] · S + p % S` of position `p = topk[t, j]`, −1 where `p < 0`,
    past the table, or on a −1 page."""
    tk = np.asarray(topk)
    bt = np.asarray(block_tables)
    col = np.maximum(tk, 0) // page_size
    inside = (tk >= 0) & (col < bt.shape[1])
    page = np.take_along_axis(bt, np.minimum(col, bt.shape[1] - 1), axis=1)
    ok = inside & (page >= 0)
    return np.where(ok, page.astype(np.int64) * page_size + tk % page_size, -1).astype(np.int32)


def attend_host(
    params: DSAParams,
    cfg: DSAConfig,
    proj: Projections,
    slots: jax.Array,
    block_tables: np.ndarray,
    latent: LatentCache,
    topk: np.ndarray,
    threads: int | None = None,
    *,
    donate: bool = True,
) -> tuple[jax.Array, LatentCache]:
    """`attend` with the attention itself in the Rust core (`host.sparse_mla_host`: the fused, SIMD,
    multi-threaded CPU kernel, GIL released): the new latent rows are written on the device (jitted,
    `latent` donated when `donate`), the kernel reads the float32 cache in place (a zero-copy view of its
    CPU buffer) at the selected slots (`selected_slots` of `topk` int `[T, K]` through `block_tables`
    int `[T, W]`, both numpy), and the output projection runs jitted on its result. Needs
    `host_attention_supported(latent)`; a row that selects every visible token gets exactly the dense
    prefix `attend` would take for it. Returns `(out [T, hidden] float32, updated latent)`; `threads`
    as in `sparse_mla_host` (default one per core)."""
    if not host_attention_supported(latent):
        raise ValueError("latent: attend_host needs a float32 ('f32') latent cache in CPU memory")
    latent = (write_latent_donated if donate else write_latent_jit)(latent, slots, proj)
    sel = selected_slots(topk, block_tables, latent.page_size)
    kv = np.asarray(latent.data).reshape(latent.num_slots, -1)  # waits for the write; a view, no copy
    o_lat, _ = sparse_mla_host(
        np.asarray(proj.q_abs), kv, sel, cfg.softmax_scale, d_v=cfg.kv_lora_rank, threads=threads
    )
    del kv  # drop the view before anything donates the cache (a live view makes XLA copy it instead)
    return output_projection_jit(params, cfg, jnp.asarray(o_lat)), latent


def host_attention_rows(
    cfg: DSAConfig, proj: Projections, latent: LatentCache, slots: np.ndarray, threads: int | None = None
) -> np.ndarray:
    """The host kernel's part of `attend_host`: sparse MLA of the absorbed queries `proj.q_abs` `[T, h,
    D]` over the rows at the cache `slots` int32 `[T, K]` (−1 skipped; a row with none gives zeros) of
    the float32 CPU `latent` cache, read in place (after the writes dispatched before: it waits for them).
    Returns `o_lat` float32 `[T, h, kv_lora_rank]` (numpy), for `output_projection`."""
    kv = np.asarray(latent.data).reshape(latent.num_slots, -1)  # waits for the write; a view, no copy
    o_lat, _ = sparse_mla_host(
        np.asarray(proj.q_abs), kv, slots, cfg.softmax_scale, d_v=cfg.kv_lora_rank, threads=threads
    )
    del kv  # drop the view before anything donates the cache (a live view makes XLA copy it instead)
    return o_lat


def dsa_attention(
    params: DSAParams,
    cfg: DSAConfig,
    x: jax.Array,
    positions: jax.Array,
    slots: jax.Array,
    block_tables: jax.Array,
    caches: DSACaches,
    *,
    shared_topk: jax.Array | None = None,
    backend: Backend = "auto",
) -> tuple[jax.Array, DSACaches, jax.Array]:
    """One DSA attention layer over `T` new tokens, with the indexer on the device.

    Args:
        params, cfg: the layer's weights and its model config (`DSAConfig`, static under `jit`).
        x: `[T, hidden]` normed layer input of the new tokens.
        positions: int32 `[T]` absolute position of each new token in its sequence.
        slots: int32 `[T]` cache slot each new token is written to (−1: a padding row, not written).
        block_tables: int32 `[T, max_pages]` the pages of each row's sequence (−1 padded), covering at
            least positions `0 .. positions[t]`.
        caches: the layer's `DSACaches`.
        shared_topk: for GLM-5 `"shared"` layers, the previous full layer's selection `[T, K]` (this
            layer then runs no indexer).
        backend: "auto", "xla", "pallas_tpu" or "cpu_kernel", for `sparse_mla` and for the indexer's
            scoring (the Pallas and the Rust indexer kernels score FP8 pages; exact keys always use XLA;
            "cpu_kernel" takes the Rust indexer where `ops.cpu_kernels.indexer_kernel_ok`, else XLA's).

    Returns `(out [T, hidden] float32, updated caches, topk [T, K] int32 positions)`. Jit-able.
    """
    _check_rows_of_call(cfg, x, positions, slots, block_tables)
    proj = project(params, cfg, x, positions)
    index = caches.index
    if shared_topk is None:
        if proj.k_idx is None or proj.q_idx is None or proj.w_idx is None:
            raise ValueError("dsa_attention: this layer has no indexer weights (a 'shared' layer): pass shared_topk")
        index = index.write(slots, proj.k_idx)
        # "auto" follows the target device (ops.target): Pallas for FP8 pages on a TPU target, also when
        # a CPU host compiles for a TPU ahead of time, the Rust kernel on a CPU; exact float32 keys are
        # always scored by XLA. "cpu_kernel" takes the Rust indexer too where its widths allow.
        idx_backend = backend if isinstance(index, IndexerPages) else "xla"
        if idx_backend == "cpu_kernel" and not indexer_kernel_ok(proj.q_idx.shape[1], index.head_dim, index.page_size):
            idx_backend = "xla"
        # Keys per scan step and rows per block: the indexer's defaults bound its temporaries by itself.
        topk = select_topk_device(
            proj.q_idx, proj.w_idx, index, block_tables, positions, cfg.index_topk, backend=idx_backend
        )
    else:
        topk = shared_topk
    # Shared layers attend over the given selection as it is (it need not cover the whole prefix).
    prefix_ok = positions if shared_topk is None else None
    out, latent = attend(params, cfg, proj, slots, block_tables, caches.latent, topk, backend, prefix_ok)
    return out, DSACaches(latent, index), topk


def project_write_keys(
    params: DSAParams, cfg: DSAConfig, x: jax.Array, positions: jax.Array, slots: jax.Array, index: IndexerPages
) -> tuple[Projections, jax.Array, jax.Array, IndexerPages]:
    """The projections, and the new indexer keys quantized once (`quantize_keys`) and written to the
    device pages: the same bytes then go to the host cache, so the two indexer caches stay identical."""
    if not isinstance(index, IndexerPages):
        raise TypeError(f"index: expected FP8 IndexerPages (the host cache's format), got {type(index).__name__}")
    proj = project(params, cfg, x, positions)
    if proj.k_idx is None:
        raise ValueError("project_write_keys: this layer has no indexer weights (a 'shared' layer)")
    codes, scales = quantize_keys(proj.k_idx)
    return proj, codes, scales, index.write_quantized(slots, codes, scales)


def _check_rows_of_call(cfg: DSAConfig, x: Any, positions: Any, slots: Any, block_tables: Any) -> None:
    """Named errors for misshapen layer inputs (static shapes: works under `jit` too)."""
    T = check_rows("x", x, None, (cfg.hidden_size,))
    check_rows("positions", positions, T, (), integer=True)
    check_rows("slots", slots, T, (), integer=True)
    if getattr(block_tables, "ndim", 0) != 2:
        raise ValueError(
            f"block_tables: expected shape [{T}, max_pages], got {list(getattr(block_tables, 'shape', ()))}"
        )
    check_rows("block_tables", block_tables, T, (block_tables.shape[1],), integer=True)


# The layer's jitted halves, the seam the host placement, the model, the engine and the placement cost
# model are built on: `project` (+ the new indexer keys quantized and written) before selection, and
# `attend` after it. `cfg` (and `attend`'s `backend`) are static.
project_jit = jax.jit(project, static_argnums=1)
project_write_keys_jit = jax.jit(project_write_keys, static_argnums=1)
attend_jit = jax.jit(attend, static_argnums=(1, 7))
# The same with the cache argument donated (the device indexer pages, the latent cache): for callers that
# never use the cache they pass in again, so XLA updates it in place instead of copying it.
project_write_keys_donated = jax.jit(project_write_keys, static_argnums=1, donate_argnums=5)
attend_donated = jax.jit(attend, static_argnums=(1, 7), donate_argnums=5)
# The device halves of `attend_host` around the host kernel.
write_latent_jit = jax.jit(write_latent)
write_latent_donated = jax.jit(write_latent, donate_argnums=0)
output_projection_jit = jax.jit(output_projection, static_argnums=1)


def host_select(
    host_cache: Any,
    seq_ids: np.ndarray,
    codes: jax.Array,
    scales: jax.Array,
    proj: Projections,
    positions: np.ndarray | jax.Array,
    k: int,
    threads: int | None = None,
) -> np.ndarray:
    """Append the new rows' quantized keys to the Rust `IndexerKeyCache` (each sequence's rows in order)
    and select each row's top-`k` positions on the host (SIMD, threads, GIL released). Blocks only on
    this call's own projections, so the device can run other work meanwhile. int32 `[T, k]`.
    The cache keeps its own sequences here; `host_select_paged` addresses it by the caller's tables."""
    seq_ids = np.asarray(seq_ids)
    if seq_ids.ndim != 1 or seq_ids.shape[0] != np.shape(codes)[0] or not np.issubdtype(seq_ids.dtype, np.integer):
        raise ValueError(
            f"seq_ids: expected integers of shape [{np.shape(codes)[0]}], got {seq_ids.dtype} {list(seq_ids.shape)}"
        )
    seq_ids = seq_ids.astype(np.int64)
    codes_np, scales_np = np.asarray(codes), np.asarray(scales)
    order = list(dict.fromkeys(seq_ids.tolist()))  # each sequence once, in order of first appearance
    known = set(host_cache.sequence_ids())
    unknown = [sid for sid in order if sid not in known]
    if unknown:  # before any append: a bad call leaves the cache as it was
        raise KeyError(f"seq_ids: unknown sequence {unknown[0]} (add_sequence first)")
    lengths = {sid: host_cache.length(sid) for sid in order}
    try:
        for sid in order:
            rows = seq_ids == sid
            host_cache.append_quantized(sid, codes_np[rows], scales_np[rows])
        return host_cache.select(
            seq_ids, np.asarray(proj.q_idx), np.asarray(proj.w_idx), np.asarray(positions), k, threads=threads
        )
    except BaseException:  # a later sequence did not fit, or the selection refused: undo the appends
        for sid, n in lengths.items():
            if host_cache.length(sid) > n:
                host_cache.truncate(sid, n)
        raise


def host_select_paged(
    host_cache: Any,
    block_tables: np.ndarray,
    slots: np.ndarray,
    codes: jax.Array,
    scales: jax.Array,
    proj: Projections,
    positions: np.ndarray | jax.Array,
    k: int,
    threads: int | None = None,
    *,
    as_slots: bool = False,
) -> np.ndarray:
    """`host_select` on a host cache addressed by the caller's block tables, as the device caches are:
    the new rows' quantized keys are written at their `slots` (int32 `[T]`, −1 skipped:
    `IndexerKeyCache.write_slots`), then each row selects its top-`k` positions among `0 ..
    positions[t]` through its `block_tables` row (int32 `[T, W]`, −1 padded: `select_paged`). The cache
    holds no sequences; a fork or a preemption is the caller's table alone. Only the first `T` rows of
    `codes`, `scales` and `proj` are used (padding rows past them are ignored). int32 `[T, k]`: the
    positions, or with `as_slots` their cache slots through the tables (what `selected_slots` gives)."""
    slots = np.ascontiguousarray(slots, np.int32)
    n = slots.shape[0]
    _check_paged_select(host_cache, block_tables, positions, n, k)  # before the write: a bad call changes nothing
    codes_np = np.asarray(codes)[:n]  # e4m3fn codes as their bytes (the host cache's uint8)
    host_cache.write_slots(slots, codes_np.view(np.uint8), np.asarray(scales)[:n])
    return host_cache.select_paged(
        np.ascontiguousarray(block_tables, np.int32),
        np.asarray(positions),
        np.asarray(proj.q_idx)[:n],
        np.asarray(proj.w_idx)[:n],
        k,
        as_slots=as_slots,
        threads=threads,
    )


def _check_paged_select(host_cache: Any, block_tables: Any, positions: Any, n: int, k: Any) -> None:
    """What `select_paged` would refuse, checked before `write_slots` writes anything (named errors)."""
    bt, pos = np.asarray(block_tables), np.asarray(positions)
    if bt.ndim != 2 or bt.shape[0] != n or not np.issubdtype(bt.dtype, np.integer):
        raise ValueError(f"block_tables: expected integers of shape [{n}, W], got {bt.dtype} {list(bt.shape)}")
    if pos.shape != (n,) or not np.issubdtype(pos.dtype, np.integer):
        raise ValueError(f"positions: expected integers of shape [{n}], got {pos.dtype} {list(pos.shape)}")
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k: expected an integer >= 1, got {k!r}")
    if n == 0:
        return
    S, blocks = host_cache.block_size, host_cache.num_blocks
    if bt.min() < -1 or bt.max() >= blocks:
        bad = int(bt.min()) if bt.min() < -1 else int(bt.max())
        raise IndexError(f"block_tables: block {bad} outside [-1, {blocks})")
    if pos.min() < 0 or pos.max() >= bt.shape[1] * S:
        bad = int(pos.min()) if pos.min() < 0 else int(pos.max())
        raise IndexError(f"positions: {bad} outside the tables' [0, {bt.shape[1] * S})")
    own = bt[np.arange(n), pos // S]
    if (own < 0).any():
        t = int(np.argmax(own < 0))
        raise IndexError(f"block_tables: row {t} has no block for its position {int(pos[t])}")


def dsa_attention_host(
    params: DSAParams,
    cfg: DSAConfig,
    x: jax.Array,
    positions: jax.Array,
    slots: jax.Array,
    block_tables: jax.Array,
    caches: DSACaches,
    host_cache: Any,
    seq_ids: np.ndarray | None = None,
    *,
    shared_topk: jax.Array | None = None,
    backend: Backend = "auto",
    threads: int | None = None,
    host_attention: bool | None = None,
) -> tuple[jax.Array, DSACaches, np.ndarray]:
    """`dsa_attention` with the indexer on the host: the device computes the projections and quantizes
    the new indexer keys (writing them to `caches.index` too), only the FP8 keys, the queries and the head
    weights come to the host, the Rust `IndexerKeyCache` stores the keys and selects (GIL released, SIMD,
    threads), and only the `[T, K]` positions go back to the device for attention.

    `caches.index` must be FP8 `IndexerPages`: afterwards it holds the same bytes for the new rows as
    `host_cache`, so a later step may select on either side. Two ways to address `host_cache`:
    - `seq_ids` given (int `[T]`, each row's sequence): the cache holds the keys of its own sequences
      (`add_sequence`, its own block tables); a sequence's rows come in order, continuing its cache: row
      `t` is at position `length(seq) + its rank among the call's rows of that sequence` (`host_select`).
    - `seq_ids` None: the cache is paged like the device caches, through this call's `slots` and
      `block_tables` (`write_slots`, `select_paged`; `host_select_paged`), and holds no sequences.
    The attention runs in the Rust core too (`attend_host`, `threads` workers) when `host_attention`
    allows it (`use_host_attention`: by default whenever the latent cache is float32 in CPU memory, the
    engine's CPU default), else on the device (`attend`). Not jit-able as a whole (the device halves
    are). Returns `(out, caches, topk)` as `dsa_attention` does (`topk` a numpy array)."""
    x, positions, slots, block_tables = (jnp.asarray(a) for a in (x, positions, slots, block_tables))
    _check_rows_of_call(cfg, x, positions, slots, block_tables)
    if shared_topk is not None:
        proj = project_jit(params, cfg, x, positions)
        index, topk = caches.index, np.asarray(shared_topk)
    else:
        if not isinstance(caches.index, IndexerPages):
            raise TypeError("dsa_attention_host needs FP8 IndexerPages (the host cache is FP8)")
        proj, codes, scales, index = project_write_keys_jit(params, cfg, x, positions, slots, caches.index)
        if seq_ids is None:
            topk = host_select_paged(
                host_cache, np.asarray(block_tables), np.asarray(slots), codes, scales, proj,
                np.asarray(positions), cfg.index_topk, threads,
            )  # fmt: skip
        else:
            topk = host_select(host_cache, seq_ids, codes, scales, proj, positions, cfg.index_topk, threads)
    if use_host_attention(caches.latent, backend, host_attention):
        out, latent = attend_host(
            params, cfg, proj, slots, np.asarray(block_tables), caches.latent, np.asarray(topk), threads, donate=False
        )
        return out, DSACaches(latent, index), topk
    prefix_ok = jnp.asarray(positions) if shared_topk is None else None
    out, latent = attend_jit(
        params, cfg, proj, slots, block_tables, caches.latent, jnp.asarray(topk), backend, prefix_ok
    )
    return out, DSACaches(latent, index), topk


def use_host_attention(latent: LatentCache, backend: Backend, host_attention: bool | None) -> bool:
    """Whether a host-placement step attends with the Rust kernel (`attend_host`): `host_attention`
    True requires it (ValueError when `host_attention_supported(latent)` is false), False never, None
    ("auto") whenever the cache supports it and `backend` is not "pallas_tpu"."""
    if host_attention is None:
        return backend != "pallas_tpu" and host_attention_supported(latent)
    if host_attention and not host_attention_supported(latent):
        raise ValueError("host_attention: the Rust kernel needs a float32 ('f32') latent cache in CPU memory")
    return bool(host_attention)

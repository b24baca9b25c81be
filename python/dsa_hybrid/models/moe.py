"""The MoE MLP of DeepSeek-V3.2 and GLM-5, as transformers defines it (`DeepseekV3MoE`, `GlmMoeDsaMoE`).

Both models use the same block (GLM-5's modular code inherits DeepSeek-V3's); they differ only in
config values: DeepSeek-V3.2 routes group-limited (`n_group` 8, `topk_group` 4), GLM-5 with a single
group (`n_group` 1: plain top-k); which layers are MoE comes from `mlp_layer_types` (by default the
first `first_k_dense_replace` layers are dense).

Router: `s = sigmoid(x · W_gateᵀ)` in float32; `s + e_score_correction_bias` is used for the choice
only: each of `n_group` groups is scored by the sum of its top-2 biased scores, only the `topk_group`
best groups stay eligible, and the `num_experts_per_tok` best eligible experts are chosen. Their
weights are the unbiased `s`, normalised to sum 1 (`norm_topk_prob`, + 1e-20), times
`routed_scaling_factor`. Output: `Σ_j w_j · expert_{e_j}(x) + shared_experts(x)` (SwiGLU experts).
Ties in the scores go to the lower expert (group) index (`jax.lax.top_k`; torch leaves it unspecified,
`reference.moe_route` does the same as here).

Experts run without a per-token loop, jit-able with static shapes, two ways:
- "ragged" (default): the `T · k` (token, expert) pairs are sorted by expert and the experts' matmuls
  are grouped matmuls (`jax.lax.ragged_dot`) over the sorted rows; work ∝ `T · k`.
- "dense": every expert on every token, combined with the one-hot routing weights; work ∝ `T · E`
  (only for tiny models and as a cross-check).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from dsa_hybrid.layers.weights import Fp8Weight, Weight, dense
from dsa_hybrid.models.config import DSAConfig

_HIGHEST = jax.lax.Precision.HIGHEST
ExpertsImpl = Literal["ragged", "dense"]


@dataclasses.dataclass(frozen=True)
class MoEParams:
    """One MoE layer's weights, linear weights `[out, in]` as in the checkpoints (a pytree). Each linear
    weight is a float32 or bfloat16 array or an `Fp8Weight` (the experts' stacked: codes `[E, out, in]`,
    scales `[E, out/128, in/128]`), as loaded; `bias` is float32. The shared experts are None when
    `n_shared_experts` is 0."""

    router: Weight  # [E, d]              mlp.gate.weight
    bias: jax.Array  # [E]                mlp.gate.e_score_correction_bias
    gate: Weight  # [E, I, d]             mlp.experts.{e}.gate_proj.weight
    up: Weight  # [E, I, d]               mlp.experts.{e}.up_proj.weight
    down: Weight  # [E, d, I]             mlp.experts.{e}.down_proj.weight
    shared_gate: Weight | None  # [n_shared·I, d]   mlp.shared_experts.gate_proj.weight
    shared_up: Weight | None  # [n_shared·I, d]     mlp.shared_experts.up_proj.weight
    shared_down: Weight | None  # [d, n_shared·I]   mlp.shared_experts.down_proj.weight

    @staticmethod
    def random(cfg: DSAConfig, seed: int = 0, std: float = 0.05) -> MoEParams:
        """Random weights of the right shapes (a random correction bias too), for tests."""
        rng = np.random.default_rng(seed)
        E, d, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        shared = cfg.n_shared_experts * inter

        def w(*shape: int) -> jax.Array:
            return jnp.asarray(std * rng.standard_normal(shape), jnp.float32)

        return MoEParams(
            router=w(E, d),
            bias=jnp.asarray(0.1 * rng.standard_normal(E), jnp.float32),
            gate=w(E, inter, d),
            up=w(E, inter, d),
            down=w(E, d, inter),
            shared_gate=w(shared, d) if shared else None,
            shared_up=w(shared, d) if shared else None,
            shared_down=w(d, shared) if shared else None,
        )

    @staticmethod
    def from_checkpoint(
        directory: str | os.PathLike[str] | Any, cfg: DSAConfig, layer: int, *, weights: str = "float32"
    ) -> MoEParams:
        """Layer `layer`'s MoE weights from a Hugging Face checkpoint (a directory or an open
        `models.checkpoint.Checkpoint`): per-expert tensors
        `model.layers.{layer}.mlp.experts.{e}.{gate,up,down}_proj.weight` (the released checkpoints'
        layout) or transformers' fused `mlp.experts.gate_up_proj` `[E, 2I, d]` + `mlp.experts.down_proj`
        `[E, d, I]`; the router `mlp.gate.weight` and `mlp.gate.e_score_correction_bias`; the shared
        experts `mlp.shared_experts.{gate,up,down}_proj.weight`. `weights` "float32" widens every weight
        (FP8 dequantized); "checkpoint" keeps bf16 as bf16 and FP8 as `Fp8Weight` (experts stacked)."""
        from dsa_hybrid.layers.dsa_attention import resident_weight
        from dsa_hybrid.models.checkpoint import Checkpoint

        ckpt = directory if isinstance(directory, Checkpoint) else Checkpoint(directory)
        p = f"model.layers.{layer}.mlp."
        E, d, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size

        def get(name: str, shape: tuple[int, ...]) -> np.ndarray | Fp8Weight:
            w = ckpt.weight(name, weights)
            _check(name, w, shape)
            return w

        router = get(p + "gate.weight", (E, d))
        bias = np.asarray(get(p + "gate.e_score_correction_bias", (E,)), np.float32)
        if p + "experts.gate_up_proj" in ckpt:
            gate_up = get(p + "experts.gate_up_proj", (E, 2 * inter, d))
            down: Any = get(p + "experts.down_proj", (E, d, inter))
            fused = dense_np(gate_up)
            gate: Any = fused[:, :inter]
            up: Any = fused[:, inter:]
        else:
            per = {
                n: [get(f"{p}experts.{e}.{n}_proj.weight", (d, inter) if n == "down" else (inter, d)) for e in range(E)]
                for n in ("gate", "up", "down")
            }
            gate, up, down = stack(per["gate"]), stack(per["up"]), stack(per["down"])
        shared = cfg.n_shared_experts * inter
        sg = su = sd = None
        if shared:
            sg = get(p + "shared_experts.gate_proj.weight", (shared, d))
            su = get(p + "shared_experts.up_proj.weight", (shared, d))
            sd = get(p + "shared_experts.down_proj.weight", (d, shared))

        def j(a: Any) -> Any:
            return None if a is None else resident_weight(a, weights)

        return MoEParams(j(router), jnp.asarray(bias), j(gate), j(up), j(down), j(sg), j(su), j(sd))

    def state_dict(self, layer: int) -> dict[str, np.ndarray]:
        """The Hugging Face tensors of this layer's MoE block (per-expert layout, float32 numpy)."""
        p = f"model.layers.{layer}.mlp."
        out = {
            p + "gate.weight": np.asarray(dense(self.router)),
            p + "gate.e_score_correction_bias": np.asarray(self.bias),
        }
        for e in range(self.gate.shape[0]):
            for n, w in (("gate", self.gate), ("up", self.up), ("down", self.down)):
                out[f"{p}experts.{e}.{n}_proj.weight"] = np.asarray(dense(w)[e])
        for n, s in (("gate", self.shared_gate), ("up", self.shared_up), ("down", self.shared_down)):
            if s is not None:
                out[f"{p}shared_experts.{n}_proj.weight"] = np.asarray(dense(s))
        return out


jax.tree_util.register_dataclass(
    MoEParams,
    data_fields=["router", "bias", "gate", "up", "down", "shared_gate", "shared_up", "shared_down"],
    meta_fields=[],
)


def _check(name: str, a: Any, shape: tuple[int, ...]) -> None:
    if tuple(a.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(a.shape)}")


def dense_np(w: np.ndarray | Fp8Weight) -> np.ndarray:
    """float32 numpy values of a loaded weight (FP8 dequantized)."""
    if isinstance(w, Fp8Weight):
        from dsa_hybrid.layers.weights import dequantize_fp8_blocks

        return dequantize_fp8_blocks(np.asarray(w.codes), np.asarray(w.scale_inv))
    return np.asarray(w, np.float32) if np.asarray(w).dtype != jnp.bfloat16 else np.asarray(w)


def stack(ws: list[np.ndarray | Fp8Weight]) -> np.ndarray | Fp8Weight:
    """Per-expert weights stacked `[E, out, in]`: FP8 ones as one `Fp8Weight` (codes and scales stacked),
    bf16 ones as bf16, anything else (or a mix) as float32."""
    if all(isinstance(w, Fp8Weight) for w in ws):
        fp8 = [w for w in ws if isinstance(w, Fp8Weight)]
        return Fp8Weight(np.stack([np.asarray(w.codes) for w in fp8]), np.stack([np.asarray(w.scale_inv) for w in fp8]))  # type: ignore[arg-type]
    arrays = [dense_np(w) for w in ws]
    if all(a.dtype == jnp.bfloat16 for a in arrays):
        return np.stack(arrays)
    return np.stack([a.astype(np.float32) for a in arrays])


def route(logits: jax.Array, bias: jax.Array, cfg: DSAConfig) -> tuple[jax.Array, jax.Array]:
    """The router's choice from its logits `[T, E]` (float32): `(experts int32 [T, k], weights [T, k])`
    (see the module docstring; `reference.moe_route` is the float64 oracle)."""
    T, E = logits.shape
    G, k = cfg.n_group, cfg.num_experts_per_tok
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    choice = scores + bias.astype(jnp.float32)
    group_scores = jax.lax.top_k(choice.reshape(T, G, E // G), min(2, E // G))[0].sum(axis=-1)
    _, groups = jax.lax.top_k(group_scores, cfg.topk_group)
    group_mask = jnp.zeros((T, G), bool).at[jnp.arange(T)[:, None], groups].set(True)
    eligible = jnp.repeat(group_mask, E // G, axis=1)
    _, experts = jax.lax.top_k(jnp.where(eligible, choice, -jnp.inf), k)
    weights = jnp.take_along_axis(scores, experts, axis=1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return experts.astype(jnp.int32), weights * cfg.routed_scaling_factor


def _swiglu(x: jax.Array, gate: Weight, up: Weight, down: Weight) -> jax.Array:
    def lin(a: jax.Array, w: Weight) -> jax.Array:
        return jnp.einsum("ti,oi->to", a, dense(w), precision=_HIGHEST)

    return lin(jax.nn.silu(lin(x, gate)) * lin(x, up), down)


def routed_experts_ragged(p: MoEParams, x: jax.Array, experts: jax.Array, weights: jax.Array) -> jax.Array:
    """`Σ_j w_j · expert_{e_j}(x_t)` per token: the `T·k` (token, expert) pairs sorted by expert, each
    expert's rows one group of a grouped matmul (`jax.lax.ragged_dot`), scattered back with their weights."""
    T, k = experts.shape
    E = p.gate.shape[0]
    gate, up, down = dense(p.gate), dense(p.up), dense(p.down)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    xs = x[token]

    def gmm(a: jax.Array, w: jax.Array) -> jax.Array:  # w [E, out, in]
        return jax.lax.ragged_dot(a, jnp.swapaxes(w, 1, 2), sizes, precision=_HIGHEST)

    h = jax.nn.silu(gmm(xs, gate)) * gmm(xs, up)
    y = gmm(h, down) * weights.reshape(-1)[order][:, None]
    return jnp.zeros_like(x).at[token].add(y)


def routed_experts_dense(p: MoEParams, x: jax.Array, experts: jax.Array, weights: jax.Array) -> jax.Array:
    """The same, every expert on every token, combined by the one-hot routing weights `[T, E]`."""
    E = p.gate.shape[0]
    combine = jnp.zeros((x.shape[0], E), x.dtype).at[jnp.arange(x.shape[0])[:, None], experts].add(weights)
    g = jnp.einsum("td,eid->tei", x, dense(p.gate), precision=_HIGHEST)
    u = jnp.einsum("td,eid->tei", x, dense(p.up), precision=_HIGHEST)
    y = jnp.einsum("tei,edi->ted", jax.nn.silu(g) * u, dense(p.down), precision=_HIGHEST)
    return jnp.einsum("ted,te->td", y, combine, precision=_HIGHEST)


def moe_block(p: MoEParams, cfg: DSAConfig, x: jax.Array, impl: ExpertsImpl = "ragged") -> jax.Array:
    """The MoE MLP of `x` `[T, d]` (already normed): routed experts plus shared experts. Jit-able."""
    x = x.astype(jnp.float32)
    logits = jnp.einsum("td,ed->te", x, dense(p.router), precision=_HIGHEST)
    experts, weights = route(logits, p.bias, cfg)
    if impl == "ragged":
        out = routed_experts_ragged(p, x, experts, weights)
    elif impl == "dense":
        out = routed_experts_dense(p, x, experts, weights)
    else:
        raise ValueError(f"impl: expected 'ragged' or 'dense', got {impl!r}")
    if p.shared_gate is not None and p.shared_up is not None and p.shared_down is not None:
        out = out + _swiglu(x, p.shared_gate, p.shared_up, p.shared_down)
    return out

"""`DSAConfig`: the shapes and constants of a DSA model (docs/dsa.md §1–§4).

Presets for DeepSeek-V3.2 and GLM-5, a `tiny()` one for tests, and a loader for a
Hugging Face `config.json` of model type `deepseek_v32` or `glm_moe_dsa`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import os
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np

RopePairing = Literal["interleaved", "half"]
IndexerType = Literal["full", "shared"]
MlpType = Literal["dense", "sparse"]

SUPPORTED_MODEL_TYPES = ("deepseek_v32", "glm_moe_dsa")

# Per model type: the indexer's RoPE pairing when config.json does not say
# (`indexer_rope_interleave`). Mixing them up degrades recall silently (dsa.md §2).
_DEFAULT_INDEXER_PAIRING: dict[str, RopePairing] = {
    "deepseek_v32": "half",
    "glm_moe_dsa": "interleaved",
}


@dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE scaling parameters (Hugging Face `rope_scaling` with type "yarn")."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    def __post_init__(self) -> None:
        # transformers then scales cos/sin by m(mscale) / m(mscale_all_dim); this package applies only the
        # softmax factor m(mscale_all_dim)², so such a config would be computed wrong: refused instead.
        if self.factor > 1.0 and self.mscale != self.mscale_all_dim:
            raise ValueError(
                f"rope_scaling: yarn mscale ({self.mscale}) != mscale_all_dim ({self.mscale_all_dim}) is not "
                "supported (it would scale cos/sin by their ratio); DeepSeek-V3.2 and GLM-5 use equal values"
            )


@dataclass(frozen=True)
class DSAConfig:
    """Shapes and constants of a DeepSeek Sparse Attention model.

    Field names follow the Hugging Face `config.json` of `deepseek_v32` /
    `glm_moe_dsa`. Derived quantities (`softmax_scale`, `rope_freqs`, ...) are
    properties so they can never disagree with the fields.
    """

    model_type: str
    hidden_size: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    rope_theta: float
    rope_scaling: YarnScaling | None = None
    indexer_rope_pairing: RopePairing = "half"
    mla_rope_pairing: RopePairing = "interleaved"
    rms_norm_eps: float = 1e-6
    # Epsilon of the two latent RMSNorms (`q_a_layernorm`, `kv_a_layernorm`). transformers builds them with
    # its RMSNorm default 1e-6 whatever `rms_norm_eps` says (1e-5 for GLM-5); vLLM uses `rms_norm_eps`.
    # The default follows transformers; config.json key `latent_norm_eps` (ours) overrides it.
    latent_norm_eps: float = 1e-6
    num_hidden_layers: int = 1
    vocab_size: int = 0
    intermediate_size: int = 0
    first_k_dense_replace: int = 0
    max_position_embeddings: int = 0
    # MoE (transformers' DeepseekV3MoE / GlmMoeDsaMoE; `models.moe`). `n_routed_experts` 0: no MoE.
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    moe_intermediate_size: int = 0
    # Per layer "dense" or "sparse" (MoE), as config.json `mlp_layer_types`; empty means: the first
    # `first_k_dense_replace` layers dense, the rest sparse when `n_routed_experts` > 0.
    mlp_layer_types: tuple[MlpType, ...] = field(default=())
    # Per layer "full" (runs the indexer) or "shared" (reuses the previous full
    # layer's top-k, GLM-5). Empty means every layer is "full".
    indexer_types: tuple[IndexerType, ...] = field(default=())
    # Token ids that end a generation (config.json `eos_token_id`: an int or a list). Stored as a tuple
    # (an int, a list or None are accepted); empty means the model has none. Serving stops a request at
    # any of them (finish reason "eos"); the layer and the model ignore it.
    eos_token_id: tuple[int, ...] = field(default=())
    # Multi-token-prediction (next-n) layers the checkpoint carries after the last decoder layer
    # (config.json `num_nextn_predict_layers`). They are not used: the loader skips their tensors.
    num_nextn_predict_layers: int = 0

    def __post_init__(self) -> None:
        eos: Any = self.eos_token_id  # as given: an int, a sequence of ints or None
        try:
            ids = () if eos is None else (operator.index(eos),) if not hasattr(eos, "__iter__") else eos
            ids = tuple(operator.index(t) for t in ids)
        except TypeError:
            ids = (-1,)
        if any(t < 0 for t in ids):
            raise ValueError(f"DSAConfig.eos_token_id must be a token id >= 0 or a sequence of them, got {eos!r}")
        object.__setattr__(self, "eos_token_id", ids)
        positive = (
            "hidden_size num_attention_heads q_lora_rank kv_lora_rank qk_rope_head_dim "
            "v_head_dim index_n_heads index_head_dim index_topk"
        ).split()
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"DSAConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.qk_nope_head_dim < 0:
            raise ValueError(f"DSAConfig.qk_nope_head_dim must be >= 0, got {self.qk_nope_head_dim}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"DSAConfig.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ValueError("DSAConfig.index_head_dim must be >= qk_rope_head_dim (rope is on its first dims)")
        for name in ("indexer_rope_pairing", "mla_rope_pairing"):
            if getattr(self, name) not in ("interleaved", "half"):
                raise ValueError(f"DSAConfig.{name} must be 'interleaved' or 'half', got {getattr(self, name)!r}")
        if self.rope_theta <= 0:
            raise ValueError(f"DSAConfig.rope_theta must be positive, got {self.rope_theta}")
        bad = [t for t in self.indexer_types if t not in ("full", "shared")]
        if bad:
            raise ValueError(f"DSAConfig.indexer_types: unknown entries {bad}; expected 'full' or 'shared'")
        object.__setattr__(self, "mlp_layer_types", tuple(self.mlp_layer_types))
        bad_mlp = [t for t in self.mlp_layer_types if t not in ("dense", "sparse")]
        if bad_mlp:
            raise ValueError(f"DSAConfig.mlp_layer_types: unknown entries {bad_mlp}; expected 'dense' or 'sparse'")
        if self.mlp_layer_types:
            if len(self.mlp_layer_types) != self.num_hidden_layers:
                raise ValueError(
                    f"DSAConfig.mlp_layer_types: {len(self.mlp_layer_types)} entries, {self.num_hidden_layers} layers"
                )
            if self.mlp_layer_types == tuple(self._derived_mlp_type(i) for i in range(self.num_hidden_layers)):
                object.__setattr__(self, "mlp_layer_types", ())  # canonical: equal configs compare equal
        if self.latent_norm_eps <= 0:
            raise ValueError(f"DSAConfig.latent_norm_eps must be positive, got {self.latent_norm_eps}")
        if self.n_routed_experts and any(self.layer_mlp_type(i) == "sparse" for i in range(self.num_hidden_layers)):
            if self.n_routed_experts % self.n_group:
                raise ValueError("DSAConfig.n_routed_experts must be a multiple of n_group")
            if not 0 < self.topk_group <= self.n_group:
                raise ValueError("DSAConfig.topk_group must be in 1..n_group")
            per_group = self.n_routed_experts // self.n_group
            if not 0 < self.num_experts_per_tok <= self.topk_group * per_group:
                raise ValueError("DSAConfig.num_experts_per_tok must be in 1..topk_group * experts per group")
            if self.n_group > 1 and per_group < 2:
                raise ValueError("DSAConfig: group-limited routing needs >= 2 experts per group (top-2 sum)")
            if self.moe_intermediate_size <= 0:
                raise ValueError("DSAConfig.moe_intermediate_size must be positive for MoE layers")
        if self.indexer_types and self.indexer_types[0] != "full":
            raise ValueError("DSAConfig.indexer_types: the first layer must be 'full' (nothing to share from)")

    # ----- derived quantities -------------------------------------------------

    @property
    def qk_head_dim(self) -> int:
        """`d_nope + d_rope`: per-head query/key width before absorption."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one cached latent row and of an absorbed query: `r_kv + d_rope` (576)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def mscale(self) -> float:
        """YaRN attention magnitude factor `m = 0.1·mscale_all_dim·ln(factor) + 1` (1 without YaRN)."""
        y = self.rope_scaling
        if y is None or y.factor <= 1.0 or not y.mscale_all_dim:
            return 1.0
        return 0.1 * y.mscale_all_dim * math.log(y.factor) + 1.0

    @property
    def softmax_scale(self) -> float:
        """Attention logit scale `(d_nope + d_rope)^-0.5 · m²` (0.1352338 for DeepSeek-V3.2)."""
        return self.qk_head_dim**-0.5 * self.mscale**2

    @property
    def indexer_softmax_scale(self) -> float:
        """`D_I^-0.5`, the scale inside the indexer's ReLU."""
        return self.index_head_dim**-0.5

    @property
    def indexer_weight_scale(self) -> float:
        """`H_I^-0.5`, applied to the indexer head weights."""
        return self.index_n_heads**-0.5

    @property
    def rope_freqs(self) -> np.ndarray:
        """RoPE frequencies `f_i`, float64 `[d_rope / 2]`, YaRN-corrected when configured (dsa.md §2)."""
        from dsa_hybrid import reference

        return reference.rope_freqs(self.qk_rope_head_dim, self.rope_theta, self.rope_scaling)

    def layer_indexer_type(self, layer: int) -> IndexerType:
        """ "full" if layer `layer` runs its own indexer, "shared" if it reuses the previous full layer's."""
        if not 0 <= layer < max(self.num_hidden_layers, len(self.indexer_types)):
            raise IndexError(f"layer {layer} out of range for {self.num_hidden_layers} layers")
        return self.indexer_types[layer] if self.indexer_types else "full"

    def layer_mlp_type(self, layer: int) -> MlpType:
        """ "sparse" if layer `layer`'s MLP is the MoE block (`models.moe`), "dense" if a SwiGLU MLP.
        `IndexError` naming the layer unless `0 <= layer < num_hidden_layers`, `TypeError` for a
        non-integer `layer`."""
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layer: expected an integer layer number, got {type(layer).__name__}")
        if not 0 <= layer < self.num_hidden_layers:
            raise IndexError(f"layer {layer} out of range for {self.num_hidden_layers} layers")
        if self.mlp_layer_types:
            return self.mlp_layer_types[layer]
        return self._derived_mlp_type(layer)

    def _derived_mlp_type(self, layer: int) -> MlpType:
        return "sparse" if self.n_routed_experts > 0 and layer >= self.first_k_dense_replace else "dense"

    def replace(self, **changes: Any) -> DSAConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ----- presets ----------------------------------------------------------------

    @classmethod
    def deepseek_v32(cls) -> DSAConfig:
        """DeepSeek-V3.2 (671B) attention shapes: 128 heads, 64 indexer heads, YaRN ×40."""
        return cls(
            model_type="deepseek_v32",
            hidden_size=7168,
            num_attention_heads=128,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            index_n_heads=64,
            index_head_dim=128,
            index_topk=2048,
            rope_theta=10000.0,
            rope_scaling=YarnScaling(
                factor=40.0,
                original_max_position_embeddings=4096,
                beta_fast=32.0,
                beta_slow=1.0,
                mscale=1.0,
                mscale_all_dim=1.0,
            ),
            indexer_rope_pairing="half",
            mla_rope_pairing="interleaved",
            rms_norm_eps=1e-6,
            num_hidden_layers=61,
            vocab_size=129280,
            intermediate_size=18432,
            max_position_embeddings=163840,
            **_released_mlp(n_group=8, topk_group=4),
        )

    @classmethod
    def glm5(cls) -> DSAConfig:
        """GLM-5 (`glm_moe_dsa`) attention shapes: 64 heads, 32 indexer heads, theta 1e6, no YaRN."""
        return cls(
            model_type="glm_moe_dsa",
            hidden_size=6144,
            num_attention_heads=64,
            q_lora_rank=2048,
            kv_lora_rank=512,
            qk_nope_head_dim=192,
            qk_rope_head_dim=64,
            v_head_dim=256,
            index_n_heads=32,
            index_head_dim=128,
            index_topk=2048,
            rope_theta=1_000_000.0,
            rope_scaling=None,
            indexer_rope_pairing="interleaved",
            mla_rope_pairing="interleaved",
            rms_norm_eps=1e-5,
            num_hidden_layers=78,
            vocab_size=154880,
            intermediate_size=12288,
            max_position_embeddings=202752,
            **_released_mlp(n_group=1, topk_group=1),
        )

    @classmethod
    def tiny(cls, model_type: str = "deepseek_v32") -> DSAConfig:
        """A small config with the structure of `model_type`, for tests: cheap, but `index_topk` is
        small enough (16) that selection really drops tokens at a few dozen positions."""
        base = cls.deepseek_v32() if model_type == "deepseek_v32" else cls.glm5()
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unknown model_type {model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}")
        return base.replace(
            hidden_size=64,
            num_attention_heads=4,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=16,
            v_head_dim=16,
            index_n_heads=4,
            index_head_dim=32,
            index_topk=16,
            num_hidden_layers=2,
            vocab_size=256,
            intermediate_size=128,
            first_k_dense_replace=2,
            max_position_embeddings=4096,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=min(base.n_group, 4),
            topk_group=min(base.topk_group, 2),
            moe_intermediate_size=32,
            rope_scaling=(
                None
                if base.rope_scaling is None
                else dataclasses.replace(base.rope_scaling, factor=4.0, original_max_position_embeddings=256)
            ),
            indexer_types=(),
        )

    @classmethod
    def small(cls, model_type: str = "deepseek_v32") -> DSAConfig:
        """A demo-sized config with the structure of `model_type`: small enough to serve 8K-token
        prompts on a laptop CPU, with `index_topk` 256, so long prompts really are sparse."""
        base = cls.tiny(model_type)
        return base.replace(
            hidden_size=256,
            num_attention_heads=8,
            q_lora_rank=128,
            kv_lora_rank=128,
            qk_nope_head_dim=32,
            qk_rope_head_dim=32,
            v_head_dim=32,
            index_n_heads=16,
            index_head_dim=64,
            index_topk=256,
            num_hidden_layers=2,
            vocab_size=2048,
            intermediate_size=512,
            first_k_dense_replace=2,
            max_position_embeddings=32768,
            rope_scaling=(
                None
                if base.rope_scaling is None
                else dataclasses.replace(base.rope_scaling, factor=8.0, original_max_position_embeddings=4096)
            ),
        )

    # ----- Hugging Face config.json ------------------------------------------------

    @classmethod
    def from_hf_config(cls, path_or_dict: str | os.PathLike[str] | dict[str, Any]) -> DSAConfig:
        """Read a Hugging Face `config.json` (a path to the file or its directory, or the parsed dict)
        of model type `deepseek_v32` or `glm_moe_dsa`.

        Accepts both RoPE spellings: top-level `rope_theta` + `rope_scaling` (transformers 4.x) and
        `rope_parameters` (transformers 5.x). The indexer pairing comes from `indexer_rope_interleave`
        when present, else from the model type's default (dsa.md §1).
        """
        d = _load_json(path_or_dict)
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json: unsupported model_type {model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}"
            )

        def need(key: str) -> Any:
            if key not in d or d[key] is None:
                raise ValueError(f"config.json ({model_type}): missing required field {key!r}")
            return d[key]

        def integer(key: str, default: int | None = None, lo: int = 0, hi: int = _MAX_WIDTH) -> int:
            """An integer field in [lo, hi] (None / absent → `default`; required when that is None)."""
            v = need(key) if default is None else d.get(key)
            if v is None:
                return int(default)  # type: ignore[arg-type]  # default is not None here
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"config.json ({model_type}): {key} must be an integer in [{lo}, {hi}], got {v!r}")
            return v

        def real(key: str, v: Any, positive: bool = True) -> float:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or (positive and v <= 0):
                raise ValueError(
                    f"config.json ({model_type}): {key} must be a finite "
                    f"{'positive ' if positive else ''}number, got {v!r}"
                )
            return float(v)

        def flag(key: str, default: bool) -> bool:
            v = d.get(key, default)
            if not isinstance(v, bool):
                raise ValueError(f"config.json ({model_type}): {key} must be true or false, got {v!r}")
            return v

        def names(key: str) -> tuple[str, ...]:
            v = d.get(key) or []
            if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
                raise ValueError(f"config.json ({model_type}): {key} must be a list of strings, got {v!r}")
            return tuple(v)

        rope = d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"config.json ({model_type}): rope_parameters must be an object, got {rope!r}")
        theta = d.get("rope_theta", rope.get("rope_theta"))
        if theta is None:
            raise ValueError(f"config.json ({model_type}): missing 'rope_theta' (or rope_parameters.rope_theta)")
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", rope.get("type")) else None)
        if scaling is not None and not isinstance(scaling, dict):
            raise ValueError(f"config.json ({model_type}): rope_scaling must be an object, got {scaling!r}")
        yarn = _parse_yarn(scaling, model_type)

        if "indexer_rope_interleave" in d:
            indexer_pairing: RopePairing = "interleaved" if flag("indexer_rope_interleave", False) else "half"
        else:
            indexer_pairing = _DEFAULT_INDEXER_PAIRING[model_type]
        mla_pairing: RopePairing = "interleaved" if flag("rope_interleave", True) else "half"
        quant = d.get("quantization_config")
        if quant is not None:
            if not isinstance(quant, dict):
                raise ValueError(f"config.json ({model_type}): quantization_config must be an object, got {quant!r}")
            block = quant.get("weight_block_size")
            if quant.get("quant_method") == "fp8" and block is not None and list(block) != [128, 128]:
                raise ValueError(
                    f"config.json ({model_type}): quantization_config.weight_block_size {block!r} is not supported "
                    "(FP8 weights must use 128 x 128 blocks)"
                )

        return cls(
            model_type=model_type,
            hidden_size=integer("hidden_size", lo=1),
            num_attention_heads=integer("num_attention_heads", lo=1, hi=_MAX_HEADS),
            q_lora_rank=integer("q_lora_rank", lo=1),
            kv_lora_rank=integer("kv_lora_rank", lo=1),
            qk_nope_head_dim=integer("qk_nope_head_dim"),
            qk_rope_head_dim=integer("qk_rope_head_dim", lo=1),
            v_head_dim=integer("v_head_dim", lo=1),
            index_n_heads=integer("index_n_heads", lo=1, hi=_MAX_HEADS),
            index_head_dim=integer("index_head_dim", lo=1),
            index_topk=integer("index_topk", lo=1, hi=_MAX_POSITIONS),
            rope_theta=real("rope_theta", theta),
            rope_scaling=yarn,
            indexer_rope_pairing=indexer_pairing,
            mla_rope_pairing=mla_pairing,
            rms_norm_eps=real("rms_norm_eps", d.get("rms_norm_eps", 1e-6)),
            latent_norm_eps=real("latent_norm_eps", d.get("latent_norm_eps", 1e-6)),
            num_hidden_layers=integer("num_hidden_layers", 1, lo=1, hi=_MAX_LAYERS),
            vocab_size=integer("vocab_size", 0, hi=_MAX_VOCAB),
            intermediate_size=integer("intermediate_size", 0),
            first_k_dense_replace=integer("first_k_dense_replace", 0, hi=_MAX_LAYERS),
            max_position_embeddings=integer("max_position_embeddings", 0, hi=_MAX_POSITIONS),
            n_routed_experts=integer("n_routed_experts", 0, hi=_MAX_EXPERTS),
            n_shared_experts=integer("n_shared_experts", 0, hi=_MAX_EXPERTS),
            num_experts_per_tok=integer("num_experts_per_tok", 0, hi=_MAX_EXPERTS),
            n_group=integer("n_group", 1, lo=1, hi=_MAX_EXPERTS) if d.get("n_group") != 0 else 1,
            topk_group=integer("topk_group", 1, lo=1, hi=_MAX_EXPERTS) if d.get("topk_group") != 0 else 1,
            norm_topk_prob=flag("norm_topk_prob", True),
            routed_scaling_factor=real("routed_scaling_factor", d.get("routed_scaling_factor", 1.0)),
            moe_intermediate_size=integer("moe_intermediate_size", 0),
            mlp_layer_types=cast(Any, names("mlp_layer_types")),
            indexer_types=cast(Any, names("indexer_types")),
            eos_token_id=_parse_eos(d.get("eos_token_id"), model_type),
            num_nextn_predict_layers=integer("num_nextn_predict_layers", 0, hi=_MAX_LAYERS),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The attention-relevant part of a Hugging Face `config.json` (transformers 4.x spelling);
        `from_hf_config(cfg.to_hf_config()) == cfg`."""
        d: dict[str, Any] = {
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "rope_theta": self.rope_theta,
            "rope_scaling": None
            if self.rope_scaling is None
            else {"type": "yarn", **dataclasses.asdict(self.rope_scaling)},
            "rope_interleave": self.mla_rope_pairing == "interleaved",
            "indexer_rope_interleave": self.indexer_rope_pairing == "interleaved",
            "rms_norm_eps": self.rms_norm_eps,
            "num_hidden_layers": self.num_hidden_layers,
            "vocab_size": self.vocab_size,
            "intermediate_size": self.intermediate_size,
            "first_k_dense_replace": self.first_k_dense_replace,
            "max_position_embeddings": self.max_position_embeddings,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "moe_intermediate_size": self.moe_intermediate_size,
            # transformers decides dense vs MoE by `mlp_layer_types` (its default differs per model type).
            "mlp_layer_types": [self.layer_mlp_type(i) for i in range(self.num_hidden_layers)],
        }
        if self.latent_norm_eps != 1e-6:  # not a transformers key: written only when it changes behaviour
            d["latent_norm_eps"] = self.latent_norm_eps
        if self.indexer_types:
            d["indexer_types"] = list(self.indexer_types)
        if self.num_nextn_predict_layers:
            d["num_nextn_predict_layers"] = self.num_nextn_predict_layers
        if self.eos_token_id:  # one id as an int, several as a list (as the model repositories write it)
            d["eos_token_id"] = self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)
        return d


def _released_mlp(n_group: int, topk_group: int) -> dict[str, Any]:
    """The MLP fields DeepSeek-V3.2 and GLM-5 share in their released config.json: the first 3 layers
    dense, then MoE with 256 routed experts of width 2048, 1 shared expert, 8 experts per token,
    normalized sigmoid weights scaled by 2.5; they differ only in group-limited routing (DeepSeek-V3.2:
    8 groups, 4 kept; GLM-5: none). Values as in huggingface.co/deepseek-ai/DeepSeek-V3.2/config.json and
    huggingface.co/zai-org/GLM-5/config.json (tests/models/test_config.py records them field by field)."""
    return dict(
        first_k_dense_replace=3,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        moe_intermediate_size=2048,
    )


# Bounds on config.json sizes: far above any released model, low enough that a hostile value is refused
# before anything is sized by it.
_MAX_WIDTH = 1 << 20
_MAX_HEADS = 1 << 12
_MAX_LAYERS = 1 << 12
_MAX_VOCAB = 1 << 23
_MAX_EXPERTS = 1 << 16
_MAX_POSITIONS = 1 << 31


def _load_json(path_or_dict: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    if isinstance(path_or_dict, dict):
        return path_or_dict
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d


def _parse_eos(value: Any, model_type: str) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = [value] if isinstance(value, int) else value
    if not isinstance(ids, list) or any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
        raise ValueError(f"config.json ({model_type}): eos_token_id must be an int or a list of ints, got {value!r}")
    return tuple(ids)


def _parse_yarn(scaling: dict[str, Any] | None, model_type: str) -> YarnScaling | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "yarn":
        raise ValueError(f"config.json ({model_type}): unsupported rope scaling type {kind!r}; only 'yarn' is")
    try:
        fields = dict(
            factor=float(scaling["factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            beta_fast=float(scaling.get("beta_fast", 32.0)),
            beta_slow=float(scaling.get("beta_slow", 1.0)),
            mscale=float(scaling.get("mscale", 1.0)),
            mscale_all_dim=float(scaling.get("mscale_all_dim", 1.0)),
        )
    except KeyError as e:
        raise ValueError(f"config.json ({model_type}): yarn rope scaling is missing {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.json ({model_type}): yarn rope scaling has a non-numeric field ({e})") from None
    try:
        return YarnScaling(**fields)  # type: ignore[arg-type]
    except ValueError as e:
        raise ValueError(f"config.json ({model_type}): {e}") from None

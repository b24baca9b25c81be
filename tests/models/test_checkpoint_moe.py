"""Loading tiny GLM-5 / DeepSeek-V3.2 checkpoints with MoE layers and GLM-5 "shared" indexer layers,
written by `models.checkpoint.write_safetensors` in the layout transformers uses: shared layers carry no
indexer tensors (their indexer parameters load as None), MoE layers their router, experts and shared
experts; the loaded model is the model that was written."""

from __future__ import annotations

from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from dsa_hybrid import DSAConfig
from dsa_hybrid.layers.dsa_attention import INDEXER_PARAMS
from dsa_hybrid.models.causal_lm import ModelParams, generate_greedy
from dsa_hybrid.models.checkpoint import write_safetensors


def state_dict(params: ModelParams) -> dict[str, np.ndarray]:
    """The Hugging Face tensors of a model (transformers' names)."""
    out = {
        "model.embed_tokens.weight": np.asarray(params.embed),
        "model.norm.weight": np.asarray(params.norm),
        "lm_head.weight": np.asarray(params.lm_head),
    }
    for i, blk in enumerate(params.blocks):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = np.asarray(blk.input_norm)
        out[p + "post_attention_layernorm.weight"] = np.asarray(blk.post_norm)
        out.update(blk.attn.state_dict(i))
        if blk.moe is not None:
            out.update(blk.moe.state_dict(i))
        else:
            for n, w in (("gate", blk.gate), ("up", blk.up), ("down", blk.down)):
                out[f"{p}mlp.{n}_proj.weight"] = np.asarray(w)
    return out


def glm_cfg() -> DSAConfig:
    return DSAConfig.tiny("glm_moe_dsa").replace(
        num_hidden_layers=4, indexer_types=("full", "shared", "shared", "full"), first_k_dense_replace=1
    )


def assert_same(a: ModelParams, b: ModelParams) -> None:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb  # the same structure: None in the same places
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_glm_checkpoint_with_shared_indexer_layers_and_moe_loads(tmp_path: Path) -> None:
    cfg = glm_cfg()
    params = ModelParams.random(cfg, seed=2)
    tensors = state_dict(params)
    assert not any(
        k.startswith(("model.layers.1.self_attn.indexer", "model.layers.2.self_attn.indexer")) for k in tensors
    )
    assert "model.layers.3.self_attn.indexer.wk.weight" in tensors
    assert (
        "model.layers.1.mlp.experts.7.down_proj.weight" in tensors and "model.layers.0.mlp.gate_proj.weight" in tensors
    )
    write_safetensors(tmp_path / "model.safetensors", tensors)
    (tmp_path / "config.json").write_text(__import__("json").dumps(cfg.to_hf_config()))
    cfg2 = DSAConfig.from_hf_config(tmp_path)
    assert cfg2 == cfg
    loaded = ModelParams.from_checkpoint(tmp_path, cfg2)
    for i, blk in enumerate(loaded.blocks):
        shared = cfg.layer_indexer_type(i) == "shared"
        assert all((getattr(blk.attn, n) is None) == shared for n in INDEXER_PARAMS)
        assert blk.attn.has_indexer is not shared
        assert (blk.moe is not None) == (i >= 1) and (blk.gate is None) == (i >= 1)
    assert_same(params, loaded)
    prompt = list(range(3, 33))  # longer than index_topk (16)
    a = generate_greedy(params, cfg, prompt, 4, backend="xla", latent_kind="f32", indexer="exact")
    assert a == generate_greedy(loaded, cfg2, prompt, 4, backend="xla", latent_kind="f32", indexer="exact")


def test_fused_expert_layout_and_bf16_load_alike(tmp_path: Path) -> None:
    """transformers' in-memory layout (`mlp.experts.gate_up_proj [E, 2I, d]`, `mlp.experts.down_proj`)
    loads as the per-expert layout does; bf16 tensors load as their float32 values."""
    cfg = glm_cfg()
    params = ModelParams.random(cfg, seed=5)
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in state_dict(params).items()}
    fused = {}
    for k, v in tensors.items():
        if ".mlp.experts." not in k:
            fused[k] = v
    for i in range(1, cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts."
        E = cfg.n_routed_experts
        fused[p + "gate_up_proj"] = np.stack(
            [np.concatenate([tensors[f"{p}{e}.gate_proj.weight"], tensors[f"{p}{e}.up_proj.weight"]]) for e in range(E)]
        )
        fused[p + "down_proj"] = np.stack([tensors[f"{p}{e}.down_proj.weight"] for e in range(E)])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_safetensors(tmp_path / "a" / "model.safetensors", tensors)
    write_safetensors(tmp_path / "b" / "model.safetensors", fused)
    a, b = ModelParams.from_checkpoint(tmp_path / "a", cfg), ModelParams.from_checkpoint(tmp_path / "b", cfg)
    assert_same(a, b)
    np.testing.assert_array_equal(
        np.asarray(a.blocks[2].moe.gate),
        np.asarray(params.blocks[2].moe.gate).astype(ml_dtypes.bfloat16).astype(np.float32),
    )


def test_deepseek_moe_checkpoint_missing_an_expert_names_it(tmp_path: Path) -> None:
    cfg = DSAConfig.tiny("deepseek_v32").replace(first_k_dense_replace=1)
    tensors = state_dict(ModelParams.random(cfg, seed=1))
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    write_safetensors(tmp_path / "model.safetensors", {k: v for k, v in tensors.items() if k != name})
    with pytest.raises(KeyError, match=r"experts\.3\.up_proj\.weight: missing"):
        ModelParams.from_checkpoint(tmp_path, cfg)
    write_safetensors(tmp_path / "model.safetensors", tensors | {name.replace("3", "2"): np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match="expected shape"):
        ModelParams.from_checkpoint(tmp_path, cfg)


def test_random_moe_model_runs_jitted() -> None:
    cfg = DSAConfig.tiny("deepseek_v32").replace(first_k_dense_replace=1)
    params = ModelParams.random(cfg, seed=0)
    assert params.blocks[0].moe is None and params.blocks[1].moe is not None
    out = generate_greedy(params, cfg, list(range(1, 21)), 3, backend="xla")
    assert all(0 <= t < cfg.vocab_size for t in out)

"""MoE language models against Hugging Face transformers (golden files from
`python tests/golden/make_golden.py moe`; torch is not needed here): tiny DeepseekV32ForCausalLM with
group-limited routing (8 experts in 4 groups, 2 groups kept) and GlmMoeDsaForCausalLM with "shared"
indexer layers, first layer dense, the others MoE, a random `e_score_correction_bias`, per-expert
checkpoint tensors. The prompt (30 tokens) is longer than index_topk (16). Prompt logits within float32
tolerance, greedy tokens identical."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from dsa_hybrid import DSAConfig
from dsa_hybrid.models.causal_lm import ModelParams, create_caches, forward_jit, generate_greedy

GOLDEN = Path(__file__).parents[1] / "golden"


def load(model_type: str) -> tuple[DSAConfig, ModelParams, dict]:
    d = GOLDEN / f"{model_type}_moe_lm"
    cfg = DSAConfig.from_hf_config(d / "config.json")
    return cfg, ModelParams.from_checkpoint(d, cfg), dict(np.load(d / "io.npz"))


@pytest.mark.parametrize("model_type", ["deepseek_v32", "glm_moe_dsa"])
def test_moe_lm_matches_transformers(model_type: str) -> None:
    cfg, params, io = load(model_type)
    assert cfg.model_type == model_type and cfg.index_topk == 16 and io["prompt"].size == 30
    assert [cfg.layer_mlp_type(i) for i in range(cfg.num_hidden_layers)] == ["dense"] + ["sparse"] * (
        cfg.num_hidden_layers - 1
    )
    if model_type == "glm_moe_dsa":
        assert cfg.indexer_types == ("full", "shared", "full", "shared") and not params.blocks[1].attn.has_indexer
    else:
        assert cfg.n_group == 4 and cfg.topk_group == 2
    L = io["prompt"].size
    caches = create_caches(cfg, 4, 8, latent_kind="f32", indexer="exact")
    pos = jnp.arange(L, dtype=jnp.int32)
    table = jnp.tile(jnp.arange(4, dtype=jnp.int32), (L, 1))
    logits, _ = forward_jit(params, cfg, jnp.asarray(io["prompt"]), pos, pos, table, caches, "xla")
    ref = io["logits"]
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    got = generate_greedy(params, cfg, io["prompt"], 12, page_size=8, backend="xla", latent_kind="f32", indexer="exact")
    assert got == io["generated"].tolist()

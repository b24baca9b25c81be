"""MoE language models against Hugging Face transformers (golden files from
`python tests/golden/make_golden.py moe`; torch is not needed here): tiny DeepseekV32ForCausalLM with
group-limited routing (8 experts in 4 groups, 2 groups kept) and GlmMoeDsaForCausalLM with "shared"
indexer layers, first layer dense, the others MoE, a random `e_score_correction_bias`, per-expert
checkpoint tensors. The prompt (30 tokens) is longer than index_topk (16). Prompt logits within float32
tolerance, every layer's output too and its top-k set equal to transformers', greedy tokens identical."""

from __future__ import annotations

import pytest
from lm_golden import check_prompt_and_greedy, load


@pytest.mark.parametrize("model_type", ["deepseek_v32", "glm_moe_dsa"])
def test_moe_lm_matches_transformers(model_type: str) -> None:
    cfg, params, io = load(f"{model_type}_moe_lm")
    assert cfg.model_type == model_type and cfg.index_topk == 16 and io["prompt"].size == 30
    assert [cfg.layer_mlp_type(i) for i in range(cfg.num_hidden_layers)] == ["dense"] + ["sparse"] * (
        cfg.num_hidden_layers - 1
    )
    if model_type == "glm_moe_dsa":
        assert cfg.indexer_types == ("full", "shared", "full", "shared") and not params.blocks[1].attn.has_indexer
    else:
        assert cfg.n_group == 4 and cfg.topk_group == 2
    check_prompt_and_greedy(params, cfg, io)

"""DSAConfig: presets against docs/dsa.md §1, Hugging Face config.json loading and round trips."""

import json

import pytest
from hypothesis import given

from dsa_hybrid import DSAConfig, YarnScaling, testing

# Hugging Face config.json excerpts as the model repositories ship them (attention-relevant and MoE keys).
# Checked against the released files' values, huggingface.co/deepseek-ai/DeepSeek-V3.2/blob/main/config.json
# and huggingface.co/zai-org/GLM-5/blob/main/config.json, as mirrored (each key, with these values, as its
# loader's default) in github.com/jd-opensource/xllm xllm/models/llm/deepseek_v32.h and .../glm5.h
# (`REGISTER_MODEL_ARGS`); GLM-5's MoE keys also in a GLM-5-family snapshot check (first_k_dense_replace 3,
# 256 routed, 1 shared, 8 per token). Both releases also carry `num_nextn_predict_layers: 1` (one MTP layer,
# skipped by the loader) and their `eos_token_id` (1; [154820, 154827, 154829]), which the presets leave out.
V32_HF = {
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "hidden_size": 7168,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 2048,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rms_norm_eps": 1e-06,
    "num_hidden_layers": 61,
    "vocab_size": 129280,
    "intermediate_size": 18432,
    "first_k_dense_replace": 3,
    "max_position_embeddings": 163840,
    "n_routed_experts": 256,
    "n_group": 8,
    "topk_group": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "moe_intermediate_size": 2048,
}

GLM5_HF = {
    "architectures": ["GlmMoeDsaForCausalLM"],
    "model_type": "glm_moe_dsa",
    "hidden_size": 6144,
    "num_attention_heads": 64,
    "q_lora_rank": 2048,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 192,
    "qk_rope_head_dim": 64,
    "v_head_dim": 256,
    "index_n_heads": 32,
    "index_head_dim": 128,
    "index_topk": 2048,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "rms_norm_eps": 1e-05,
    "num_hidden_layers": 78,
    "vocab_size": 154880,
    "intermediate_size": 12288,
    "first_k_dense_replace": 3,
    "max_position_embeddings": 202752,
    "n_routed_experts": 256,
    "n_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "moe_intermediate_size": 2048,
}


def test_v32_preset_matches_spec_table():
    c = DSAConfig.deepseek_v32()
    assert (c.hidden_size, c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank) == (7168, 128, 1536, 512)
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (128, 64, 128)
    assert (c.index_n_heads, c.index_head_dim, c.index_topk) == (64, 128, 2048)
    assert c.rope_theta == 1e4
    assert c.rope_scaling == YarnScaling(40.0, 4096, 32.0, 1.0, 1.0, 1.0)
    assert (c.indexer_rope_pairing, c.mla_rope_pairing) == ("half", "interleaved")
    assert c.latent_dim == 576 and c.qk_head_dim == 192
    assert c.softmax_scale == pytest.approx(0.1352338, abs=5e-8)
    assert c.rope_freqs.shape == (32,)


def test_glm5_preset_matches_spec_table():
    c = DSAConfig.glm5()
    assert (c.hidden_size, c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank) == (6144, 64, 2048, 512)
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (192, 64, 256)
    assert (c.index_n_heads, c.index_head_dim, c.index_topk) == (32, 128, 2048)
    assert c.rope_theta == 1e6 and c.rope_scaling is None
    assert (c.indexer_rope_pairing, c.mla_rope_pairing) == ("interleaved", "interleaved")
    assert c.softmax_scale == pytest.approx(256**-0.5)


# The released MoE routing of each model (config.json keys), recorded from the sources cited above.
RELEASED_MOE = {
    "deepseek_v32": dict(
        first_k_dense_replace=3, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
        moe_intermediate_size=2048, n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
        intermediate_size=18432,
    ),
    "glm_moe_dsa": dict(
        first_k_dense_replace=3, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
        moe_intermediate_size=2048, n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        intermediate_size=12288,
    ),
}  # fmt: skip


@pytest.mark.parametrize("preset", [DSAConfig.deepseek_v32, DSAConfig.glm5])
def test_presets_moe_fields_match_the_released_configs(preset):
    c = preset()
    want = RELEASED_MOE[c.model_type]
    assert {k: getattr(c, k) for k in want} == want
    assert [c.layer_mlp_type(i) for i in (0, 2, 3, c.num_hidden_layers - 1)] == ["dense", "dense", "sparse", "sparse"]
    hf = V32_HF if c.model_type == "deepseek_v32" else GLM5_HF
    assert {k: hf[k] for k in want} == want  # the excerpts above agree with the recorded values


def test_hf_configs_load_to_the_presets(tmp_path):
    assert DSAConfig.from_hf_config(V32_HF) == DSAConfig.deepseek_v32()
    assert DSAConfig.from_hf_config(GLM5_HF) == DSAConfig.glm5()
    # From a file and from its directory.
    (tmp_path / "config.json").write_text(json.dumps(GLM5_HF))
    assert DSAConfig.from_hf_config(tmp_path / "config.json") == DSAConfig.glm5()
    assert DSAConfig.from_hf_config(str(tmp_path)) == DSAConfig.glm5()


def test_glm_transformers4_spelling_and_indexer_types():
    d = {k: v for k, v in GLM5_HF.items() if k != "rope_parameters"}
    d["rope_theta"] = 1e6
    d["indexer_types"] = ["full", "shared", "shared", "full"]
    c = DSAConfig.from_hf_config(d)
    assert c.rope_theta == 1e6
    assert [c.layer_indexer_type(i) for i in range(4)] == ["full", "shared", "shared", "full"]
    assert DSAConfig.deepseek_v32().layer_indexer_type(60) == "full"


def test_explicit_indexer_pairing_overrides_model_default():
    assert DSAConfig.from_hf_config({**GLM5_HF, "indexer_rope_interleave": False}).indexer_rope_pairing == "half"
    assert DSAConfig.from_hf_config({**V32_HF, "indexer_rope_interleave": True}).indexer_rope_pairing == "interleaved"


@given(testing.dsa_configs())
def test_hf_round_trip(cfg):
    assert DSAConfig.from_hf_config(cfg.to_hf_config()) == cfg
    assert DSAConfig.from_hf_config(json.loads(json.dumps(cfg.to_hf_config()))) == cfg


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "llama"}, "unsupported model_type 'llama'"),
        ({"index_topk": None}, "missing required field 'index_topk'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "unsupported rope scaling type 'linear'"),
        ({"rope_scaling": {"type": "yarn"}}, "yarn rope scaling is missing 'factor'"),
        ({"index_n_heads": 0}, r"index_n_heads must be an integer in \[1, 4096\], got 0"),
        ({"indexer_types": ["shared", "full"]}, "first layer must be 'full'"),
        ({"indexer_types": ["full", "sparse"]}, "unknown entries"),
    ],
)
def test_bad_configs_raise_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        DSAConfig.from_hf_config({**V32_HF, **change})


def test_missing_rope_theta_is_an_error():
    d = {k: v for k, v in GLM5_HF.items() if k != "rope_parameters"}
    with pytest.raises(ValueError, match="rope_theta"):
        DSAConfig.from_hf_config(d)


def test_tiny_presets_keep_the_model_structure():
    for mt in ("deepseek_v32", "glm_moe_dsa"):
        t = DSAConfig.tiny(mt)
        assert t.model_type == mt and t.index_topk == 16
        assert (
            t.indexer_rope_pairing
            == (DSAConfig.deepseek_v32() if mt == "deepseek_v32" else DSAConfig.glm5()).indexer_rope_pairing
        )
    with pytest.raises(ValueError, match="unknown model_type"):
        DSAConfig.tiny("llama")


def test_eos_token_ids_from_config_json_round_trip():
    """`eos_token_id`: an int or a list in config.json, a tuple in DSAConfig (empty when absent), written
    back as the repositories write it."""
    assert DSAConfig.from_hf_config(V32_HF).eos_token_id == ()
    one = DSAConfig.from_hf_config({**V32_HF, "eos_token_id": 1})
    several = DSAConfig.from_hf_config({**GLM5_HF, "eos_token_id": [154820, 154827, 154829]})
    assert one.eos_token_id == (1,) and several.eos_token_id == (154820, 154827, 154829)
    assert one.to_hf_config()["eos_token_id"] == 1 and several.to_hf_config()["eos_token_id"] == [
        154820,
        154827,
        154829,
    ]
    for c in (one, several):
        assert DSAConfig.from_hf_config(c.to_hf_config()) == c
    assert "eos_token_id" not in DSAConfig.from_hf_config(V32_HF).to_hf_config()
    assert DSAConfig.tiny().replace(eos_token_id=7).eos_token_id == (7,)
    with pytest.raises(ValueError, match="eos_token_id"):
        DSAConfig.from_hf_config({**V32_HF, "eos_token_id": "</s>"})
    with pytest.raises(ValueError, match="eos_token_id"):
        DSAConfig.tiny().replace(eos_token_id=[-1])

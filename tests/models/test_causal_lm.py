"""The small DSA causal LM: greedy generation equals Hugging Face transformers' `generate` token for token
on a tiny all-dense DeepSeek-V3.2 checkpoint (golden files from tests/golden/make_golden.py), with a
prompt longer than index_topk so that the indexer really drops tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dsa_hybrid import DSAConfig
from dsa_hybrid.models.causal_lm import ModelParams, generate_greedy

GOLDEN = Path(__file__).parents[1] / "golden" / "deepseek_v32_lm"


@pytest.mark.parametrize("page_size", [8, 16])
def test_greedy_generation_matches_transformers(page_size: int) -> None:
    cfg = DSAConfig.from_hf_config(GOLDEN / "config.json")
    assert cfg.num_hidden_layers == 2 and cfg.first_k_dense_replace >= 2 and cfg.index_topk == 16
    params = ModelParams.from_checkpoint(GOLDEN, cfg)
    io = np.load(GOLDEN / "io.npz")
    assert io["prompt"].size == 30
    got = generate_greedy(
        params, cfg, io["prompt"], 12, page_size=page_size, backend="xla", latent_kind="f32", indexer="exact"
    )
    assert got == io["generated"].tolist()


def test_moe_layer_without_its_tensors_names_the_missing_one() -> None:
    cfg = DSAConfig.from_hf_config(GOLDEN / "config.json").replace(first_k_dense_replace=1)
    assert cfg.layer_mlp_type(1) == "sparse"
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.gate\.weight"):
        ModelParams.from_checkpoint(GOLDEN, cfg)


def test_random_model_generates_deterministically() -> None:
    cfg = DSAConfig.tiny("glm_moe_dsa")
    params = ModelParams.random(cfg, seed=3)
    a = generate_greedy(params, cfg, list(range(1, 25)), 4, backend="xla")
    assert a == generate_greedy(params, cfg, list(range(1, 25)), 4, backend="xla")
    assert all(0 <= t < cfg.vocab_size for t in a)

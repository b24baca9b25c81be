"""Weights resident at checkpoint size: tiny DeepSeek-V3.2 / GLM-5 MoE checkpoints stored as they are
released (`make_golden.py quant`: all-bf16, and FP8 e4m3fn linear weights with 128 × 128
`weight_scale_inv` blocks, ragged at the edges) load with `weights="checkpoint"` as bf16 arrays and
`Fp8Weight`s, take within a few percent of the checkpoint's bytes, and match transformers (float32 on the
stored values) in logits and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_hybrid import DSAConfig
from dsa_hybrid.layers.weights import Fp8Weight
from dsa_hybrid.models.causal_lm import ModelParams, checkpoint_nbytes, create_caches, forward_jit, generate_greedy

GOLDEN = Path(__file__).parents[1] / "golden"


@pytest.mark.parametrize(
    ("model_type", "fmt"),
    [("deepseek_v32", "fp8"), ("glm_moe_dsa", "fp8"), ("deepseek_v32", "bf16"), ("glm_moe_dsa", "bf16")],
)
def test_checkpoint_format_stays_resident_and_matches_transformers(model_type: str, fmt: str) -> None:
    d = GOLDEN / f"{model_type}_moe_lm_{fmt}"
    cfg = DSAConfig.from_hf_config(d)
    params = ModelParams.from_checkpoint(d, cfg, weights="checkpoint")
    io = dict(np.load(d / "io.npz"))
    blk = params.blocks[1]
    assert blk.moe is not None
    if fmt == "fp8":
        assert isinstance(blk.attn.q_b, Fp8Weight) and isinstance(blk.moe.gate, Fp8Weight)
        assert blk.moe.gate.codes.shape == (cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size)
        assert blk.moe.gate.scale_inv.shape == (cfg.n_routed_experts, 1, 2)  # 192 columns: a ragged 2nd block
        assert isinstance(params.blocks[0].down, Fp8Weight) and params.blocks[0].down.scale_inv.shape == (2, 3)
        assert params.lm_head.dtype == jnp.bfloat16 and blk.moe.router.dtype == jnp.bfloat16
    else:
        assert blk.attn.q_b.dtype == jnp.bfloat16 and blk.moe.gate.dtype == jnp.bfloat16
    assert set(params.weight_formats()) <= {"float32", "bfloat16", "fp8"}
    stored = checkpoint_nbytes(d, cfg)
    # Only the norms (float32 resident, bf16 stored) and the FP8 scales' layout differ.
    assert abs(params.nbytes - stored) <= 0.03 * stored, (params.nbytes, stored)
    L = io["prompt"].size
    caches = create_caches(cfg, 4, 8, latent_kind="f32", indexer="exact")
    pos = jnp.arange(L, dtype=jnp.int32)
    table = jnp.tile(jnp.arange(4, dtype=jnp.int32), (L, 1))
    logits, _ = forward_jit(params, cfg, jnp.asarray(io["prompt"]), pos, pos, table, caches, "xla")
    ref = io["logits"]
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    if (model_type, fmt) == ("deepseek_v32", "fp8"):  # greedy tokens once (the logits pin the rest)
        got = generate_greedy(
            params, cfg, io["prompt"], 12, page_size=8, backend="xla", latent_kind="f32", indexer="exact"
        )
        assert got == io["generated"].tolist()


def test_float32_mode_widens_and_agrees_with_checkpoint_mode() -> None:
    d = GOLDEN / "deepseek_v32_moe_lm_fp8"
    cfg = DSAConfig.from_hf_config(d)
    wide = ModelParams.from_checkpoint(d, cfg, weights="float32")
    kept = ModelParams.from_checkpoint(d, cfg, weights="checkpoint")
    assert set(wide.weight_formats()) == {"float32"}
    assert wide.nbytes > 2.5 * kept.nbytes
    for a, b in zip(jax.tree.leaves(wide), jax.tree.leaves(kept.with_weight_format("float32")), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

"""The latent RMSNorms (`q_a_layernorm`, `kv_a_layernorm`) use `DSAConfig.latent_norm_eps`, not
`rms_norm_eps`: transformers builds them with its default 1e-6 (GLM-5's `rms_norm_eps` is 1e-5)."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from dsa_hybrid import DSAConfig
from dsa_hybrid import reference as ref
from dsa_hybrid.layers.dsa_attention import DSACaches, DSAParams, dsa_attention, project

GOLDEN = Path(__file__).parents[1] / "golden"


def test_latent_norms_follow_the_field() -> None:
    base = DSAConfig.tiny("glm_moe_dsa")
    assert base.rms_norm_eps == 1e-5 and base.latent_norm_eps == 1e-6
    p = DSAParams.random(base, seed=1)
    # Small inputs: mean(x²) of the latents near 1e-5, so the epsilon visibly matters.
    x = 1e-2 * np.random.default_rng(0).standard_normal((6, base.hidden_size)).astype(np.float32)
    pos = jnp.arange(6, dtype=jnp.int32)
    outs = {}
    for eps in (1e-6, 1e-3):
        cfg = base.replace(latent_norm_eps=eps)
        proj = project(p, cfg, jnp.asarray(x), pos)
        ckv = x.astype(np.float64) @ np.asarray(p.kv_a, np.float64).T
        want = ref.rms_norm(ckv[:, : cfg.kv_lora_rank], np.asarray(p.kv_a_norm), eps)
        np.testing.assert_allclose(np.asarray(proj.c_kv), want, rtol=1e-4, atol=1e-6)
        caches = DSACaches.create(cfg, 1, 8, latent_kind="f32", indexer="exact")
        table = jnp.zeros((6, 1), jnp.int32)
        outs[eps] = np.asarray(dsa_attention(p, cfg, jnp.asarray(x), pos, pos, table, caches, backend="xla")[0])
    # rms_norm_eps (unchanged) does not decide the latent norms; the field does.
    assert np.abs(outs[1e-6] - outs[1e-3]).max() > 1e-3 * np.abs(outs[1e-6]).max()


def test_config_json_round_trip_of_latent_norm_eps() -> None:
    cfg = DSAConfig.glm5()
    assert "latent_norm_eps" not in cfg.to_hf_config()  # default: transformers' behaviour, nothing written
    vllm_like = cfg.replace(latent_norm_eps=cfg.rms_norm_eps)
    assert vllm_like.to_hf_config()["latent_norm_eps"] == 1e-5
    assert DSAConfig.from_hf_config(vllm_like.to_hf_config()) == vllm_like
    glm_golden = DSAConfig.from_hf_config(GOLDEN / "glm_moe_dsa" / "config.json")
    assert glm_golden.rms_norm_eps == 1e-5 and glm_golden.latent_norm_eps == 1e-6


def test_glm_golden_layer_matches_transformers_tightly_with_its_latent_eps() -> None:
    """transformers' GLM-5 layer (latent norms at 1e-6, `rms_norm_eps` 1e-5): matched to float32 noise
    with the default field, about 30× worse with the latent norms at `rms_norm_eps` (vLLM's choice)."""
    from test_hf_parity_layer import run

    from dsa_hybrid.models.checkpoint import load_layer_params

    d = GOLDEN / "glm_moe_dsa"
    cfg = DSAConfig.from_hf_config(d / "config.json")
    params, io = load_layer_params(d, cfg, 0), np.load(d / "io.npz")
    scale = np.abs(io["out"]).max()
    err = {eps: np.abs(run(params, cfg.replace(latent_norm_eps=eps), io["x"], (40,))[0] - io["out"]).max() / scale
           for eps in (1e-6, 1e-5)}  # fmt: skip
    assert err[1e-6] < 2e-6 < err[1e-5]

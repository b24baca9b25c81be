"""The MoE block (`models.moe`) against the float64 oracle written from transformers' code
(`reference.moe_route`, `reference.moe_block`): group-limited routing that really drops groups, ties in
the router scores, normalisation and scaling, shared experts, both expert implementations, under jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsa_hybrid import DSAConfig, reference
from dsa_hybrid.models.moe import MoEParams, moe_block, route


def moe_cfg(E: int, G: int, TG: int, k: int, norm: bool = True, scale: float = 2.5, shared: int = 1) -> DSAConfig:
    return DSAConfig.tiny("deepseek_v32").replace(
        hidden_size=16,
        n_routed_experts=E,
        n_group=G,
        topk_group=TG,
        num_experts_per_tok=k,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
        moe_intermediate_size=8,
        n_shared_experts=shared,
        first_k_dense_replace=1,
    )


@st.composite
def routing_problems(draw):
    G = draw(st.sampled_from([1, 2, 4]))
    per = draw(st.sampled_from([2, 3, 4]))
    TG = draw(st.integers(1, G))
    k = draw(st.integers(1, TG * per))
    T = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    E = G * per
    # Logits and biases on a coarse grid: many exact ties (in float32 and float64 alike), and
    # otherwise scores far apart compared to float32 rounding.
    logits = rng.integers(-4, 5, size=(T, E)) / 4.0
    bias = rng.integers(0, 3, size=E) / 8.0 if draw(st.booleans()) else np.zeros(E)
    norm = draw(st.booleans())
    return moe_cfg(E, G, TG, k, norm=norm), logits.astype(np.float32), bias.astype(np.float32)


def ref_route(cfg: DSAConfig, logits: np.ndarray, bias: np.ndarray):
    return reference.moe_route(
        logits, bias, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob,
        cfg.routed_scaling_factor,
    )  # fmt: skip


@given(routing_problems())
def test_route_matches_reference(problem) -> None:
    cfg, logits, bias = problem
    idx, w = route(jnp.asarray(logits), jnp.asarray(bias), cfg)
    ref_idx, ref_w = ref_route(cfg, logits, bias)
    # Same experts in the same order (ties to the lower index on both sides), same weights.
    np.testing.assert_array_equal(np.asarray(idx), ref_idx)
    np.testing.assert_allclose(np.asarray(w), ref_w, rtol=1e-6, atol=1e-7)


def test_group_limited_routing_drops_groups() -> None:
    """The best single expert's group loses on its top-2 sum: it is not eligible, although plain top-k
    would pick it."""
    cfg = moe_cfg(E=8, G=4, TG=2, k=2)
    #               group 0     group 1      group 2     group 3
    logits = np.array([[3.0, -3.0, 1.0, 1.0, 0.9, 0.9, -2.0, -2.0]], np.float32)
    idx, _ = route(jnp.asarray(logits), jnp.zeros(8), cfg)
    ref_idx, _ = ref_route(cfg, logits, np.zeros(8, np.float32))
    assert sorted(np.asarray(idx)[0].tolist()) == [2, 3] and ref_idx[0].tolist() == np.asarray(idx)[0].tolist()
    assert 0 not in np.asarray(idx)[0]  # expert 0 has the highest score, but group 0 is dropped
    # With a single group the same scores pick expert 0.
    idx1, _ = route(jnp.asarray(logits), jnp.zeros(8), moe_cfg(E=8, G=1, TG=1, k=2))
    assert np.asarray(idx1)[0].tolist()[0] == 0


def test_correction_bias_steers_the_choice_not_the_weights() -> None:
    cfg = moe_cfg(E=4, G=1, TG=1, k=1, norm=False, scale=1.0)
    logits = np.array([[2.0, 0.0, 0.0, 0.0]], np.float32)
    bias = np.array([0.0, 0.0, 1.0, 0.0], np.float32)  # sigmoid(0) + 1 > sigmoid(2)
    idx, w = route(jnp.asarray(logits), jnp.asarray(bias), cfg)
    assert np.asarray(idx).tolist() == [[2]]
    np.testing.assert_allclose(np.asarray(w), [[0.5]], rtol=1e-6)  # the unbiased sigmoid score


def test_ties_go_to_the_lower_index() -> None:
    cfg = moe_cfg(E=8, G=4, TG=2, k=3)
    logits = np.zeros((2, 8), np.float32)  # every expert and every group tied
    idx, _ = route(jnp.asarray(logits), jnp.zeros(8), cfg)
    ref_idx, _ = ref_route(cfg, logits, np.zeros(8, np.float32))
    assert np.asarray(idx).tolist() == [[0, 1, 2]] * 2 == ref_idx.tolist()


def ref_block(p: MoEParams, cfg: DSAConfig, x: np.ndarray) -> np.ndarray:
    a = {k: None if v is None else np.asarray(v) for k, v in vars(p).items()}
    return reference.moe_block(
        x, a["router"], a["bias"], a["gate"], a["up"], a["down"], a["shared_gate"], a["shared_up"], a["shared_down"],
        top_k=cfg.num_experts_per_tok, n_group=cfg.n_group, topk_group=cfg.topk_group,
        norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
    )  # fmt: skip


@st.composite
def block_problems(draw):
    G = draw(st.sampled_from([1, 2, 4]))
    per = draw(st.sampled_from([2, 4]))
    TG = draw(st.integers(1, G))
    k = draw(st.integers(1, min(4, TG * per)))
    cfg = moe_cfg(G * per, G, TG, k, norm=draw(st.booleans()), shared=draw(st.sampled_from([0, 1, 2])))
    T = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    x = np.random.default_rng(seed).standard_normal((T, cfg.hidden_size)).astype(np.float32)
    return cfg, MoEParams.random(cfg, seed, std=0.3), x


_moe_jit = jax.jit(moe_block, static_argnums=(1, 3))


@given(block_problems(), st.sampled_from(["ragged", "dense"]))
def test_block_matches_reference(problem, impl: str) -> None:
    cfg, p, x = problem
    got = np.asarray(_moe_jit(p, cfg, jnp.asarray(x), impl))
    np.testing.assert_allclose(got, ref_block(p, cfg, x), rtol=2e-4, atol=2e-5)


def test_block_with_tied_router_rows_matches_reference() -> None:
    """Duplicate router rows make experts tie exactly; the lower index wins on both sides, so the
    outputs (which differ per expert) still agree."""
    cfg = moe_cfg(E=8, G=2, TG=1, k=2)
    p = MoEParams.random(cfg, 4, std=0.3)
    router = np.asarray(p.router).copy()
    router[1] = router[0]
    router[5] = router[4]
    p = MoEParams(jnp.asarray(router), jnp.zeros(8), p.gate, p.up, p.down, p.shared_gate, p.shared_up, p.shared_down)
    x = np.random.default_rng(0).standard_normal((16, cfg.hidden_size)).astype(np.float32)
    for impl in ("ragged", "dense"):
        np.testing.assert_allclose(
            np.asarray(_moe_jit(p, cfg, jnp.asarray(x), impl)), ref_block(p, cfg, x), rtol=2e-4, atol=2e-5
        )


def test_unknown_impl_is_refused() -> None:
    cfg = moe_cfg(E=4, G=1, TG=1, k=1)
    with pytest.raises(ValueError, match="impl"):
        moe_block(MoEParams.random(cfg), cfg, jnp.zeros((1, cfg.hidden_size)), "loop")  # type: ignore[arg-type]

"""Sharding rules (`parallel.rules`): every parameter and cache leaf gets a rule, by field path, for
float32, bf16 and FP8 (`Fp8Weight` codes + scales) weights; shapes that do not divide are named."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from dsa_hybrid.models.causal_lm import ModelParams, create_caches
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.parallel import plan as plan_mod
from dsa_hybrid.parallel.mesh import make_mesh, mesh_shape
from dsa_hybrid.parallel.rules import (
    EXPERTS,
    REPLICATED,
    cache_specs,
    check_model_divides,
    describe_params,
    param_rule,
    param_specs,
)


def mesh(dp: int, tp: int) -> AbstractMesh:
    return AbstractMesh((dp, tp), ("dp", "tp"))


def moe_cfg() -> DSAConfig:
    return DSAConfig.tiny("glm_moe_dsa").replace(
        num_hidden_layers=3, first_k_dense_replace=1, indexer_types=("full", "shared", "full")
    )


@pytest.mark.parametrize("weights", ["float32", "bf16", "fp8"])
def test_every_leaf_gets_a_rule_and_the_expected_spec(weights: str) -> None:
    cfg = DSAConfig.deepseek_v32().replace(num_hidden_layers=4, first_k_dense_replace=1)
    params = plan_mod.abstract_params(cfg, weights)  # full widths, nothing allocated
    table = describe_params(params, mesh(8, 8))
    leaves = jax.tree_util.tree_leaves(params)
    assert len(table) == len(leaves)  # one rule per leaf, none missed
    by_suffix = {k.removesuffix(".codes").removesuffix(".scale_inv"): v for k, v in table.items()}
    assert by_suffix["blocks.0.attn.q_b"] == ("tp-rows", P("tp", None))
    assert by_suffix["blocks.0.attn.kv_b"] == ("tp-rows", P("tp", None))
    assert by_suffix["blocks.0.attn.o"] == ("tp-cols", P(None, "tp"))
    assert by_suffix["blocks.0.attn.idx_wk"][0] == REPLICATED  # the indexer: the same on every rank
    assert by_suffix["blocks.0.gate"] == ("tp-rows", P("tp", None))
    assert by_suffix["blocks.0.down"] == ("tp-cols", P(None, "tp"))
    assert by_suffix["blocks.1.moe.gate"] == (EXPERTS, P(("dp", "tp"), None, None))
    assert by_suffix["blocks.1.moe.router"][0] == REPLICATED
    assert by_suffix["lm_head"] == ("vocab", P("tp", None))
    if weights == "fp8":  # codes and block scales of one weight share its rule
        assert table["blocks.0.attn.q_b.codes"][1] == table["blocks.0.attn.q_b.scale_inv"][1]
        assert table["blocks.1.moe.down.scale_inv"][1] == P(("dp", "tp"), None, None)


def test_rules_match_concrete_params_and_a_single_block() -> None:
    cfg = moe_cfg()
    params = ModelParams.random(cfg, seed=0)
    specs = jax.tree_util.tree_leaves(param_specs(params, mesh(2, 4)), is_leaf=lambda s: isinstance(s, P))
    assert len(specs) == len(jax.tree_util.tree_leaves(params))
    # A block on its own (paths without "blocks.<i>.") gets the same specs as inside the model.
    whole = param_specs(params, mesh(2, 4)).blocks[1]
    alone = param_specs(params.blocks[1], mesh(2, 4))
    assert jax.tree_util.tree_leaves(whole, is_leaf=lambda s: isinstance(s, P)) == jax.tree_util.tree_leaves(
        alone, is_leaf=lambda s: isinstance(s, P)
    )
    assert param_rule(()) == REPLICATED


def test_caches_split_by_pages_over_dp() -> None:
    cfg = moe_cfg()
    caches = jax.eval_shape(lambda: create_caches(cfg, 8, 16, latent_kind="bf16"))
    specs = jax.tree_util.tree_leaves(cache_specs(caches, mesh(4, 2)), is_leaf=lambda s: isinstance(s, P))
    assert specs and all(s == P("dp") for s in specs)
    with pytest.raises(ValueError, match="caches.*do not divide over 3"):
        cache_specs(caches, mesh(3, 1))


def test_what_does_not_divide_is_named() -> None:
    cfg = moe_cfg()
    with pytest.raises(ValueError, match="attention heads"):
        check_model_divides(cfg, mesh(1, 8))  # 4 heads
    with pytest.raises(ValueError, match="experts"):
        check_model_divides(cfg, mesh(4, 4))  # 8 experts, 16 devices
    params = ModelParams.random(cfg, seed=0)
    with pytest.raises(ValueError, match=r"params\.blocks\.1\.moe\.gate"):
        param_specs(params, mesh(3, 1))  # 8 experts over 3
    # FP8 codes split only at whole 128-blocks: q_b's 128 rows over 4 shards is 32 rows each.
    fp8 = plan_mod.abstract_params(DSAConfig.tiny().replace(num_hidden_layers=1), "fp8")
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_b\.codes.*128-blocks"):
        param_specs(fp8, mesh(1, 4))
    # The vocabulary falls back to replicated when it does not divide.
    odd = plan_mod.abstract_params(DSAConfig.tiny().replace(num_hidden_layers=1, vocab_size=250), "bf16")
    assert param_specs(odd, mesh(1, 4)).embed == P()


def test_mesh_construction() -> None:
    m = make_mesh(1, 1)
    assert mesh_shape(m) == (1, 1)
    with pytest.raises(ValueError, match="devices"):
        make_mesh(2, 4, jax.devices()[:1])
    with pytest.raises(ValueError, match="dp, tp"):
        make_mesh(0, 1)


def test_shard_bytes_and_the_smallest_slice_arithmetic() -> None:
    cfg = DSAConfig.deepseek_v32()
    params = plan_mod.abstract_params(cfg, "fp8")
    total = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(params))
    assert 650e9 < total < 700e9  # 671B parameters (less the MTP layer) at 1 byte + scales + bf16 embeddings
    m = mesh(8, 8)
    w, lat, idx = plan_mod.full_model_bytes(cfg, m, "fp8", pages_per_rank=4 * 2048, page_size=64, latent_kind="bf16")  # type: ignore[arg-type]
    assert total / 64 < w < total / 64 * 1.5  # experts split over all 64, attention over tp only
    tokens = 4 * 2048 * 64  # per DP rank
    assert idx == 61 * tokens * 132  # 128 FP8 bytes + a float32 scale per key (dsa.md §6)
    assert lat >= 61 * tokens * 1152  # at least the bf16 format's bytes
    n = plan_mod.smallest_slice(cfg, "v5p", context=131072, batch=32, weights="fp8", temp_bytes=0)
    assert n is not None and 16 <= n[0] <= 64 and n[1] in (1, 2, 4, 8)

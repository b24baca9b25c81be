"""Bad-input cases for public entry points that no area catalogue covered (issue 16; found by
`tests/test_entry_point_catalogue.py`): model parameters from state dicts and checkpoints, the
checkpoint reader's name look-ups, FP8 block (de)quantization, the config's per-layer queries, the
backend choice, the TPU top-k select, the placement cost model's JSON, sampling one row.

Each case states its exception and a fragment of the message naming the argument, tensor or field;
the shared objects are checked unchanged afterwards."""

# ruff: noqa: E501 - one catalogue case per line

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_hybrid import DSAConfig, PlacementCosts, load_layer_params
from dsa_hybrid.host import fma_peak_gflops
from dsa_hybrid.layers.dsa_attention import DSAParams
from dsa_hybrid.models.causal_lm import ModelParams
from dsa_hybrid.models.checkpoint import (
    Checkpoint,
    SafetensorsFile,
    dequantize_fp8_blocks,
    load_tensors,
    quantize_fp8_blocks,
)
from dsa_hybrid.ops import resolve_backend
from dsa_hybrid.ops.indexer import ExactIndexerKeys, IndexerPages
from dsa_hybrid.ops.tpu.topk import order_keys, topk_select, topk_select_xla, vmem_bytes
from dsa_hybrid.serving.engine import Engine, default_placement
from dsa_hybrid.serving.sampling import SamplingError, SamplingParams, draw_tokens, sample

GOLDEN = Path(__file__).parent / "golden" / "deepseek_v32_lm"
CFG = DSAConfig.tiny().replace(num_hidden_layers=1, n_routed_experts=0)
LP = DSAParams.random(CFG, seed=0)
MP = ModelParams.random(CFG, seed=0)
CK = Checkpoint(GOLDEN)
STF = SafetensorsFile(GOLDEN / "model.safetensors")
SCORES = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8)), jnp.float32)
LENS = jnp.asarray([8, 5], jnp.int32)
SP = SamplingParams(temperature=1.0)


@dataclasses.dataclass
class Drawer:
    request_id: int
    sampling: SamplingParams
    rng: np.random.Generator


DRAWERS = [Drawer(7, SP, np.random.default_rng(1)), Drawer(8, SP, np.random.default_rng(2))]
DRAWER_STATES = [d.rng.bit_generator.state for d in DRAWERS]
COSTS = PlacementCosts(host_fixed=1e-3, host_per_key=1e-8, device_fixed=2e-3, device_per_key=1e-9)
IPAGES = IndexerPages.create(4, 8, 16)
EXACT = ExactIndexerKeys(jnp.zeros((4, 8, 16), jnp.float32))


def leaves(x: Any) -> list[np.ndarray]:
    return [np.array(a) for a in jax.tree_util.tree_leaves(x)]


BEFORE = leaves((LP, MP))

# (id, call, exception, message fragment)
Case = tuple[str, Callable[[], Any], type[BaseException], str]
# fmt: off
CASES: list[Case] = [
    ("DSAParams.from_state_dict/empty", lambda: DSAParams.from_state_dict({}, CFG, 0), KeyError, "model.layers.0.self_attn.q_a_proj.weight: missing"),
    ("DSAParams.from_state_dict/layer", lambda: DSAParams.from_state_dict(LP.state_dict(0), CFG, 5), KeyError, "model.layers.5."),
    ("load_layer_params/missing", lambda: load_layer_params("/no/such/ckpt", CFG, 0), FileNotFoundError, "checkpoint directory does not exist"),
    ("ModelParams.from_checkpoint/missing", lambda: ModelParams.from_checkpoint("/no/such/ckpt", CFG), FileNotFoundError, "checkpoint directory does not exist"),
    ("ModelParams.with_weight_format/fmt", lambda: MP.with_weight_format("int4"), ValueError, "fmt: expected 'float32', 'bfloat16' or 'fp8'"),
    ("Checkpoint.file/missing", lambda: CK.file("nope"), KeyError, "nope: missing from the checkpoint"),
    ("Checkpoint.nbytes/missing", lambda: CK.nbytes("nope"), KeyError, "nope: missing"),
    ("Checkpoint.weight/missing", lambda: CK.weight("nope"), KeyError, "nope: missing"),
    ("Checkpoint.nbytes_of/missing", lambda: CK.nbytes_of(["nope"]), KeyError, "nope: missing"),
    ("load_tensors/missing", lambda: load_tensors(GOLDEN, ["nope"]), KeyError, "nope: missing"),
    ("SafetensorsFile/missing", lambda: SafetensorsFile("/no/such.safetensors"), FileNotFoundError, "/no/such.safetensors"),
    ("SafetensorsFile.dtype/missing", lambda: STF.dtype("nope"), KeyError, "nope: not in"),
    ("SafetensorsFile.shape/missing", lambda: STF.shape("nope"), KeyError, "nope: not in"),
    ("SafetensorsFile.nbytes/missing", lambda: STF.nbytes("nope"), KeyError, "nope: not in"),
    ("SafetensorsFile.array/missing", lambda: STF.array("nope"), KeyError, "nope: not in"),
    ("dequantize_fp8_blocks/scale-shape", lambda: dequantize_fp8_blocks(np.zeros((128, 128), np.uint8), np.ones((2, 2), np.float32)), ValueError, "weight_scale_inv: expected shape [1, 1]"),
    ("DSAConfig.layer_indexer_type/past", lambda: CFG.layer_indexer_type(5), IndexError, "layer 5 out of range for 1 layers"),
    ("DSAConfig.layer_mlp_type/negative", lambda: CFG.layer_mlp_type(-1), IndexError, "layer -1 out of range for 1 layers"),
    ("DSAConfig.layer_mlp_type/past", lambda: CFG.layer_mlp_type(1), IndexError, "layer 1 out of range for 1 layers"),
    ("DSAConfig.layer_mlp_type/float", lambda: CFG.layer_mlp_type(0.0), TypeError, "layer: expected an integer"),
    ("Checkpoint.scale_name/int", lambda: CK.scale_name(5), TypeError, "name: expected a tensor name (str), got int"),
    ("Checkpoint.layers_beyond/negative", lambda: CK.layers_beyond(-1), ValueError, "num_layers: expected an integer >= 0, got -1"),
    ("Checkpoint.layers_beyond/str", lambda: CK.layers_beyond("3"), TypeError, "num_layers: expected an integer >= 0"),
    ("quantize_fp8_blocks/1-D", lambda: quantize_fp8_blocks(np.ones(128, np.float32)), ValueError, "w: expected a weight of shape [..., out, in]"),
    ("quantize_fp8_blocks/empty", lambda: quantize_fp8_blocks(np.ones((0, 4), np.float32)), ValueError, "w: expected a non-empty weight"),
    ("quantize_fp8_blocks/nan", lambda: quantize_fp8_blocks(np.array([[1.0, np.nan]], np.float32)), ValueError, "w: the weight has NaN"),
    ("quantize_fp8_blocks/inf", lambda: quantize_fp8_blocks(np.array([[1.0], [np.inf]], np.float32)), ValueError, "w: the weight has NaN or infinite"),
    ("quantize_fp8_blocks/str", lambda: quantize_fp8_blocks(np.array([["a"]])), TypeError, "w: expected a real"),
    ("DSAConfig.small/model", lambda: DSAConfig.small("llama"), ValueError, "unknown model_type 'llama'"),
    ("resolve_backend/cuda", lambda: resolve_backend("cuda"), ValueError, "backend: expected 'auto', 'xla' or 'pallas_tpu'"),
    ("topk_select_xla/k-0", lambda: topk_select_xla(SCORES, LENS, 0), ValueError, "k: must be an int >= 1"),
    ("topk_select_xla/lengths", lambda: topk_select_xla(SCORES, LENS[:1], 2), ValueError, "lengths: expected shape [2]"),
    ("topk_select/k-0", lambda: topk_select(SCORES, LENS, 0, interpret=True), ValueError, "k: must be an int >= 1"),
    ("IndexerPages.gather/float", lambda: IPAGES.gather(jnp.zeros((1, 2), jnp.float32)), TypeError, "pages: expected integers"),
    ("IndexerPages.gather/list", lambda: IPAGES.gather([[0, 1]]), TypeError, "pages: expected an array"),
    ("IndexerPages.gather/rank", lambda: IPAGES.gather(jnp.zeros((2,), jnp.int32)), ValueError, "pages: expected 2 dimensions"),
    ("IndexerPages.gather/range", lambda: IPAGES.gather(jnp.asarray([[0, 4]], jnp.int32)), IndexError, "pages: page ids must be in [0, 4)"),
    ("ExactIndexerKeys.gather/negative", lambda: EXACT.gather(np.asarray([[-1]], np.int32)), IndexError, "pages: page ids must be in [0, 4)"),
    ("DSAParams.state_dict/negative", lambda: LP.state_dict(-1), ValueError, "layer: must be >= 0"),
    ("DSAParams.state_dict/float", lambda: LP.state_dict(1.0), TypeError, "layer: expected an integer"),
    ("default_placement/indexer", lambda: default_placement(indexer="fp16"), ValueError, "indexer: expected one of"),
    ("default_placement/mesh", lambda: default_placement(mesh="dp2"), TypeError, "mesh: expected a jax.sharding.Mesh"),
    ("Engine.rank_of/unknown", lambda: Engine(MP, CFG, num_pages=4, page_size=16).rank_of(99), KeyError, "request 99 is not waiting or running"),
    ("PlacementCosts.predict/negative", lambda: COSTS.predict(-1, 1, 64), ValueError, "visible_keys: must be >= 0"),
    ("PlacementCosts.predict/float", lambda: COSTS.predict(8, 1.5, 64), TypeError, "device_rows: expected an integer"),
    ("PlacementCosts.choose/negative", lambda: COSTS.choose(8, 1, -64), ValueError, "table_keys: must be >= 0"),
    ("PlacementCosts.choose/default", lambda: COSTS.choose(8, 1, 64, default="tpu"), ValueError, "default: expected one of"),
    ("PlacementCosts/spread-nan", lambda: PlacementCosts(1.0, 0.0, 1.0, 0.0, spread=float("nan")), ValueError, "spread: expected a finite number >= 0"),
    ("PlacementCosts/negative", lambda: PlacementCosts(1.0, -1e-9, 1.0, 0.0), ValueError, "host_per_key: expected a finite number >= 0"),
    ("PlacementCosts.from_json/inf", lambda: PlacementCosts.from_json({**COSTS.to_json(), "device_fixed": "inf"}), ValueError, "device_fixed: expected a finite"),
    ("PlacementCosts.measure/page_size", lambda: PlacementCosts.measure(CFG, LP, 0), ValueError, "page_size: must be >= 1"),
    ("PlacementCosts.measure_points/repeats", lambda: PlacementCosts.measure_points(CFG, LP, 64, repeats=0), ValueError, "repeats: must be >= 1"),
    ("PlacementCosts.measure_points/lengths", lambda: PlacementCosts.measure_points(CFG, LP, 64, lengths=()), TypeError, "lengths: expected a non-empty tuple"),
    ("PlacementCosts.measure_points/latent", lambda: PlacementCosts.measure_points(CFG, LP, 64, latent_kind="int8"), ValueError, "latent_kind: expected one of"),
    ("PlacementCosts.cached/page_size", lambda: PlacementCosts.cached(CFG, LP, 0), ValueError, "page_size: must be >= 1"),
    ("PlacementCosts.cached/indexer", lambda: PlacementCosts.cached(CFG, LP, 64, indexer="int4"), ValueError, "indexer: expected one of"),
    ("fma_peak_gflops/seconds", lambda: fma_peak_gflops(-1.0), ValueError, "seconds: must be in (0, 60]"),
    ("fma_peak_gflops/nan", lambda: fma_peak_gflops(float("nan")), ValueError, "seconds: must be in (0, 60]"),
    ("fma_peak_gflops/repeats", lambda: fma_peak_gflops(0.01, 0), ValueError, "repeats: must be in [1, 100]"),
    ("order_keys/int", lambda: order_keys(jnp.zeros(4, jnp.int32)), TypeError, "x: expected a float array"),
    ("order_keys/list", lambda: order_keys([1.0, 2.0]), TypeError, "x: expected an array"),
    ("vmem_bytes/L", lambda: vmem_bytes(-1, 8), ValueError, "L: must be >= 1"),
    ("vmem_bytes/k", lambda: vmem_bytes(1024, 0), ValueError, "k: must be >= 1"),
    ("PlacementCosts.from_json/missing", lambda: PlacementCosts.from_json({}), KeyError, "host_fixed"),
    ("draw_tokens/nan", lambda: draw_tokens([DRAWERS[0], DRAWERS[1]], np.array([[0.0, 1.0], [np.nan, 0.0]], np.float32), {}), SamplingError, "request 8: logits hold NaN"),
    ("sample/nan", lambda: sample(np.full(4, np.nan, np.float32), SP, np.random.default_rng(0)), ValueError, "logits hold NaN"),
    ("sample/2d", lambda: sample(np.zeros((2, 4), np.float32), SP, np.random.default_rng(0)), ValueError, "logits must be one non-empty row [vocab]"),
]
# fmt: on


@pytest.mark.parametrize(("call", "exc", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_by_name_and_changes_nothing(
    call: Callable[[], Any], exc: type[BaseException], match: str
) -> None:
    with pytest.raises(exc) as info:
        call()
    assert match in str(info.value), str(info.value)
    for before, after in zip(BEFORE, leaves((LP, MP)), strict=True):
        np.testing.assert_array_equal(before, after)
    # a failed draw leaves every generator as it was (request 7 drew before request 8 failed)
    assert [d.rng.bit_generator.state for d in DRAWERS] == DRAWER_STATES


def test_good_inputs_round_trip() -> None:
    again = DSAParams.from_state_dict(LP.state_dict(0), CFG, 0)
    for a, b in zip(leaves(LP), leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    pc = PlacementCosts(1.0, 1e-6, 2.0, 1e-7, spread=0.25)
    assert PlacementCosts.from_json(pc.to_json()) == pc
    old = {k: v for k, v in pc.to_json().items() if k != "spread"}  # stored before the spread existed
    assert PlacementCosts.from_json(old) == dataclasses.replace(pc, spread=0.0)
    assert resolve_backend("xla") == "xla" and CFG.layer_indexer_type(0) in ("full", "shared")
    idx = np.asarray(topk_select_xla(SCORES, LENS, 3))
    want = np.argsort(-np.asarray(SCORES)[0], kind="stable")[:3]
    assert sorted(idx[0].tolist()) == sorted(want.tolist()) and (idx[1] < 5).all()
    name = next(n for n in STF.names if STF.shape(n))
    assert STF.array(name).shape == STF.shape(name) and CK.nbytes(name) == STF.nbytes(name)
    assert sample(np.array([0.0, 50.0, 0.0], np.float32), SP, np.random.default_rng(0)) == 1
    tokens: dict[int, int] = {}
    draws = [Drawer(7, SP, np.random.default_rng(1)), Drawer(8, SP, np.random.default_rng(2))]
    draw_tokens(draws, np.array([[0.0, 50.0], [50.0, 0.0]], np.float32), tokens)
    assert tokens == {7: 1, 8: 0}
    assert COSTS.choose(10**6, 1, 64) == "device" and COSTS.predict(0, 0, 0) == {"host": 1e-3, "device": 2e-3}
    assert fma_peak_gflops(0.01, 1) > 0 and vmem_bytes(1024, 8) > 0
    x = jnp.asarray([-2.0, -0.0, 0.0, 1.5, np.inf], jnp.float32)
    keys = np.asarray(order_keys(x))
    assert (np.diff(keys) >= 0).all() and keys[1] == keys[2]  # float order kept, −0 = +0
    k, sk = IPAGES.gather(jnp.asarray([[0, 3]], jnp.int32))
    assert k.shape == (1, 16, 16) and sk.shape == (1, 16)
    assert CFG.layer_mlp_type(0) == "dense" and CK.scale_name("a.weight") == "a.weight_scale_inv"
    assert CK.layers_beyond(0) == sorted({int(n.split(".")[2]) for n in CK.index if n.startswith("model.layers.")})
    codes, scale = quantize_fp8_blocks(np.full((2, 3), 4.0, np.float32))
    assert codes.shape == (2, 3) and scale.shape == (1, 1) and scale[0, 0] == np.float32(4.0 / 448.0)

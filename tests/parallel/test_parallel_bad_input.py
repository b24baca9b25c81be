"""`dsa_hybrid.parallel`'s bad-input catalogue (issue 16): `make_mesh`, `mesh_shape`, the sharding rules
(`param_rule`, `path_string`, `path_check`, `param_specs`, `describe_params`, `cache_specs`, `named`,
`check_model_divides`), `shard_params`, `create_sharded_caches`, `place_rows`, `forward_sharded`,
`generate_greedy_sharded`, `distributed.initialize`, the ahead-of-time plan (`plan`, `chip_of`,
`default_tp`, `choose_tp`, `smallest_slice`, `abstract_params`) and the `dsa-hybrid plan` flags.

This process has one CPU device: meshes wider than that are `AbstractMesh`es (the rules and the plan
take them), so the divisibility cases need no device. Each case states its exception and a fragment of
the message; afterwards the model's arrays are as before and `jax.distributed` was never started (the
CPU collectives setting is untouched). No case reaches libtpu or compiles anything."""

# ruff: noqa: E501 - one catalogue case per line

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P

from dsa_hybrid import DSAConfig, cli
from dsa_hybrid.models.causal_lm import ModelParams, create_caches
from dsa_hybrid.parallel import distributed
from dsa_hybrid.parallel.forward import (
    create_sharded_caches,
    forward_sharded,
    generate_greedy_sharded,
    place_rows,
    shard_params,
)
from dsa_hybrid.parallel.mesh import make_mesh, mesh_shape
from dsa_hybrid.parallel.plan import (
    abstract_params,
    chip_of,
    choose_tp,
    default_tp,
    format_plan,
    plan,
    smallest_slice,
    topology_devices,
)
from dsa_hybrid.parallel.rules import (
    cache_specs,
    check_model_divides,
    describe_params,
    named,
    param_rule,
    param_specs,
    path_check,
    path_string,
)

CFG = DSAConfig.tiny().replace(n_routed_experts=0, num_hidden_layers=1)  # 4 heads
PARAMS = ModelParams.random(CFG, seed=0)
ABSTRACT = jax.eval_shape(lambda: PARAMS)
CACHES = jax.eval_shape(lambda: create_caches(CFG, 4, 16))
MESH = make_mesh(1, 1)
MESH_3x1 = AbstractMesh((3, 1), ("dp", "tp"))
MESH_1x3 = AbstractMesh((1, 3), ("dp", "tp"))
BAD_AXES = Mesh(np.asarray(jax.devices()[:1], dtype=object).reshape(1, 1), ("data", "model"))
ONE = [{"tokens": np.array([1], np.int32), "positions": np.array([0], np.int32), "slots": np.array([0], np.int32),
        "block_tables": np.array([[0]], np.int32)}]  # fmt: skip
PATH = jax.tree_util.tree_flatten_with_path(PARAMS)[0][0][0]
SIZES = dict(context=1024, batch=8, weights="bf16", page_size=64, latent_kind="bf16")


def leaves(x: Any) -> list[np.ndarray]:
    return [np.array(a) for a in jax.tree_util.tree_leaves(x)]


PARAMS_BEFORE = leaves(PARAMS)
COLLECTIVES_BEFORE = jax.config.jax_cpu_collectives_implementation

# (id, call, exception, message fragment)
Case = tuple[str, Callable[[], Any], type[BaseException], str]
# fmt: off
CASES: list[Case] = [
    # make_mesh, mesh_shape
    ("mesh/dp-0", lambda: make_mesh(0, 1), ValueError, "dp, tp: expected >= 1"),
    ("mesh/tp-neg", lambda: make_mesh(1, -2), ValueError, "dp, tp:"),
    ("mesh/dp-float", lambda: make_mesh(1.0, 1), TypeError, "dp: expected an integer"),
    ("mesh/tp-bool", lambda: make_mesh(1, True), TypeError, "tp: expected an integer"),
    ("mesh/tp-str", lambda: make_mesh(1, "2"), TypeError, "tp:"),
    ("mesh/too-few", lambda: make_mesh(2, 1), ValueError, "devices: a 2x1 mesh needs 2 devices, got 1"),
    ("mesh/devices-str", lambda: make_mesh(1, 1, "cpu"), TypeError, "devices: expected a sequence of devices"),
    ("mesh/devices-int", lambda: make_mesh(1, 1, 4), TypeError, "devices:"),
    ("mesh_shape/none", lambda: mesh_shape(None), TypeError, "mesh: expected a jax.sharding.Mesh"),
    ("mesh_shape/axes", lambda: mesh_shape(BAD_AXES), ValueError, "mesh: expected axes ('dp', 'tp')"),
    # rules
    ("rule/path-str", lambda: param_rule("blocks.0.attn.q_b"), TypeError, "path: expected a key path"),
    ("path_string/int", lambda: path_string(3), TypeError, "path: expected a key path"),
    ("path_check/none", lambda: path_check(None), TypeError, "path:"),
    ("param_specs/heads", lambda: param_specs(ABSTRACT, MESH_1x3), ValueError, "params.blocks.0.attn.q_b: dim 0"),
    ("param_specs/mesh", lambda: param_specs(ABSTRACT, None), TypeError, "mesh: expected"),
    ("param_specs/axes", lambda: param_specs(ABSTRACT, BAD_AXES), ValueError, "mesh: expected axes"),
    ("describe/heads", lambda: describe_params(ABSTRACT, MESH_1x3), ValueError, "does not divide over tp"),
    ("cache_specs/pages", lambda: cache_specs(CACHES, MESH_3x1), ValueError, "do not divide over 3 DP ranks"),
    ("cache_specs/scalar", lambda: cache_specs((np.float32(1),), MESH), ValueError, "caches.0: pages [] do not divide"),
    ("named/mesh", lambda: named("mesh", P()), TypeError, "mesh: expected a jax.sharding.Mesh"),
    ("divides/cfg", lambda: check_model_divides({}, MESH), TypeError, "cfg: expected a DSAConfig"),
    ("divides/heads", lambda: check_model_divides(CFG, MESH_1x3), ValueError, "4 attention heads do not divide over tp=3"),
    ("divides/experts", lambda: check_model_divides(DSAConfig.tiny().replace(first_k_dense_replace=1), MESH_3x1), ValueError, "experts do not divide"),
    # the sharded model (parallel.forward): what routes through the mesh and the rules
    ("shard_params/mesh", lambda: shard_params(PARAMS, None), TypeError, "mesh:"),
    ("caches/mesh", lambda: create_sharded_caches(CFG, BAD_AXES, 2), ValueError, "mesh: expected axes"),
    ("caches/pages-0", lambda: create_sharded_caches(CFG, MESH, 0), ValueError, "pages_per_rank: must be >= 1"),
    ("place_rows/ranks", lambda: place_rows(MESH, ONE * 2), ValueError, "per_rank: expected 1 ranks' rows, got 2"),
    ("place_rows/rows", lambda: place_rows(MESH, ONE, rows=0), ValueError, "rows: 0 rows per rank cannot hold"),
    ("forward/mesh", lambda: forward_sharded(PARAMS, CFG, None, *([np.zeros(1, np.int32)] * 3), np.zeros((1, 1), np.int32), ()), TypeError, "mesh:"),
    ("forward/heads", lambda: forward_sharded(PARAMS, CFG, MESH_1x3, *([np.zeros(1, np.int32)] * 3), np.zeros((1, 1), np.int32), ()), ValueError, "attention heads do not divide"),
    ("generate/prompts", lambda: generate_greedy_sharded(PARAMS, CFG, MESH, [], 2), ValueError, "prompts: expected at least one non-empty prompt"),
    ("generate/empty-prompt", lambda: generate_greedy_sharded(PARAMS, CFG, MESH, [[1], []], 2), ValueError, "prompts:"),
    ("generate/new-0", lambda: generate_greedy_sharded(PARAMS, CFG, MESH, [[1, 2]], 0), ValueError, "max_new_tokens: must be >= 1"),
    ("generate/new-float", lambda: generate_greedy_sharded(PARAMS, CFG, MESH, [[1, 2]], 2.0), TypeError, "max_new_tokens: expected an integer"),
    ("generate/vocab", lambda: generate_greedy_sharded(PARAMS, CFG, MESH, [[1, 10**6]], 2), ValueError, "prompts[0]: token ids must be in"),
    ("generate/float-ids", lambda: generate_greedy_sharded(PARAMS, CFG, MESH, [[1.5]], 2), TypeError, "prompts[0]: expected a sequence of integer token ids"),
    ("generate/mesh", lambda: generate_greedy_sharded(PARAMS, CFG, "mesh", [[1, 2]], 1), TypeError, "mesh:"),
    # distributed.initialize: refused before jax.distributed (or the collectives setting) is touched
    ("init/address-int", lambda: distributed.initialize(1234), TypeError, "coordinator_address: expected 'host:port'"),
    ("init/address-port", lambda: distributed.initialize("localhost"), ValueError, "coordinator_address: expected 'host:port', got 'localhost'"),
    ("init/address-port-big", lambda: distributed.initialize("h:70000", 2, 0), ValueError, "coordinator_address:"),
    ("init/processes-0", lambda: distributed.initialize("h:1", 0, 0), ValueError, "num_processes: expected >= 1, got 0"),
    ("init/processes-float", lambda: distributed.initialize("h:1", 2.0, 0), TypeError, "num_processes: expected an integer"),
    ("init/id-past", lambda: distributed.initialize("h:1", 2, 2), ValueError, "process_id: expected 0..1, got 2"),
    ("init/id-neg", lambda: distributed.initialize("h:1", None, -1), ValueError, "process_id: expected >= 0"),
    ("init/id-bool", lambda: distributed.initialize("h:1", 2, True), TypeError, "process_id: expected an integer"),
    ("init/timeout-0", lambda: distributed.initialize("h:1", 2, 0, initialization_timeout=0), ValueError, "initialization_timeout: must be >= 1"),
    # the plan: every argument before libtpu
    ("plan/model", lambda: plan("llama", "v5p:2x2x1"), ValueError, "model: expected one of"),
    ("plan/topology-int", lambda: plan("deepseek_v32", 8), TypeError, "topology: expected a string"),
    ("plan/topology-gen", lambda: plan("deepseek_v32", "h100:8"), ValueError, "topology: unknown TPU generation 'h100'"),
    ("plan/context-0", lambda: plan("deepseek_v32", "v5p:2x2x1", context=0), ValueError, "context, batch, prefill_chunk: expected >= 1"),
    ("plan/context-float", lambda: plan("deepseek_v32", "v5p:2x2x1", context=1e5), TypeError, "context: expected an integer"),
    ("plan/batch-bool", lambda: plan("deepseek_v32", "v5p:2x2x1", batch=True), TypeError, "batch:"),
    ("plan/chunk-neg", lambda: plan("deepseek_v32", "v5p:2x2x1", prefill_chunk=-1), ValueError, "prefill_chunk"),
    ("plan/page-0", lambda: plan("deepseek_v32", "v5p:2x2x1", page_size=0), ValueError, "page_size: must be >= 1"),
    ("plan/weights", lambda: plan("deepseek_v32", "v5p:2x2x1", weights="int4"), ValueError, "weights: expected one of"),
    ("plan/latent", lambda: plan("deepseek_v32", "v5p:2x2x1", latent_kind="int8"), ValueError, "latent_kind: expected one of"),
    ("plan/tp-0", lambda: plan("deepseek_v32", "v5p:2x2x1", tp=0), ValueError, "tp: must be >= 1"),
    ("plan/steps-str", lambda: plan("deepseek_v32", "v5p:2x2x1", steps="decode"), ValueError, "steps: expected 'decode' and / or 'prefill'"),
    ("plan/steps-bad", lambda: plan("deepseek_v32", "v5p:2x2x1", steps=("train",)), ValueError, "steps:"),
    ("plan/steps-empty", lambda: plan("deepseek_v32", "v5p:2x2x1", steps=()), ValueError, "steps:"),
    ("plan/log", lambda: plan("deepseek_v32", "v5p:2x2x1", log="stderr"), TypeError, "log: expected a callable"),
    ("plan/cfg", lambda: plan("x", "v5p:2x2x1", cfg={"hidden_size": 8}), TypeError, "cfg: expected a DSAConfig"),
    ("plan/tp-devices", lambda: plan("tiny", "v5p:2x2x1", cfg=CFG, devices=jax.devices(), tp=2, context=64, batch=1), ValueError, "tp: 2 does not divide the 1 devices"),
    ("format_plan/dict", lambda: format_plan({"model": "x"}), TypeError, "p: expected a Plan"),
    ("topology_devices/gen", lambda: topology_devices("h100:8"), ValueError, "topology: unknown TPU generation"),
    ("topology_devices/int", lambda: topology_devices(8), TypeError, "topology: expected a string"),
    ("chip_of/int", lambda: chip_of(5), TypeError, "topology: expected a string"),
    ("chip_of/gen", lambda: chip_of("v9:2x2"), ValueError, "unknown TPU generation 'v9'"),
    ("default_tp/0", lambda: default_tp(CFG, 0), ValueError, "devices: must be >= 1"),
    ("choose_tp/chip", lambda: choose_tp(CFG, "h100", 8, **SIZES), ValueError, "chip: expected one of"),
    ("choose_tp/devices", lambda: choose_tp(CFG, "v5p", 0, **SIZES), ValueError, "devices: must be >= 1"),
    ("smallest/chip", lambda: smallest_slice(CFG, "a100", context=64, batch=1, weights="bf16", temp_bytes=0), ValueError, "chip: expected one of"),
    ("smallest/weights", lambda: smallest_slice(CFG, "v5p", context=64, batch=1, weights="int4", temp_bytes=0), ValueError, "weights: expected one of"),
    ("smallest/temp", lambda: smallest_slice(CFG, "v5p", context=64, batch=1, weights="bf16", temp_bytes=-1), ValueError, "temp_bytes: must be >= 0"),
    ("smallest/batch", lambda: smallest_slice(CFG, "v5p", context=64, batch=0, weights="bf16", temp_bytes=0), ValueError, "batch: must be >= 1"),
    ("abstract_params/weights", lambda: abstract_params(CFG, "int4"), ValueError, "weights: expected 'fp8', 'bf16' or 'float32'"),
]
# fmt: on


@pytest.mark.parametrize(("call", "exc", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_by_name_and_changes_nothing(
    call: Callable[[], Any], exc: type[BaseException], match: str
) -> None:
    with pytest.raises(exc) as info:
        call()
    assert match in str(info.value), str(info.value)
    for before, after in zip(PARAMS_BEFORE, leaves(PARAMS), strict=True):
        np.testing.assert_array_equal(before, after)
    assert jax.config.jax_cpu_collectives_implementation == COLLECTIVES_BEFORE
    assert not jax.distributed.is_initialized()


# `dsa-hybrid plan` flags: usage errors (one line, exit 2) before libtpu is loaded.
USAGE: list[tuple[list[str], str]] = [
    (["--context", "0"], "--context: must lie in [1, 16777216], got 0"),
    (["--context", "1e6"], "--context: expected an integer, got '1e6'"),
    (["--batch", "-4"], "--batch: must lie in"),
    (["--batch", "99999999"], "--batch: must lie in"),
    (["--tp", "0"], "--tp: must lie in [1, 1024]"),
    (["--prefill-chunk", "0"], "--prefill-chunk: must lie in"),
    (["--steps", "train"], "--steps: expected decode, prefill or decode,prefill, got 'train'"),
    (["--steps", ","], "--steps:"),
    (["--topology", "h100:8"], "--topology: expected <generation>:<shape>"),
    (["--topology", "v5p"], "--topology:"),
    (["--weights", "int4"], "--weights: invalid choice"),
    (["--model", "llama"], "--model: invalid choice"),
]


@pytest.mark.parametrize(("argv", "match"), USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_plan_flags_are_usage_errors(argv: list[str], match: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["plan", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsa-hybrid plan: error:") and match in err[0], err


# ----- good cases --------------------------------------------------------------------------------------
def test_good_inputs_do_what_they_say() -> None:
    m = make_mesh(np.int64(1), 1, jax.devices())  # numpy integers are integers
    assert mesh_shape(m) == (1, 1) and mesh_shape(MESH_3x1) == (3, 1)
    specs = param_specs(ABSTRACT, MESH)
    assert specs.blocks[0].attn.q_b == P("tp", None) and specs.blocks[0].attn.o == P(None, "tp")
    table = describe_params(ABSTRACT, MESH)
    assert table["blocks.0.attn.q_b"] == ("tp-rows", P("tp", None)) and len(table) == len(PARAMS_BEFORE)
    assert param_rule(PATH) == table[path_string(PATH)][0] and path_check(list(PATH)) == tuple(PATH)
    assert all(
        s == P("dp") for s in jax.tree_util.tree_leaves(cache_specs(CACHES, MESH), is_leaf=lambda s: isinstance(s, P))
    )
    check_model_divides(CFG, AbstractMesh((1, 2), ("dp", "tp")))  # 4 heads over 2: fine
    sharded = shard_params(PARAMS, MESH)
    for before, after in zip(PARAMS_BEFORE, leaves(sharded), strict=True):
        np.testing.assert_array_equal(before, after)
    rows = place_rows(MESH, ONE, rows=2, width=3)
    assert rows["tokens"].shape == (2,) and rows["block_tables"].shape == (2, 3)
    assert np.asarray(rows["slots"]).tolist() == [0, -1] and np.asarray(rows["block_tables"])[1].tolist() == [-1] * 3
    assert chip_of("tpu7x:2x2x4") == "tpu7x" and default_tp(CFG, 8) == 4 and default_tp(CFG, 3) == 1
    ap = abstract_params(CFG, "fp8")
    assert ap.blocks[0].attn.q_b.codes.dtype.itemsize == 1  # an Fp8Weight of abstract arrays
    assert smallest_slice(CFG, "v5p", context=64, batch=1, weights="bf16", temp_bytes=0) == (1, 1)

"""`dsa-hybrid plan`: per-chip HBM, collectives and cost of a full-size model on a TPU slice, from the
real TPU compiler (libtpu, ahead of time, on any host; `../shared/notes/tpu-aot.md`).

What is compiled: the sharded forward (`parallel.forward.forward_sharded`, XLA path) of one decode step
(`batch` rows, one per sequence, each sequence at `context` tokens) and of one prefill chunk
(`prefill_chunk` new tokens per DP rank, the last chunk of a `context`-token prompt), with abstract
inputs only (`jax.ShapeDtypeStruct` with `NamedSharding`s; no weight is ever materialised). Compiling
all 61 / 78 layers unrolled is slow, so each step is compiled three times, for models of the same widths
with 0 layers (embedding + LM head), 1 dense layer, and 1 dense + 1 MoE layer; a layer's collectives and
FLOPs are the differences, and the full model's are `top + n_dense · dense + n_moe · moe`. The
temporaries are those of the 1 + 1 program (the layers run one after another, so the peak is one
layer's). Weights and caches per chip are exact: the bytes of each abstract array's shard, for every
layer (the compiled programs' argument bytes are checked against the same arithmetic).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsa_hybrid.layers.dsa_attention import HF_NAMES, INDEXER_PARAMS, NORM_PARAMS, DSAParams, param_shapes
from dsa_hybrid.layers.weights import FP8_BLOCK, Fp8Weight
from dsa_hybrid.models.causal_lm import BlockParams, ModelParams, create_caches
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.models.moe import MoEParams
from dsa_hybrid.ops.checks import check_choice, check_int
from dsa_hybrid.ops.sparse_mla import Backend
from dsa_hybrid.parallel.mesh import DP, make_mesh, mesh_shape
from dsa_hybrid.parallel.rules import cache_specs, check_model_divides, param_specs

# The plan's entry points (the rest of the module, the abstract inputs and compile steps, serves them and
# `tpu/compile.py`).
__all__ = [
    "CHIPS", "MODELS", "Chip", "Plan", "StepPlan", "abstract_params", "chip_of", "choose_tp", "default_tp",
    "format_plan", "plan", "smallest_slice", "topology_devices",
]  # fmt: skip

GiB = 1 << 30
WEIGHT_FORMATS = ("fp8", "bf16", "float32")
LATENT_KINDS = ("bf16", "fp8", "f32")


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: HBM per chip, JAX devices per chip, HBM bandwidth, dense bf16 peak."""

    hbm_bytes: int
    devices_per_chip: int
    hbm_bw: float  # bytes/s
    bf16_flops: float  # FLOP/s
    max_chips: int  # the largest slice offered


# Public figures (Google Cloud TPU docs); bandwidth and peak as in docs/performance.md. TPU7x shows each
# chip as two JAX devices (its two TensorCore dies), each with half the chip's HBM.
CHIPS = {
    "v5e": Chip(16 * GiB, 1, 0.82e12, 197e12, 256),
    "v5p": Chip(95 * GiB, 1, 2.77e12, 459e12, 8960),
    "v6e": Chip(32 * GiB, 1, 1.64e12, 918e12, 256),
    "tpu7x": Chip(192 * GiB, 2, 7.38e12, 2307e12, 9216),
}
MODELS = {"deepseek_v32": DSAConfig.deepseek_v32, "glm_moe_dsa": DSAConfig.glm5}
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")


def chip_of(topology: str) -> str:
    """`"v5p"` of `"v5p:4x4x4"`; an unknown generation raises `ValueError` (a non-string `TypeError`)."""
    if not isinstance(topology, str):
        raise TypeError(f"topology: expected a string such as 'v5p:4x4x4', got {type(topology).__name__}")
    chip = topology.split(":", 1)[0]
    if chip not in CHIPS:
        raise ValueError(f"topology: unknown TPU generation {chip!r} in {topology!r}; expected one of {sorted(CHIPS)}")
    return chip


def topology_devices(topology: str) -> list[Any]:
    """The devices of a TPU topology (`"v6e:8x8"`), from libtpu without a chip."""
    chip_of(topology)  # a bad name is refused before libtpu is loaded
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:  # noqa: BLE001 - libtpu's own errors, re-raised with the argument named
        raise ValueError(f"topology: libtpu cannot build {topology!r} ({e})") from e


# ----- abstract inputs ------------------------------------------------------------------------------


def _sds(shape: tuple[int, ...], dtype: Any) -> Any:
    """An abstract array (typed `Any`: it stands in for the `jax.Array` fields of the param pytrees)."""
    return jax.ShapeDtypeStruct(shape, dtype)


def _weight(shape: tuple[int, ...], weights: str) -> Any:
    if weights == "fp8":
        scale = (*shape[:-2], -(-shape[-2] // FP8_BLOCK), -(-shape[-1] // FP8_BLOCK))
        return Fp8Weight(_sds(shape, ml_dtypes.float8_e4m3fn), _sds(scale, jnp.float32))
    return _sds(shape, jnp.bfloat16 if weights == "bf16" else jnp.float32)


def abstract_params(cfg: DSAConfig, weights: str = "fp8") -> ModelParams:
    """`ModelParams` of `jax.ShapeDtypeStruct`s at `cfg`'s sizes, nothing allocated. `weights` "fp8" (every
    linear weight FP8 with 128 × 128 block scales, as the released checkpoints; embedding and LM head
    bf16), "bf16" or "float32"; norms, biases and the router float32."""
    if weights not in ("fp8", "bf16", "float32"):
        raise ValueError(f"weights: expected 'fp8', 'bf16' or 'float32', got {weights!r}")
    f32 = jnp.float32
    d, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    big = "bf16" if weights == "fp8" else weights
    shapes = param_shapes(cfg)
    blocks = []
    for i in range(cfg.num_hidden_layers):
        attn = {n: (_sds(shapes[n], f32) if n in NORM_PARAMS else _weight(shapes[n], weights)) for n in HF_NAMES}
        if cfg.layer_indexer_type(i) == "shared":
            attn.update(dict.fromkeys(INDEXER_PARAMS))
        norm = _sds((d,), f32)
        if cfg.layer_mlp_type(i) == "sparse":
            E, mi = cfg.n_routed_experts, cfg.moe_intermediate_size
            sh = cfg.n_shared_experts * mi
            moe = MoEParams(
                router=_sds((E, d), f32), bias=_sds((E,), f32),
                gate=_weight((E, mi, d), weights), up=_weight((E, mi, d), weights), down=_weight((E, d, mi), weights),
                shared_gate=_weight((sh, d), weights) if sh else None,
                shared_up=_weight((sh, d), weights) if sh else None,
                shared_down=_weight((d, sh), weights) if sh else None,
            )  # fmt: skip
            blocks.append(BlockParams(norm, DSAParams(**attn), norm, None, None, None, moe))
        else:
            mlp = (_weight((inter, d), weights), _weight((inter, d), weights), _weight((d, inter), weights))
            blocks.append(BlockParams(norm, DSAParams(**attn), norm, *mlp))
    return ModelParams(
        _sds((vocab, d), jnp.bfloat16 if big == "bf16" else f32),
        tuple(blocks),
        _sds((d,), f32),
        _weight((vocab, d), big),
    )


def with_shardings(tree: Any, specs: Any, mesh: Mesh) -> Any:
    """`tree`'s `ShapeDtypeStruct`s with `NamedSharding(mesh, spec)` attached."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s)),
        tree,
        specs,
    )


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of sharded `ShapeDtypeStruct`s (the largest shard of each)."""
    total = 0
    for a in jax.tree_util.tree_leaves(tree):
        shape = a.sharding.shard_shape(a.shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
    return total


def abstract_caches(cfg: DSAConfig, mesh: Mesh, pages_per_rank: int, page_size: int, latent_kind: str) -> Any:
    dp, _ = mesh_shape(mesh)
    caches = jax.eval_shape(lambda: create_caches(cfg, dp * pages_per_rank, page_size, latent_kind=latent_kind))
    return with_shardings(caches, cache_specs(caches, mesh), mesh)


def abstract_rows(mesh: Mesh, rows_per_rank: int, width: int) -> list[jax.ShapeDtypeStruct]:
    dp, _ = mesh_shape(mesh)
    T = dp * rows_per_rank
    row, table = NamedSharding(mesh, P(DP)), NamedSharding(mesh, P(DP, None))
    i32 = jnp.int32
    return [jax.ShapeDtypeStruct((T,), i32, sharding=row)] * 3 + [jax.ShapeDtypeStruct((T, width), i32, sharding=table)]


# ----- compiling ------------------------------------------------------------------------------------


def count_collectives(hlo: str) -> dict[str, int]:
    """How many of each collective op a compiled program's HLO text contains (async start/done pairs
    counted once)."""
    counts = {}
    for op in COLLECTIVES:
        pattern = rf"= [^=\n]*? {op}(?:-start)?\("
        counts[op] = len(re.findall(pattern, hlo))
    return counts


@dataclasses.dataclass
class Compiled:
    """What one compiled program reports (per device)."""

    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    flops: float
    bytes_accessed: float
    collectives: dict[str, int]
    seconds: float


def compile_step(cfg: DSAConfig, mesh: Mesh, weights: str, rows_per_rank: int, pages_per_rank: int, width: int,
                 page_size: int, latent_kind: str, backend: Backend = "xla") -> Compiled:  # fmt: skip
    """AOT-compile one `forward_sharded` step of `cfg` on `mesh` (abstract inputs) and read its
    memory analysis, cost analysis and collectives."""
    from dsa_hybrid.parallel.forward import forward_sharded

    params = abstract_params(cfg, weights)
    params = with_shardings(params, param_specs(params, mesh), mesh)
    caches = abstract_caches(cfg, mesh, pages_per_rank, page_size, latent_kind)
    rows = abstract_rows(mesh, rows_per_rank, width)

    def step(params: Any, tokens: Any, positions: Any, slots: Any, tables: Any, caches: Any) -> Any:
        logits, caches = forward_sharded(params, cfg, mesh, tokens, positions, slots, tables, caches, backend)
        return jnp.argmax(logits, axis=-1), caches

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(5,)).lower(params, *rows, caches).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    if mem is None:
        raise RuntimeError("the TPU compiler returned no memory analysis")
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    cost = cost or {}
    return Compiled(
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        collectives=count_collectives(compiled.as_text() or ""),
        seconds=seconds,
    )


def representative(cfg: DSAConfig, n_dense: int, n_moe: int) -> DSAConfig:
    """`cfg` with `n_dense` dense layers followed by `n_moe` MoE layers (every indexer "full")."""
    return cfg.replace(num_hidden_layers=n_dense + n_moe, first_k_dense_replace=n_dense, mlp_layer_types=(),
                       indexer_types=())  # fmt: skip


@dataclasses.dataclass
class StepPlan:
    """One step (decode or prefill) of the full model on one device."""

    name: str
    rows_per_rank: int
    temp_bytes: int
    flops: float
    bytes_accessed: float
    collectives: dict[str, int]
    compile_seconds: float
    compiled_argument_bytes: int  # of the largest compiled program, per device (what XLA allocates)
    expected_argument_bytes: int  # the same program's inputs by the shard arithmetic
    layers_compiled: str  # which programs were compiled


@dataclasses.dataclass
class Plan:
    """Per-device memory of the full model on a TPU slice and the compiled steps (`plan`)."""

    model: str
    topology: str
    chip: str
    devices: int
    dp: int
    tp: int
    weights: str
    context: int
    batch: int
    latent_kind: str
    weight_bytes: int
    latent_bytes: int
    indexer_bytes: int
    steps: list[StepPlan]

    @property
    def capacity(self) -> int:
        c = CHIPS[self.chip]
        return c.hbm_bytes // c.devices_per_chip

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.latent_bytes + self.indexer_bytes + max(s.temp_bytes for s in self.steps)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.capacity


def default_tp(cfg: DSAConfig, devices: int) -> int:
    """The TP width the plan uses: 8 (one host's chips), less on smaller slices, dividing the heads.
    `ValueError` for `devices` < 1."""
    devices = check_int("devices", devices, 1)
    tp = min(8, devices)
    while cfg.num_attention_heads % tp or devices % tp:
        tp //= 2
    return max(tp, 1)


def choose_tp(cfg: DSAConfig, chip: str, devices: int, *, context: int, batch: int, weights: str, page_size: int,
              latent_kind: str, headroom: int = GiB) -> int:  # fmt: skip
    """The plan's default TP width: the largest of 8, 4, 2, 1 with which the weights and caches (shard
    arithmetic) leave `headroom` bytes of each device's HBM for temporaries; `default_tp` if none does.
    `ValueError` for an unknown `chip` or sizes < 1."""
    spec = CHIPS[check_choice("chip", chip, tuple(CHIPS))]
    devices, context, batch = (
        check_int(n, v, 1) for n, v in (("devices", devices), ("context", context), ("batch", batch))
    )
    page_size = check_int("page_size", page_size, 1)
    for tp in (8, 4, 2, 1):
        if devices % tp or cfg.num_attention_heads % tp or batch % (devices // tp):
            continue
        mesh = jax.sharding.AbstractMesh((devices // tp, tp), ("dp", "tp"))
        try:
            check_model_divides(cfg, mesh)  # type: ignore[arg-type]
            pages = (batch // (devices // tp)) * -(-context // page_size)
            w, lat, idx = full_model_bytes(cfg, mesh, weights, pages, page_size, latent_kind)  # type: ignore[arg-type]
        except ValueError:
            continue
        if w + lat + idx + headroom <= spec.hbm_bytes // spec.devices_per_chip:
            return tp
    return default_tp(cfg, devices)


def full_model_bytes(cfg: DSAConfig, mesh: Mesh, weights: str, pages_per_rank: int, page_size: int,
                     latent_kind: str) -> tuple[int, int, int]:  # fmt: skip
    """(weights, latent cache, indexer cache) bytes per device of every layer of `cfg` on `mesh`."""
    params = abstract_params(cfg, weights)
    params = with_shardings(params, param_specs(params, mesh), mesh)
    one = abstract_caches(cfg.replace(num_hidden_layers=1, first_k_dense_replace=1, mlp_layer_types=(),
                                      indexer_types=()), mesh, pages_per_rank, page_size, latent_kind)  # fmt: skip
    n = cfg.num_hidden_layers
    return shard_bytes(params), n * shard_bytes(one[0].latent), n * shard_bytes(one[0].index)


def plan(model: str, topology: str, *, context: int = 131072, batch: int = 32, weights: str = "fp8",
         tp: int | None = None, prefill_chunk: int = 256, page_size: int = 64, latent_kind: str = "bf16",
         cfg: DSAConfig | None = None, devices: Sequence[Any] | None = None, quick: bool = False,
         steps: Sequence[str] = ("decode", "prefill"), log: Any = None) -> Plan:  # fmt: skip
    """Compile one decode step and one prefill chunk of `model` for `topology` and account its HBM.

    Args:
        model: "deepseek_v32" or "glm_moe_dsa" (full size), or any name when `cfg` is given.
        topology: a libtpu topology name, `"v5p:4x4x4"`, `"v6e:8x8"`, `"tpu7x:2x2x4"`, …
        context: tokens per sequence the caches hold (every sequence at this length).
        batch: sequences, spread over the DP ranks (`batch` a multiple of dp).
        weights: "fp8" (the checkpoints' format, kept resident) or "bf16".
        tp: TP width (default `choose_tp`: the largest of 8, 4, 2, 1 that fits); dp = devices / tp.
        prefill_chunk: new tokens per DP rank in the prefill step.
        cfg, devices: a config and devices to use instead (tests: a tiny config).
        quick: compile only the 1 dense + 1 MoE program of each step (its collectives and cost are then
            that program's, not scaled to the full model); for tests.
        steps: which steps to compile, "decode" and / or "prefill".
        log: called with a line of progress per compiled program.

    Every argument is checked before libtpu is asked for anything: `TypeError` for a bool / float /
    string size, a non-string `topology`, a `cfg` that is not a `DSAConfig`, a `log` that is not callable;
    `ValueError` for an unknown `model`, TPU generation, `weights` or `latent_kind`, sizes < 1, `steps`
    other than "decode" / "prefill", and (once the devices are known) a `tp` or `batch` that does not
    divide, or a model that does not split over the mesh.
    """
    if cfg is None:
        if model not in MODELS:
            raise ValueError(f"model: expected one of {sorted(MODELS)}, got {model!r}")
        cfg = MODELS[model]()
    elif not isinstance(cfg, DSAConfig):
        raise TypeError(f"cfg: expected a DSAConfig, got {type(cfg).__name__}")
    chip = chip_of(topology)
    for name, v in (("context", context), ("batch", batch), ("prefill_chunk", prefill_chunk), ("page_size", page_size)):
        check_int(name, v, -(2**31))
    if context < 1 or batch < 1 or prefill_chunk < 1:
        raise ValueError("context, batch, prefill_chunk: expected >= 1")
    page_size = check_int("page_size", page_size, 1)
    check_choice("weights", weights, WEIGHT_FORMATS)
    check_choice("latent_kind", latent_kind, LATENT_KINDS)
    if tp is not None:
        tp = check_int("tp", tp, 1)
    if isinstance(steps, str) or not steps or any(s not in ("decode", "prefill") for s in steps):
        raise ValueError(f"steps: expected 'decode' and / or 'prefill', got {steps!r}")
    if log is not None and not callable(log):
        raise TypeError(f"log: expected a callable or None, got {type(log).__name__}")
    devs = topology_devices(topology) if devices is None else list(devices)
    if tp is None:
        tp = choose_tp(cfg, chip, len(devs), context=context, batch=batch, weights=weights, page_size=page_size,
                       latent_kind=latent_kind)  # fmt: skip
    if len(devs) % tp:
        raise ValueError(f"tp: {tp} does not divide the {len(devs)} devices of {topology}")
    dp = len(devs) // tp
    if batch % dp:
        raise ValueError(f"batch: {batch} sequences do not divide over {dp} DP ranks")
    mesh = make_mesh(dp, tp, devs)
    check_model_divides(cfg, mesh)
    pages_per_seq = -(-context // page_size)
    pages_per_rank = (batch // dp) * pages_per_seq
    w_bytes, lat_bytes, idx_bytes = full_model_bytes(cfg, mesh, weights, pages_per_rank, page_size, latent_kind)
    n_moe = sum(cfg.layer_mlp_type(i) == "sparse" for i in range(cfg.num_hidden_layers))
    n_dense = cfg.num_hidden_layers - n_moe
    step_plans = []
    programs = [(1, 1) if n_moe else (2, 0)] if quick else [(0, 0), (1, 0), (1, 1) if n_moe else (2, 0)]
    for name, rows in (("decode", batch // dp), ("prefill", prefill_chunk)):
        if name not in steps:
            continue
        parts = []
        for nd, nm in programs:
            sub = representative(cfg, nd, nm)
            c = compile_step(sub, mesh, weights, rows, pages_per_rank, pages_per_seq, page_size, latent_kind)
            if log is not None:
                log(f"  compiled {name} with {nd} dense + {nm} MoE layers in {c.seconds:.0f} s")
            parts.append((sub, c))
        sub_cfg, last = parts[-1]
        if quick:
            flops, accessed, coll = last.flops, last.bytes_accessed, dict(last.collectives)
            what = f"{sub_cfg.num_hidden_layers} layers ({'1 dense + 1 MoE' if n_moe else '2 dense'}), not scaled"
        else:
            top, dense1, both = (c for _, c in parts)
            per_dense = _minus(dense1, top)
            per_moe = _minus(both, dense1) if n_moe else per_dense
            flops = top.flops + n_dense * per_dense.flops + n_moe * per_moe.flops
            accessed = top.bytes_accessed + n_dense * per_dense.bytes_accessed + n_moe * per_moe.bytes_accessed
            coll = {k: total_c(top, per_dense, per_moe, n_dense, n_moe, k) for k in COLLECTIVES}
            what = f"0, 1 dense, 1 dense + 1 MoE layers; scaled to {n_dense} dense + {n_moe} MoE"
        sw, sl, si = full_model_bytes(sub_cfg, mesh, weights, pages_per_rank, page_size, latent_kind)
        rows_bytes = (3 + pages_per_seq) * 4 * rows
        step_plans.append(StepPlan(
            name=name, rows_per_rank=rows, temp_bytes=last.temp_bytes, flops=flops, bytes_accessed=accessed,
            collectives=coll, compile_seconds=sum(c.seconds for _, c in parts),
            compiled_argument_bytes=last.argument_bytes, expected_argument_bytes=sw + sl + si + rows_bytes,
            layers_compiled=what,
        ))  # fmt: skip
    return Plan(model, topology, chip, len(devs), dp, tp, weights, context, batch, latent_kind,
                w_bytes, lat_bytes, idx_bytes, step_plans)  # fmt: skip


def total_c(top: Compiled, dense: Compiled, moe: Compiled, n_dense: int, n_moe: int, key: str) -> int:
    return top.collectives[key] + n_dense * dense.collectives[key] + n_moe * moe.collectives[key]


def _minus(a: Compiled, b: Compiled) -> Compiled:
    return Compiled(
        a.argument_bytes - b.argument_bytes, a.output_bytes - b.output_bytes, a.temp_bytes - b.temp_bytes,
        a.flops - b.flops, a.bytes_accessed - b.bytes_accessed,
        {k: a.collectives[k] - b.collectives[k] for k in COLLECTIVES}, 0.0,
    )  # fmt: skip


# ----- the smallest slice ---------------------------------------------------------------------------


def smallest_slice(cfg: DSAConfig, chip: str, *, context: int, batch: int, weights: str, temp_bytes: int,
                   page_size: int = 64, latent_kind: str = "bf16") -> tuple[int, int] | None:  # fmt: skip
    """The fewest chips (a power of two up to the generation's largest slice) on which `cfg`'s weights
    and caches (exact shard arithmetic on an abstract mesh) plus `temp_bytes` fit each device's HBM, and
    the TP width that fits there: `(chips, tp)`, trying tp = 8, 4, 2, 1 (dp = devices / tp must divide
    `batch`). None if no slice does. `ValueError` for an unknown `chip` or `weights`, sizes < 1 or a
    negative `temp_bytes`."""
    spec = CHIPS[check_choice("chip", chip, tuple(CHIPS))]
    check_choice("weights", weights, WEIGHT_FORMATS)
    context, batch, page_size = (
        check_int(n, v, 1) for n, v in (("context", context), ("batch", batch), ("page_size", page_size))
    )
    temp_bytes = check_int("temp_bytes", temp_bytes, 0, 2**62)
    n = 1
    while n <= spec.max_chips:
        devices = n * spec.devices_per_chip
        for tp in (8, 4, 2, 1):
            dp = devices // tp
            if devices % tp or batch % dp or cfg.num_attention_heads % tp:
                continue
            mesh = jax.sharding.AbstractMesh((dp, tp), ("dp", "tp"))
            try:
                check_model_divides(cfg, mesh)  # type: ignore[arg-type]
                pages = (batch // dp) * -(-context // page_size)
                w, lat, idx = full_model_bytes(cfg, mesh, weights, pages, page_size, latent_kind)  # type: ignore[arg-type]
            except ValueError:
                continue
            if w + lat + idx + temp_bytes <= spec.hbm_bytes // spec.devices_per_chip:
                return n, tp
        n *= 2
    return None


# ----- printing -------------------------------------------------------------------------------------


def _gib(b: float) -> str:
    return f"{b / GiB:.1f}"


def format_plan(p: Plan) -> str:
    """The plan as text: HBM per device against capacity, then per step the collectives and the cost
    against the chip's roofline. `TypeError` if `p` is not a `Plan`."""
    if not isinstance(p, Plan):
        raise TypeError(f"p: expected a Plan, got {type(p).__name__}")
    c = CHIPS[p.chip]
    lines = [
        f"{p.model} on {p.topology}: {p.devices} devices ({p.devices // c.devices_per_chip} chips), mesh dp={p.dp} x "
        f"tp={p.tp}; {p.weights} weights; {p.batch} sequences x {p.context} tokens; latent cache {p.latent_kind}",
        f"HBM per device (GiB): weights {_gib(p.weight_bytes)} + latent cache {_gib(p.latent_bytes)} + indexer "
        f"cache {_gib(p.indexer_bytes)} + temporaries {_gib(max(s.temp_bytes for s in p.steps))} = "
        f"{_gib(p.peak_bytes)} of {_gib(p.capacity)} -> {'fits' if p.fits else 'DOES NOT FIT'}",
        f"  with the indexer keys on the host instead: {_gib(p.peak_bytes - p.indexer_bytes)} GiB "
        f"({_gib(p.indexer_bytes)} GiB freed per device)",
    ]
    for s in p.steps:
        coll = ", ".join(f"{k} {v}" for k, v in s.collectives.items() if v)
        t_bw, t_fl = s.bytes_accessed / c.hbm_bw, s.flops / c.bf16_flops
        lines.append(
            f"{s.name} ({s.rows_per_rank} rows per DP rank): collectives {coll or 'none'}; cost {s.flops / 1e12:.2f} "
            f"TFLOP, {s.bytes_accessed / 1e9:.1f} GB accessed per device -> roofline {1e3 * max(t_bw, t_fl):.2f} ms "
            f"({'HBM' if t_bw >= t_fl else 'compute'}-bound); temporaries {_gib(s.temp_bytes)} GiB"
        )
        lines.append(
            f"  compiled: {s.layers_compiled}, {s.compile_seconds:.0f} s; inputs of the largest program "
            f"{s.compiled_argument_bytes / 2**20:.1f} MiB per device as compiled, "
            f"{s.expected_argument_bytes / 2**20:.1f} MiB by the shard arithmetic"
        )
    return "\n".join(lines)

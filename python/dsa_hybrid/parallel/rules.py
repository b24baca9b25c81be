"""Sharding rules: which `PartitionSpec` every parameter and cache array gets on a `("dp", "tp")` mesh.

Rules are keyed by the parameter's *field path* in the pytree (`blocks.3.attn.q_b`, `blocks.5.moe.gate`,
`embed`) and applied by rank, so they hold whatever a weight is stored as: a plain array, or a pytree
under the parameter's name (an FP8 weight kept as `(codes, scale)`: both leaves are split the same way
along the dims the rule names). A leaf no rule names is replicated. Every leaf gets exactly one rule;
`describe_params` lists them (the tests check that none is missed).

| path | rule | spec |
|---|---|---|
| `blocks.*.attn.q_b`, `blocks.*.attn.kv_b` | attention heads (output rows, head-major) | `P("tp", None)` |
| `blocks.*.attn.o` | attention heads (input columns) | `P(None, "tp")` |
| `blocks.*.attn.*` (`q_a`, `kv_a`, norms, indexer) | replicated: same latent rows, same top-k on each rank | `P()` |
| `blocks.*.gate`, `blocks.*.up` (dense MLP) | MLP columns | `P("tp", None)` |
| `blocks.*.down` (dense MLP) | MLP rows | `P(None, "tp")` |
| `blocks.*.moe.gate/up/down` | routed experts over every device | `P(("dp", "tp"), None, None)` |
| `blocks.*.moe.shared_gate/shared_up` | shared-expert columns | `P("tp", None)` |
| `blocks.*.moe.shared_down` | shared-expert rows | `P(None, "tp")` |
| `blocks.*.moe.router/bias` | replicated (every device routes every row alike) | `P()` |
| `embed`, `lm_head` | vocabulary rows (replicated if the vocabulary does not divide) | `P("tp", None)` |
| caches: every leaf of every `DSACaches` | pages over DP ranks | `P("dp")` |
| rows: tokens, positions, slots `[T]`; block tables `[T, W]` | rows over DP ranks | `P("dp")` |
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.parallel.mesh import DP, TP, mesh_shape

__all__ = [
    "COL_SPLIT", "EXPERTS", "REPLICATED", "ROW_SPLIT", "VOCAB", "cache_specs", "check_model_divides",
    "describe_params", "named", "param_rule", "param_specs", "path_check", "path_string",
]  # fmt: skip

ROW_SPLIT = "tp-rows"  # dim 0 over "tp"
COL_SPLIT = "tp-cols"  # dim 1 over "tp"
EXPERTS = "experts"  # dim 0 over ("dp", "tp")
VOCAB = "vocab"  # dim 0 over "tp", replicated when it does not divide
REPLICATED = "replicated"
FP8_BLOCK = 128  # the block of `layers.weights.Fp8Weight` scales

_SPECS: dict[str, tuple[Any, ...]] = {
    ROW_SPLIT: (TP, None),
    COL_SPLIT: (None, TP),
    EXPERTS: ((DP, TP), None, None),
    VOCAB: (TP, None),
    REPLICATED: (),
}
_ATTN = {"q_b": ROW_SPLIT, "kv_b": ROW_SPLIT, "o": COL_SPLIT}
_DENSE_MLP = {"gate": ROW_SPLIT, "up": ROW_SPLIT, "down": COL_SPLIT}
_MOE = {"gate": EXPERTS, "up": EXPERTS, "down": EXPERTS, "shared_gate": ROW_SPLIT, "shared_up": ROW_SPLIT,
        "shared_down": COL_SPLIT}  # fmt: skip
_TOP = {"embed": VOCAB, "lm_head": VOCAB}


def _names(path: tuple[Any, ...]) -> list[str]:
    out = []
    for k in path:
        name = getattr(k, "name", None)
        if name is None:
            name = getattr(k, "key", None)
        if name is None:
            name = getattr(k, "idx", None)
        out.append(str(name))
    return out


def path_check(path: Any) -> tuple[Any, ...]:
    """`path` if it is a key path (a tuple or list of keys), else `TypeError` naming it."""
    if not isinstance(path, (tuple, list)):
        raise TypeError(f"path: expected a key path (a tuple), got {type(path).__name__}")
    return tuple(path)


def path_string(path: tuple[Any, ...]) -> str:
    """`blocks.3.attn.q_b` for a `tree_flatten_with_path` key path (`TypeError` for a non-sequence)."""
    return ".".join(_names(path_check(path)))


def param_rule(path: tuple[Any, ...]) -> str:
    """The rule name (`"tp-rows"`, `"tp-cols"`, `"experts"`, `"vocab"`, `"replicated"`) of the parameter
    leaf at `path` (a key path of `ModelParams`, or of one `BlockParams`), by its field names: the rule
    of the parameter the leaf belongs to, so the leaves of a pytree-valued weight (FP8 codes and scales)
    share it. `TypeError` for a `path` that is not a tuple of keys."""
    names = _names(path_check(path))
    if names and names[0] in _TOP:
        return _TOP[names[0]]
    if len(names) >= 2 and names[0] == "blocks":
        names = names[2:]  # blocks.<i>.…: the rest is a BlockParams path
    if len(names) >= 2 and names[0] == "attn":
        return _ATTN.get(names[1], REPLICATED)
    if len(names) >= 2 and names[0] == "moe":
        return _MOE.get(names[1], REPLICATED)
    if names and names[0] in _DENSE_MLP:
        return _DENSE_MLP[names[0]]
    return REPLICATED


def _spec_for(rule: str, leaf: Any, mesh_sizes: dict[str, int], where: str) -> P:
    dims = _SPECS[rule]
    shape = tuple(getattr(leaf, "shape", ()))
    if len(shape) < len(dims):  # a low-rank leaf of a sharded parameter (a per-tensor scale): whole
        return P()
    for d, axes in enumerate(dims):
        if axes is None:
            continue
        n = 1
        for a in axes if isinstance(axes, tuple) else (axes,):
            n *= mesh_sizes[a]
        # FP8 block codes split only at whole 128-blocks, so each shard keeps its own scales' rows.
        block = FP8_BLOCK if where.endswith(".codes") and n > 1 and d >= len(shape) - 2 else 1
        if shape[d] % (n * block):
            if rule == VOCAB:
                return P()
            raise ValueError(
                f"params.{where}: dim {d} of shape {list(shape)} does not divide over {axes} ({n} shards"
                + (f" of whole {block}-blocks)" if block > 1 else ")")
            )
    return P(*dims)


def param_specs(params: Any, mesh: Mesh) -> Any:
    """A pytree like `params` (a `ModelParams`, concrete or `jax.ShapeDtypeStruct` leaves) of
    `PartitionSpec`s by the module's rules. A sharded dimension that does not divide over its mesh axes
    raises `ValueError` naming the parameter (the vocabulary is replicated instead)."""
    dp, tp = mesh_shape(mesh)
    sizes = {DP: dp, TP: tp}
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    specs = [_spec_for(param_rule(p), leaf, sizes, path_string(p)) for p, leaf in flat]
    return jax.tree_util.tree_unflatten(treedef, specs)


def describe_params(params: Any, mesh: Mesh) -> dict[str, tuple[str, P]]:
    """`{path: (rule, spec)}` for every leaf of `params`: the table the sharding follows."""
    specs = jax.tree_util.tree_leaves(param_specs(params, mesh), is_leaf=lambda s: isinstance(s, P))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {path_string(p): (param_rule(p), s) for (p, _), s in zip(flat, specs, strict=True)}


def cache_specs(caches: Any, mesh: Mesh) -> Any:
    """`P("dp")` for every leaf of `caches` (a tuple of `DSACaches`: every array has pages first). The
    page count must divide over the DP ranks (`ValueError` otherwise)."""
    dp, _ = mesh_shape(mesh)

    def spec(path: tuple[Any, ...], leaf: Any) -> P:
        n = tuple(getattr(leaf, "shape", ()))[:1]
        if not n or n[0] % dp:
            raise ValueError(f"caches.{path_string(path)}: pages {list(n)} do not divide over {dp} DP ranks")
        return P(DP)

    return jax.tree_util.tree_map_with_path(spec, caches)


def named(mesh: Mesh, specs: Any) -> Any:
    """`NamedSharding`s of a pytree of `PartitionSpec`s (`TypeError` for a `mesh` that is no `Mesh`)."""
    if not isinstance(mesh, (Mesh, jax.sharding.AbstractMesh)):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def check_model_divides(cfg: DSAConfig, mesh: Mesh) -> None:
    """`ValueError` unless the model splits over the mesh: heads and MLP widths over `"tp"`, routed
    experts over every device (`TypeError` if `cfg` is not a `DSAConfig`)."""
    if not isinstance(cfg, DSAConfig):
        raise TypeError(f"cfg: expected a DSAConfig, got {type(cfg).__name__}")
    dp, tp = mesh_shape(mesh)
    if cfg.num_attention_heads % tp:
        raise ValueError(f"mesh: {cfg.num_attention_heads} attention heads do not divide over tp={tp}")
    if cfg.intermediate_size % tp:
        raise ValueError(f"mesh: intermediate_size {cfg.intermediate_size} does not divide over tp={tp}")
    has_moe = any(cfg.layer_mlp_type(i) == "sparse" for i in range(cfg.num_hidden_layers))
    if has_moe and cfg.n_routed_experts % (dp * tp):
        raise ValueError(f"mesh: {cfg.n_routed_experts} experts do not divide over dp*tp={dp * tp} devices")
    if has_moe and cfg.n_shared_experts and (cfg.n_shared_experts * cfg.moe_intermediate_size) % tp:
        raise ValueError("mesh: the shared experts' width does not divide over tp")

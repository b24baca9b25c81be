"""The device mesh the sharded model runs on: two named axes, `"dp"` and `"tp"`.

- `"dp"` (data-parallel attention): each DP rank serves its own sequences. It holds their latent and
  indexer pages (every cache array is split by pages over `"dp"`), runs their attention with all heads
  and their indexer, and its rows' block tables name pages of its own shard only.
- `"tp"` (tensor parallelism): inside a DP rank, the attention heads (`q_b`, `kv_b` by head, `o` by input
  column), the dense MLP (`gate`/`up` by output row, `down` by input column), the shared experts, the
  embedding and the LM head (by vocabulary row) are split over `"tp"`; partial sums meet in a `psum`.
- expert parallelism: the routed experts of an MoE layer are split over *all* devices (`("dp", "tp")`,
  DP-major): every device holds `E / (dp · tp)` experts and computes them for every row of the step.

A mesh of `dp · tp` devices, DP-major (`devices[r * tp + t]` is DP rank `r`, TP rank `t`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from dsa_hybrid.ops.checks import check_int

__all__ = ["AXES", "DP", "TP", "make_mesh", "mesh_shape"]

DP = "dp"
TP = "tp"
AXES = (DP, TP)


def make_mesh(dp: int, tp: int, devices: Sequence[Any] | None = None) -> Mesh:
    """A `Mesh` of shape `(dp, tp)` with axes `("dp", "tp")` over `devices` (default: `jax.devices()`,
    which spans every process after `jax.distributed.initialize`; also a TPU topology's devices for an
    ahead-of-time compile). Exactly `dp · tp` devices are used, in order; too few raise `ValueError`, as
    do `dp` or `tp` < 1 (a bool or float is a `TypeError`; so is a `devices` that is not a sequence)."""
    for name, v in (("dp", dp), ("tp", tp)):
        check_int(name, v, -(2**31))
    if dp < 1 or tp < 1:
        raise ValueError(f"dp, tp: expected >= 1, got dp={dp}, tp={tp}")
    if devices is not None and (isinstance(devices, (str, bytes)) or not hasattr(devices, "__len__")):
        raise TypeError(f"devices: expected a sequence of devices, got {type(devices).__name__}")
    devs = list(jax.devices() if devices is None else devices)
    if len(devs) < dp * tp:
        raise ValueError(f"devices: a {dp}x{tp} mesh needs {dp * tp} devices, got {len(devs)}")
    return Mesh(np.asarray(devs[: dp * tp], dtype=object).reshape(dp, tp), AXES)


def mesh_shape(mesh: Mesh) -> tuple[int, int]:
    """`(dp, tp)` of a mesh built by `make_mesh` (or an `AbstractMesh` with its axes); a mesh without both
    axes raises `ValueError`, something that is no mesh `TypeError`."""
    if not hasattr(mesh, "axis_names") or not hasattr(mesh, "shape"):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    names = tuple(mesh.axis_names)
    if names != AXES:
        raise ValueError(f"mesh: expected axes {AXES}, got {names}")
    return int(mesh.shape[DP]), int(mesh.shape[TP])

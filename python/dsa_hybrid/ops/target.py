"""Which device a computation is being built for, so that `backend="auto"` picks the Pallas TPU kernels
whenever the *target* is a TPU — also when a CPU host compiles a program for a TPU ahead of time.

The target is, in order: the device of the concrete `jax.Array` arguments passed in (an eager call on
committed arrays); the abstract device of the mesh in context (`jax.sharding.use_mesh`), the default
device (`jax.config.update("jax_default_device", dev)` or `with jax.default_device(dev):`), and
otherwise the first device of the default backend. The middle two are exactly what Pallas itself reads
when it lowers a TPU kernel (`pltpu.get_tpu_info()`), so "auto" and the kernel lowering always agree.
Inside `jit`, arguments are tracers without devices: there the context decides.

    topo = jax.experimental.topologies.get_topology_desc("v6e:2x2", "tpu")
    with jax.default_device(topo.devices[0]):
        jax.jit(f).lower(*shape_dtype_structs).compile()   # "auto" → Pallas, compiled for v6e
"""

from __future__ import annotations

from typing import Any

import jax

Backend = str  # "auto", "xla" or "pallas_tpu"

# Chip generation names used by the block-size tables and the roofline, from `device_kind`.
_CHIPS = (
    ("v5e", ("v5 lite", "v5e", "v5litepod")),
    ("v6e", ("v6 lite", "v6e", "trillium")),
    ("tpu7x", ("7x", "ironwood")),
    ("v5p", ("v5p", "tpu v5")),
    ("v4", ("tpu v4",)),
)


def _concrete_device(args: Any) -> Any:
    for leaf in jax.tree_util.tree_leaves(args):
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
            try:
                devices = leaf.sharding.device_set
            except Exception:  # noqa: BLE001 - deleted or otherwise unreadable arrays: look further
                continue
            if devices:
                return next(iter(devices))
    return None


def target_device(*args: Any) -> Any:
    """The device (or the mesh's abstract device) a computation on `args` is built for (see the module
    docstring). `args` may be any pytrees; only concrete `jax.Array` leaves are looked at."""
    dev = _concrete_device(args)
    if dev is not None:
        return dev
    try:
        abstract = jax.sharding.get_abstract_mesh().abstract_device
    except Exception:  # noqa: BLE001 - no mesh in context on this jax version
        abstract = None
    if abstract is not None:
        return abstract
    default = getattr(jax.config, "jax_default_device", None)  # not in jax's type stubs
    if isinstance(default, str):
        return jax.devices(default)[0]
    if default is not None:
        return default
    return jax.devices()[0]


def target_device_kind(*args: Any) -> str:
    """`device_kind` of `target_device(*args)` ("TPU v5 lite", "TPU v6 lite", "TPU v5", "TPU7x", "cpu", …)."""
    return str(target_device(*args).device_kind)


def target_is_tpu(*args: Any) -> bool:
    """Whether the computation on `args` targets a TPU (the test `backend="auto"` uses)."""
    dev = target_device(*args)
    platform = getattr(dev, "platform", None)
    if platform is not None:
        return platform == "tpu"
    return str(dev.device_kind).lower().startswith("tpu")


def tpu_chip(*args: Any) -> str | None:
    """The target's TPU generation as the tables name it: "v5e", "v5p", "v6e", "tpu7x" (or "v4"), None
    when the target is not a TPU or is one the tables do not know."""
    if not target_is_tpu(*args):
        return None
    kind = target_device_kind(*args).lower()
    for name, tags in _CHIPS:
        if any(t in kind for t in tags):
            return name
    return None


def resolve_backend(backend: str, *args: Any, interpret: Any = False) -> str:
    """ "xla" or "pallas_tpu" for a `backend` argument: "auto" is Pallas when the target is a TPU, XLA
    otherwise; "pallas_tpu" off a TPU target needs `interpret` (TPU interpret mode)."""
    if backend == "auto":
        backend = "pallas_tpu" if target_is_tpu(*args) else "xla"
    if backend not in ("xla", "pallas_tpu"):
        raise ValueError(f"backend: expected 'auto', 'xla' or 'pallas_tpu', got {backend!r}")
    if backend == "pallas_tpu" and interpret is False and not target_is_tpu(*args):
        raise RuntimeError(
            f"backend='pallas_tpu' needs a TPU target (the target device is {target_device_kind(*args)!r}); "
            "pass interpret=True to simulate the kernel, compile under `jax.default_device(<TPU device>)`, "
            "or use backend='xla'"
        )
    return backend

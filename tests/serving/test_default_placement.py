"""The Engine's placement when none is given (`engine.default_placement`): the host on a CPU, where the
Rust kernels select and attend, unless the cache configuration needs the device path."""

from __future__ import annotations

import pytest

from dsa_hybrid.models.causal_lm import ModelParams
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.parallel.mesh import make_mesh
from dsa_hybrid.serving.engine import Engine, default_placement

CFG = DSAConfig.tiny()
PARAMS = ModelParams.random(CFG, seed=0)


@pytest.mark.parametrize(
    ("kw", "want"),
    [
        (dict(indexer="fp8", page_size=16), "host"),
        (dict(indexer="fp8", page_size=64), "host"),
        (dict(indexer="exact", page_size=16), "device"),  # the host cache holds FP8 keys only
        (dict(indexer="fp8", page_size=8), "device"),  # host pages are whole 16-key SIMD blocks
        (dict(indexer="fp8", page_size=0), "device"),  # (the runner names the bad size)
    ],
)
def test_default_placement_rules_on_a_cpu(kw, want):
    assert default_placement(**kw) == want


def test_a_cpu_mesh_defaults_to_the_host_too():
    assert default_placement(mesh=make_mesh(1, 1)) == "host"


def test_the_engine_takes_the_default_and_an_explicit_choice_wins():
    kw = dict(num_pages=8, page_size=16, max_model_len=64, backend="xla")
    assert Engine(PARAMS, CFG, **kw).placement == "host"
    assert Engine(PARAMS, CFG, **kw, placement="device").placement == "device"
    assert Engine(PARAMS, CFG, **kw, indexer="exact").placement == "device"
    with pytest.raises(ValueError, match="placement"):
        Engine(PARAMS, CFG, **kw, placement="gpu")

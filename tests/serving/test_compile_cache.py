"""The per-user cache: where it lives (`compile_cache.cache_dir`), JAX's persistent compilation cache
turned on there, and the placement cost model stored, reused and keyed (`PlacementCosts.cached`)."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from dsa_hybrid.models.causal_lm import ModelParams
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.serving import placement
from dsa_hybrid.serving.compile_cache import cache_dir, enable_compilation_cache
from dsa_hybrid.serving.engine import Engine
from dsa_hybrid.serving.placement import (
    PlacementCosts,
    cache_key,
    cost_model_path,
    load_costs,
    relative_spread,
    save_costs,
)

CFG = DSAConfig.small()
COSTS = PlacementCosts(host_fixed=1e-4, host_per_key=2.5e-9, device_fixed=3e-4, device_per_key=1.25e-9)
KEY_ARGS = {"lengths": (128,), "rows": (1, 8), "threads": None, "repeats": 5, "latent_kind": "f32"}


# ----- where -----------------------------------------------------------------------------------------
def test_cache_dir_rules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DSA_HYBRID_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"  # the override wins over XDG
    for off in ("off", "OFF", "", "  ", "0", "none"):
        monkeypatch.setenv("DSA_HYBRID_CACHE_DIR", off)
        assert cache_dir() is None
    monkeypatch.delenv("DSA_HYBRID_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "dsa_hybrid"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/not/allowed")  # the XDG spec: ignore relative paths
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "dsa_hybrid"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "dsa_hybrid"


@pytest.fixture
def jax_cache_unset():
    """JAX's cache settings restored after the test (and its cache reset), whatever the test set."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {n: getattr(jax.config, n) for n in names}
    # JAX's defaults, whatever the session set (tests/conftest.py stores every program in its own cache):
    # what these tests check is what `enable_compilation_cache` sets, not what was there.
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()
    yield
    for n, v in saved.items():
        jax.config.update(n, v)
    cc.reset_cache()


def test_enable_compilation_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, jax_cache_unset) -> None:
    monkeypatch.setenv("DSA_HYBRID_CACHE_DIR", "off")
    assert enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None
    monkeypatch.setenv("DSA_HYBRID_CACHE_DIR", str(tmp_path))
    assert enable_compilation_cache() == tmp_path / "jax"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1
    # A small program is stored.
    jax.jit(lambda x: x * 3.0 + 1.0)(jax.numpy.ones(7)).block_until_ready()
    assert any((tmp_path / "jax").iterdir())
    # Idempotent, and a directory configured before (here: the first call's) is never replaced.
    monkeypatch.setenv("DSA_HYBRID_CACHE_DIR", str(tmp_path / "other"))
    assert enable_compilation_cache() == tmp_path / "jax"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax")
    assert not (tmp_path / "other").exists()


def test_a_users_jax_cache_dir_is_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, jax_cache_unset) -> None:
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "users"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    monkeypatch.setenv("DSA_HYBRID_CACHE_DIR", str(tmp_path / "ours"))
    assert enable_compilation_cache() == tmp_path / "users"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "users")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 1.0  # its thresholds too
    assert not (tmp_path / "ours").exists()


# ----- the stored cost model -------------------------------------------------------------------------
def test_cost_model_round_trip_and_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DSA_HYBRID_CACHE_DIR", str(tmp_path))
    key = cache_key(CFG, 16, **KEY_ARGS)
    path = cost_model_path(key)
    assert path is not None and Path(path).parent == tmp_path / "placement"
    save_costs(path, key, COSTS)
    assert load_costs(path, key) == COSTS  # exact: floats survive JSON
    assert json.loads(Path(path).read_text())["key"]["machine"]["features"]["simd_path"]
    # Another key: another file; and a file whose key differs is not taken for this one.
    others = [
        cache_key(dataclasses.replace(CFG, kv_lora_rank=2 * CFG.kv_lora_rank), 16, **KEY_ARGS),
        cache_key(dataclasses.replace(CFG, index_head_dim=2 * CFG.index_head_dim), 16, **KEY_ARGS),
        cache_key(CFG, 64, **KEY_ARGS),
        cache_key(CFG, 16, **{**KEY_ARGS, "latent_kind": "bf16"}),
        cache_key(CFG, 16, **{**KEY_ARGS, "threads": 1}),
        cache_key(CFG, 16, **KEY_ARGS, indexer="exact"),
        cache_key(CFG, 16, **KEY_ARGS, weights="bfloat16"),
        cache_key(DSAConfig.small("glm_moe_dsa"), 16, **KEY_ARGS),
    ]
    monkeypatch.setattr(placement, "__version__", "999.0")
    others.append(cache_key(CFG, 16, **KEY_ARGS))
    monkeypatch.setattr(placement.jax, "__version__", "0.0.1")
    others.append(cache_key(CFG, 16, **KEY_ARGS))
    paths = {cost_model_path(k) for k in others}
    assert path not in paths and len(paths) == len(others)
    for k in others:
        assert load_costs(path, k) is None
        p = cost_model_path(k)
        assert p is not None and not os.path.exists(p)
    monkeypatch.setenv("DSA_HYBRID_CACHE_DIR", "off")
    assert cost_model_path(key) is None


def test_cached_measures_once_then_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DSA_HYBRID_CACHE_DIR", str(tmp_path))
    calls: list[int] = []

    def fake_measure(*args, **kwargs) -> PlacementCosts:
        calls.append(1)
        return dataclasses.replace(COSTS, host_fixed=COSTS.host_fixed * len(calls))

    kw = {k: v for k, v in KEY_ARGS.items()}
    first = PlacementCosts.cached(CFG, None, 16, measure=fake_measure, **kw)
    second = PlacementCosts.cached(CFG, None, 16, measure=fake_measure, **kw)
    assert first == (COSTS, "measured") and second == (COSTS, "loaded") and len(calls) == 1
    monkeypatch.setenv("DSA_HYBRID_REMEASURE", "1")  # forced: measured and stored afresh
    third = PlacementCosts.cached(CFG, None, 16, measure=fake_measure, **kw)
    assert third[1] == "measured" and len(calls) == 2
    monkeypatch.delenv("DSA_HYBRID_REMEASURE")
    assert PlacementCosts.cached(CFG, None, 16, measure=fake_measure, **kw)[0] == third[0]
    assert PlacementCosts.cached(CFG, None, 16, measure=fake_measure, refresh=True, **kw)[1] == "measured"
    monkeypatch.setenv("DSA_HYBRID_CACHE_DIR", "off")  # off: nothing loaded, nothing stored
    assert PlacementCosts.cached(CFG, None, 16, measure=fake_measure, **kw)[1] == "measured"
    assert len(calls) == 4


def test_measure_points_are_medians_of_wall_and_cpu() -> None:
    costs, points = PlacementCosts.measure_points(
        CFG, ModelParams.random(CFG, seed=0).blocks[0].attn, 16, lengths=(64,), rows=(1,), threads=1,
        repeats=3, latent_kind="f32",
    )  # fmt: skip
    assert {p["where"] for p in points} == {"host", "device"}
    assert all(p["wall_s"] > 0 and p["cpu_s"] >= 0 and p["spread"] >= 0 for p in points)
    assert min(dataclasses.astuple(costs)) >= 0
    assert costs.spread == statistics.median(p["spread"] for p in points)


def test_relative_spread_is_the_interquartile_range_over_the_median() -> None:
    assert relative_spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2.0 / 3.0)  # quartiles 2 and 4
    assert relative_spread([2.0, 2.0, 2.0]) == 0.0 and relative_spread([5.0]) == 0.0
    assert relative_spread([1.0, 1.0, 9.0, 1.0, 1.0]) == 0.0  # one outlier does not widen it


def test_engine_loads_a_stored_cost_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, jax_cache_unset) -> None:
    monkeypatch.setenv("DSA_HYBRID_CACHE_DIR", str(tmp_path))
    params = ModelParams.random(CFG, seed=0)
    kw = {"num_pages": 8, "page_size": 16, "max_model_len": 128, "backend": "xla", "placement": "auto"}
    measured = Engine(params, CFG, **kw)
    assert measured.cost_model_source == "measured"
    assert list((tmp_path / "placement").glob("costs-*.json"))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax")  # the Engine turned it on

    def fail(*args, **kwargs):
        raise AssertionError("measured although a cost model is stored")

    monkeypatch.setattr(PlacementCosts, "measure", staticmethod(fail))
    loaded = Engine(params, CFG, **kw)
    assert loaded.cost_model_source == "loaded" and loaded.cost_model == measured.cost_model
    assert Engine(params, CFG, **kw, cost_model=COSTS).cost_model_source == "given"
    assert Engine(params, CFG, **{**kw, "placement": "device"}).cost_model_source is None
    monkeypatch.setenv("DSA_HYBRID_REMEASURE", "1")
    with pytest.raises(AssertionError, match="measured although"):
        Engine(params, CFG, **kw)


def test_importing_the_package_does_not_enable_it(tmp_path: Path) -> None:
    code = "import dsa_hybrid, dsa_hybrid.serving, jax; print(jax.config.jax_compilation_cache_dir)"
    env = {**os.environ, "DSA_HYBRID_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None" and not any(tmp_path.iterdir())

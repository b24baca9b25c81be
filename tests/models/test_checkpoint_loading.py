"""Lazy loading of sharded checkpoints: `model.safetensors.index.json` with one shard per layer, read one
layer at a time (a shard nothing asks for is never opened, even when it is garbage), MTP / next-n layers
skipped with a one-line message, a progress bar on request, the loaded model equal to the one written."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import jax
import numpy as np
import pytest

from dsa_hybrid import DSAConfig
from dsa_hybrid.models.causal_lm import ModelParams, checkpoint_nbytes
from dsa_hybrid.models.checkpoint import Checkpoint, LoadProgress, write_safetensors


def write_sharded(d: Path, params: ModelParams, cfg: DSAConfig, mtp_garbage: bool = True) -> None:
    tensors = params.state_dict()
    shards: dict[str, dict[str, np.ndarray]] = {}
    for name, v in tensors.items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else "top"
        shards.setdefault(f"model-{layer}.safetensors", {})[name] = v
    weight_map = {}
    for file, ts in shards.items():
        write_safetensors(d / file, ts)
        weight_map.update(dict.fromkeys(ts, file))
    n = cfg.num_hidden_layers  # an MTP layer: listed in the index, its shard never read
    mtp = {
        f"model.layers.{n}.eh_proj.weight": f"model-{n}.safetensors",
        f"model.layers.{n}.enorm.weight": f"model-{n}.safetensors",
    }
    (d / f"model-{n}.safetensors").write_bytes(b"\xff" * 64 if mtp_garbage else b"")
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map | mtp}))
    (d / "config.json").write_text(json.dumps(cfg.replace(num_nextn_predict_layers=1).to_hf_config()))


def test_sharded_checkpoint_loads_lazily_and_skips_mtp_layers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = DSAConfig.tiny("glm_moe_dsa").replace(
        num_hidden_layers=3, indexer_types=("full", "shared", "full"), first_k_dense_replace=1
    )
    params = ModelParams.random(cfg, seed=3)
    write_sharded(tmp_path, params, cfg)
    cfg2 = DSAConfig.from_hf_config(tmp_path)
    assert cfg2.num_nextn_predict_layers == 1
    with caplog.at_level(logging.WARNING, logger="dsa_hybrid.models"):
        loaded = ModelParams.from_checkpoint(tmp_path, cfg2, weights="float32", progress=False)
    msgs = [r.getMessage() for r in caplog.records if r.name == "dsa_hybrid.models"]
    assert len(msgs) == 1 and "skipping 1 MTP / next-n layer(s) (model.layers.3.*" in msgs[0] and "\n" not in msgs[0]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ckpt = Checkpoint(tmp_path)
    assert ckpt.layers_beyond(3) == [3]
    assert ckpt.index["model.layers.3.eh_proj.weight"].name == "model-3.safetensors"
    # Resident float32 bytes == the float32 checkpoint's bytes of the model (MTP layer left out).
    assert loaded.nbytes == checkpoint_nbytes(tmp_path, cfg2)


def test_progress_bar_only_when_asked_or_on_a_terminal() -> None:
    out = io.StringIO()
    bar = LoadProgress(2, True, out)
    bar.step(2**20)
    bar.step(2**20)
    text = out.getvalue()
    assert text.startswith("\rloading 1/2 layers [") and "2/2 layers" in text and text.endswith("2.0 MiB\n")
    quiet = io.StringIO()  # StringIO is not a terminal: nothing by default
    LoadProgress(2, None, quiet).step()
    assert quiet.getvalue() == ""

"""`dsa-hybrid plan` at tiny scale: a 1 dense + 1 MoE layer model AOT-compiled by libtpu for an 8-chip
v5e slice (dp 2 × tp 4), its per-device HBM from the shard arithmetic checked against what the compiler
allocated, and its collectives. Skips without libtpu unless DSA_HYBRID_REQUIRE_TPU_COMPILE=1."""

from __future__ import annotations

import importlib.util
import os

import jax
import numpy as np
import pytest

from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.parallel import plan as pl

REQUIRED = os.environ.get("DSA_HYBRID_REQUIRE_TPU_COMPILE") == "1"


@pytest.fixture
def tpu_compiler() -> None:
    if importlib.util.find_spec("libtpu") is not None:
        return
    message = 'libtpu is not installed (pip install "dsa_hybrid[tpu-compile]")'
    if REQUIRED:
        pytest.fail(f"{message}, and DSA_HYBRID_REQUIRE_TPU_COMPILE=1 requires the TPU compile check")
    pytest.skip(message)


def test_tiny_plan_compiles_and_accounts_its_memory(tpu_compiler) -> None:
    cfg = DSAConfig.tiny("deepseek_v32").replace(first_k_dense_replace=1, num_hidden_layers=6)
    p = pl.plan("tiny", "v5e:2x4", cfg=cfg, context=64, batch=2, weights="bf16", page_size=16, quick=True,
                steps=("decode",))  # fmt: skip
    assert (p.devices, p.dp, p.tp, p.chip) == (8, 2, 4, "v5e")
    # Weights per device by hand: heads / MLP / vocabulary split 4 ways, experts 8 ways, the rest whole.
    params = pl.abstract_params(cfg, "bf16")
    want = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        split = 8 if ".moe.gate" in name or ".moe.up" in name or ".moe.down" in name else 1
        if split == 1 and any(k in name for k in (".q_b", ".kv_b", ".o", "gate", "up", "down", "embed", "lm_head")):
            split = 4
        want += nbytes // split
    assert p.weight_bytes == want
    # Caches per device: one DP rank's sequence (64 tokens) in every layer, replicated over TP.
    assert p.indexer_bytes == 6 * 64 * (32 + 4)  # D_I FP8 bytes + a float32 scale per key
    (s,) = p.steps
    assert s.name == "decode" and s.rows_per_rank == 1
    # What the compiler allocated for the inputs covers the shard arithmetic (TPU tiles pad tiny arrays).
    assert s.expected_argument_bytes <= s.compiled_argument_bytes <= 64 * s.expected_argument_bytes
    assert s.collectives["all-reduce"] >= 2  # attention and MLP partial sums over "tp"
    assert s.collectives["all-gather"] >= 1  # the MoE gathers every DP rank's rows
    assert s.flops > 0 and s.bytes_accessed > 0 and p.fits
    text = pl.format_plan(p)
    assert "HBM per device" in text and "fits" in text and "all-reduce" in text


def test_plan_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="topology"):
        pl.chip_of("v9z:2x2")
    with pytest.raises(ValueError, match="model"):
        pl.plan("llama", "v5e:2x2")
    with pytest.raises(ValueError, match="weights"):
        pl.abstract_params(DSAConfig.tiny(), "int4")
    cfg = DSAConfig.tiny().replace(first_k_dense_replace=1)
    with pytest.raises(ValueError, match="batch"):
        pl.plan("tiny", "v5e:2x4", cfg=cfg, batch=3, devices=[object()] * 8, tp=4)
    with pytest.raises(ValueError, match="steps"):
        pl.plan("tiny", "v5e:2x4", cfg=cfg, batch=2, devices=[object()] * 8, tp=4, steps=("train",))


def test_count_collectives_reads_hlo_text() -> None:
    hlo = (
        "%a = f32[8]{0} all-reduce(f32[8]{0} %x), replica_groups={}\n"
        "%b = (f32[8], f32[16]) all-gather-start(f32[8] %y)\n"
        "%c = f32[16] all-gather-done((f32[8], f32[16]) %b)\n"
        "%d = f32[4] reduce-scatter(f32[16] %z)\n"
    )
    got = pl.count_collectives(hlo)
    assert got["all-reduce"] == 1 and got["all-gather"] == 1 and got["reduce-scatter"] == 1 and got["all-to-all"] == 0


def test_cli_plan_parses(monkeypatch) -> None:
    from dsa_hybrid.cli import main
    from dsa_hybrid.cli import plan as cli_plan

    seen = {}

    def fake(args, out=None) -> int:
        seen.update(vars(args))
        return 0

    monkeypatch.setattr(cli_plan, "run_plan", fake)
    assert main(["plan", "--model", "glm_moe_dsa", "--topology", "v6e:8x8", "--batch", "16", "--weights", "bf16"]) == 0
    assert seen["model"] == "glm_moe_dsa" and seen["topology"] == "v6e:8x8" and seen["batch"] == 16

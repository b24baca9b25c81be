"""Parity with Hugging Face transformers' DeepSeek-V3.2 and GLM-MoE-DSA attention layers, through golden
files made by `tests/golden/make_golden.py` (torch is not needed here): the checkpoint is loaded from its
safetensors file, the config from its config.json, and prefill, chunked prefill and decode must give
transformers' outputs within float32 tolerance and its selected sets."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_hybrid import DSAConfig
from dsa_hybrid.layers.dsa_attention import DSACaches, dsa_attention
from dsa_hybrid.models.checkpoint import load_layer_params, quantize_fp8_blocks, read_safetensors, write_safetensors

GOLDEN = Path(__file__).parents[1] / "golden"
PAGE = 8
_layer = jax.jit(
    lambda p, cfg, x, pos, slots, tables, caches: dsa_attention(p, cfg, x, pos, slots, tables, caches, backend="xla"),
    static_argnums=1,
)


def run(params, cfg: DSAConfig, x: np.ndarray, chunks: tuple[int, ...], latent_kind: str = "f32"):
    L = x.shape[0]
    n_pages = -(-L // PAGE)
    pages = (np.arange(n_pages)[::-1] + 1).astype(np.int32)  # scattered, page 0 unused
    caches = DSACaches.create(cfg, n_pages + 1, PAGE, latent_kind=latent_kind, indexer="exact")
    outs, tops, start = [], [], 0
    for n in chunks:
        pos = np.arange(start, start + n, dtype=np.int32)
        out, caches, topk = _layer(
            params, cfg, jnp.asarray(x[start : start + n]), jnp.asarray(pos),
            jnp.asarray(pages[pos // PAGE] * PAGE + pos % PAGE), jnp.asarray(np.tile(pages, (n, 1))), caches,
        )  # fmt: skip
        outs.append(np.asarray(out))
        tops.append(np.asarray(topk))
        start += n
    return np.concatenate(outs), np.concatenate(tops)


@pytest.mark.parametrize("model", ["deepseek_v32", "glm_moe_dsa"])
@pytest.mark.parametrize("chunks", [(40,), (9, 1, 30), (1,) * 40], ids=["prefill", "chunked", "decode"])
def test_matches_transformers(model: str, chunks: tuple[int, ...]) -> None:
    d = GOLDEN / model
    cfg = DSAConfig.from_hf_config(d / "config.json")
    assert cfg.model_type == model and cfg.index_topk == 16
    params = load_layer_params(d, cfg, 0)
    io = np.load(d / "io.npz")
    out, topk = run(params, cfg, io["x"], chunks)
    for t, (hf_row, row) in enumerate(zip(io["topk"], topk, strict=True)):
        # transformers' rows before position 15 also list masked future positions: keep the visible ones.
        assert set(hf_row[hf_row <= t].tolist()) == set(row[row >= 0].tolist()), f"row {t}"
    np.testing.assert_allclose(out, io["out"], rtol=1e-4, atol=1e-5 * np.abs(io["out"]).max())


def test_fp8_checkpoint_equals_its_dequantized_twin(tmp_path: Path) -> None:
    """An FP8 checkpoint (e4m3 weights + 128×128 `weight_scale_inv`) loads as the same layer as the bf16
    checkpoint holding its dequantized weights."""
    d = GOLDEN / "deepseek_v32"
    cfg = DSAConfig.from_hf_config(d / "config.json")
    tensors = read_safetensors(d / "model.safetensors")
    fp8, twin = {}, {}
    for name, w in tensors.items():
        if name.endswith("proj.weight") and "weights_proj" not in name or name.endswith(("wq_b.weight", "wk.weight")):
            w8, s = quantize_fp8_blocks(w)
            fp8[name], fp8[name.removesuffix("weight") + "weight_scale_inv"] = w8, s
            twin[name] = w8.astype(np.float32) * np.repeat(np.repeat(s, 128, 0), 128, 1)[: w.shape[0], : w.shape[1]]
        else:
            fp8[name] = twin[name] = w
    (tmp_path / "fp8").mkdir()
    (tmp_path / "twin").mkdir()
    write_safetensors(tmp_path / "fp8" / "model.safetensors", fp8)
    write_safetensors(tmp_path / "twin" / "model.safetensors", {k: v.astype(np.float32) for k, v in twin.items()})
    a, b = load_layer_params(tmp_path / "fp8", cfg, 0), load_layer_params(tmp_path / "twin", cfg, 0)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert any(v.dtype.itemsize == 1 for v in fp8.values())
    x = np.load(d / "io.npz")["x"]
    np.testing.assert_array_equal(run(a, cfg, x, (40,))[0], run(b, cfg, x, (40,))[0])


def test_missing_and_misshapen_tensors_are_named(tmp_path: Path) -> None:
    d = GOLDEN / "glm_moe_dsa"
    cfg = DSAConfig.from_hf_config(d / "config.json")
    tensors = read_safetensors(d / "model.safetensors")
    name = "model.layers.0.self_attn.indexer.wk.weight"
    write_safetensors(tmp_path / "model.safetensors", {k: v for k, v in tensors.items() if k != name})
    with pytest.raises(KeyError, match="indexer.wk.weight: missing"):
        load_layer_params(tmp_path, cfg, 0)
    write_safetensors(tmp_path / "model.safetensors", tensors | {name: np.zeros((3, 4), np.float32)})
    with pytest.raises(ValueError, match=r"indexer.wk.weight: expected shape \[32, 64\]"):
        load_layer_params(tmp_path, cfg, 0)
    with pytest.raises(FileNotFoundError):
        load_layer_params(tmp_path / "nowhere", cfg, 0)

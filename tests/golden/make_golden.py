"""Generate the Hugging Face parity golden files in this folder. Needs torch and transformers >= 5.24
(not CI dependencies: CI only reads the files). Run from the repository root:

    python tests/golden/make_golden.py [dense|moe|quant]

Set GOLDEN_OUT=DIR to write elsewhere (to compare a fresh run with the committed files first: torch's
float32 sums may differ in the last bit between versions and thread counts, and np.savez stamps times).

`dense` (the default) writes the attention-layer goldens: for each model type (DeepSeek-V3.2 and
GLM-MoE-DSA) a tiny config, a random attention layer in transformers (eager attention, float32), run on
random hidden states of 40 tokens (index_topk 16, so selection drops tokens), as `<model>/config.json`,
`<model>/model.safetensors` (the layer's weights under their checkpoint names) and `<model>/io.npz`
(inputs, outputs, top-k indices). Seeds are chosen so that no row's top-k depends on tie-breaking: the
gap between the k-th and (k+1)-th indexer score (recomputed in float64) must exceed 1e-4 relative. It also
writes `deepseek_v32_lm/`, a tiny all-dense DeepseekV32ForCausalLM.

`moe` writes the MoE language models (`<model>_moe_lm/`): tiny DeepseekV32ForCausalLM (group-limited
routing that drops groups) and GlmMoeDsaForCausalLM (with "shared" indexer layers), their first layer
dense and the others MoE, a random `e_score_correction_bias`; the checkpoint is written with one tensor
per expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`), as the released checkpoints are.

`quant` writes the same two MoE language models at wider sizes (hidden 192, dense MLP 320, so weights
span several 128 × 128 blocks, ragged at the edges) as they are released: `<model>_moe_lm_bf16/` with
every tensor in bfloat16, and `<model>_moe_lm_fp8/` with every linear weight FP8 e4m3fn +
`weight_scale_inv` blocks (as DeepSeek's checkpoints: not the embedding, the LM head, the norms, the
router or the indexer's `weights_proj`, which stay bfloat16) and a `quantization_config` in config.json.
transformers runs in float32 on exactly the stored values (bf16 widened, FP8 dequantized: what the
checkpoint means), so the goldens test the resident formats' math.

Every language-model golden's `io.npz` holds the 30-token prompt, 12 greedy tokens (`generated`; fewer
when transformers stopped at EOS, which is then the last), and from the prompt's forward pass the logits,
each decoder layer's output (`layer_out [L, 30, hidden]`) and each layer's top-k selection (`topk
[L, 30, 16]`, from hooks on the indexers; a "shared" layer repeats the previous full layer's).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from transformers.models.deepseek_v32 import modeling_deepseek_v32 as v32
from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as glm

HERE = Path(__file__).resolve().parent
OUT = Path(os.environ.get("GOLDEN_OUT", HERE))  # where to write (compare a fresh run before replacing)
sys.path.insert(0, str(HERE.parents[1] / "python"))
from dsa_hybrid import DSAConfig  # noqa: E402
from dsa_hybrid import reference as ref  # noqa: E402
from dsa_hybrid.models.checkpoint import dequantize_fp8_blocks, quantize_fp8_blocks, write_safetensors  # noqa: E402

LM_CLASSES = {"deepseek_v32": v32.DeepseekV32ForCausalLM, "glm_moe_dsa": glm.GlmMoeDsaForCausalLM}
MODELS = {
    "deepseek_v32": (v32.DeepseekV32Config, v32.DeepseekV32Attention, v32.DeepseekV32RotaryEmbedding),
    "glm_moe_dsa": (glm.GlmMoeDsaConfig, glm.GlmMoeDsaAttention, glm.GlmMoeDsaRotaryEmbedding),
}
SEQ = 40


def tiny(model_type: str) -> DSAConfig:
    # 8 indexer heads: few heads make many exactly-zero (tied) scores after the ReLU.
    return DSAConfig.tiny(model_type).replace(index_n_heads=8, num_hidden_layers=1, first_k_dense_replace=1)


def boundary_gap(scores: np.ndarray, k: int) -> float:
    """Smallest relative gap between the k-th and (k+1)-th visible score over the rows that drop tokens."""
    gaps = []
    for t in range(k, scores.shape[0]):
        row = np.sort(scores[t, : t + 1])[::-1]
        gaps.append((row[k - 1] - row[k]) / (np.abs(row).max() + 1e-30))
    return float(min(gaps))


def generate(model_type: str, seed: int) -> float:
    cfg = tiny(model_type)
    config_cls, attn_cls, rotary_cls = MODELS[model_type]
    hf = cfg.to_hf_config()
    hf.pop("model_type")
    if model_type == "glm_moe_dsa":
        hf["indexer_types"] = ["full"]
    hf_cfg = config_cls(**hf)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    attn = attn_cls(hf_cfg, layer_idx=0).float().eval()
    with torch.no_grad():
        for name, p in attn.named_parameters():  # every weight random, norms and biases too
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p)
                if "norm" in name and name.endswith("weight")
                else 0.1 * torch.randn_like(p)
            )
    rotary = rotary_cls(hf_cfg)
    x = torch.randn(1, SEQ, cfg.hidden_size)
    pos = torch.arange(SEQ)[None]
    cos, sin = rotary(x, pos)
    # Additive causal mask (eager attention adds the mask: a bool mask would be added as 0/1).
    allowed = torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool))[None, None]
    mask = torch.zeros(1, 1, SEQ, SEQ).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        out = attn(x, (cos, sin), mask, cache=None, position_ids=pos)[0]  # GLM also returns its top-k
        q_resid = attn.q_a_layernorm(attn.q_a_proj(x))
        topk = attn.indexer(x, q_resid, (cos, sin), mask[:, 0], pos)
    tensors = {
        f"model.layers.0.self_attn.{k}": v.detach().numpy().astype(np.float32) for k, v in attn.state_dict().items()
    }
    # Recompute the indexer scores in float64 with the oracle, to reject seeds with near-ties.
    sd = {k.removeprefix("model.layers.0.self_attn."): v.astype(np.float64) for k, v in tensors.items()}
    xs = x[0].numpy().astype(np.float64)
    c_q = ref.rms_norm(xs @ sd["q_a_proj.weight"].T, sd["q_a_layernorm.weight"], cfg.rms_norm_eps)
    q_i = (c_q @ sd["indexer.wq_b.weight"].T).reshape(SEQ, cfg.index_n_heads, cfg.index_head_dim)
    k_i = ref.layer_norm(xs @ sd["indexer.wk.weight"].T, sd["indexer.k_norm.weight"], sd["indexer.k_norm.bias"])
    r, p = cfg.qk_rope_head_dim, np.arange(SEQ)
    q_i[..., :r] = ref.apply_rope(q_i[..., :r], p[:, None], cfg.rope_freqs, cfg.indexer_rope_pairing)
    k_i[:, :r] = ref.apply_rope(k_i[:, :r], p, cfg.rope_freqs, cfg.indexer_rope_pairing)
    w_i = xs @ sd["indexer.weights_proj.weight"].T * cfg.index_n_heads**-0.5
    gap = boundary_gap(ref.indexer_scores(q_i, w_i, k_i), cfg.index_topk)
    if gap < 1e-4:
        return gap
    d = OUT / model_type
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(hf_cfg.to_dict() | {"model_type": model_type}, indent=1, default=str))
    write_safetensors(d / "model.safetensors", tensors)
    np.savez_compressed(d / "io.npz", x=x[0].numpy(), out=out[0].numpy(), topk=topk[0].numpy(), seed=seed)
    return gap


def moe_tiny(model_type: str) -> DSAConfig:
    cfg = DSAConfig.tiny(model_type).replace(index_n_heads=8, first_k_dense_replace=1)
    if model_type == "glm_moe_dsa":
        return cfg.replace(num_hidden_layers=4, indexer_types=("full", "shared", "full", "shared"))
    return cfg.replace(num_hidden_layers=3)  # 8 experts in 4 groups of 2, 2 groups kept, 2 experts per token


def per_expert(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers' fused expert tensors (`experts.gate_up_proj [E, 2I, d]`, `experts.down_proj`) split
    into the released checkpoints' per-expert names."""
    out = {}
    for k, v in state.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            p, inter = k.removesuffix("gate_up_proj"), v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{p}{e}.gate_proj.weight"], out[f"{p}{e}.up_proj.weight"] = v[e, :inter], v[e, inter:]
        elif k.endswith("mlp.experts.down_proj"):
            p = k.removesuffix("down_proj")
            for e in range(v.shape[0]):
                out[f"{p}{e}.down_proj.weight"] = v[e]
        else:
            out[k] = v
    return out


def quant_tiny(model_type: str) -> DSAConfig:
    return moe_tiny(model_type).replace(hidden_size=192, intermediate_size=320)


def is_fp8_weight(name: str, v: np.ndarray) -> bool:
    """Which tensors DeepSeek's FP8 checkpoints store as FP8: the 2-D linear weights, less these."""
    keep = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "indexer.weights_proj")
    return v.ndim == 2 and name.endswith("weight") and not any(k in name for k in keep)


def stored(state: dict[str, np.ndarray], fmt: str | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the checkpoint's tensors in format `fmt`, their float32 values as the model means them)."""
    if fmt is None:
        return state, state
    out, values = {}, {}
    for k, v in state.items():
        if k.endswith("e_score_correction_bias"):
            out[k], values[k] = v, v
        elif fmt == "fp8" and is_fp8_weight(k, v):
            codes, scale = quantize_fp8_blocks(v)
            out[k], out[k.removesuffix("weight") + "weight_scale_inv"] = codes, scale
            values[k] = dequantize_fp8_blocks(codes, scale)
        else:
            out[k] = v.astype(ml_dtypes.bfloat16)
            values[k] = out[k].astype(np.float32)
    return out, values


def randomize(model: torch.nn.Module) -> None:
    """Every weight random (norms near 1), and a random `e_score_correction_bias` where there is one."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p)
                if "norm" in name and name.endswith("weight")
                else 0.1 * torch.randn_like(p)
            )
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))


def load_values(model: torch.nn.Module, values: dict[str, np.ndarray]) -> None:
    """Copy the checkpoint's float32 values (per-expert names) into transformers' fused parameters."""
    with torch.no_grad():
        fused = model.state_dict()
        for k in fused:
            if k.endswith("mlp.experts.gate_up_proj"):
                p = k.removesuffix("gate_up_proj")
                E = fused[k].shape[0]
                gu = [np.concatenate([values[f"{p}{e}.{n}_proj.weight"] for n in ("gate", "up")]) for e in range(E)]
                fused[k].copy_(torch.from_numpy(np.stack(gu)))
            elif k.endswith("mlp.experts.down_proj"):
                p = k.removesuffix("down_proj")
                E = fused[k].shape[0]
                fused[k].copy_(torch.from_numpy(np.stack([values[f"{p}{e}.down_proj.weight"] for e in range(E)])))
            elif k in values:
                fused[k].copy_(torch.from_numpy(np.ascontiguousarray(values[k])))


def per_layer(model: torch.nn.Module, cfg: DSAConfig, prompt: torch.Tensor) -> dict[str, np.ndarray]:
    """The prompt's logits `[T, vocab]`, each decoder layer's output `[L, T, hidden]` and each layer's
    top-k selection `[L, T, K]` int32 (a "shared" layer's is the previous full layer's; in rows `t < K`
    the entries beyond position t are arbitrary masked positions), from forward hooks."""
    outs: list[torch.Tensor] = []
    sel: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o)))
        if getattr(layer.self_attn, "indexer", None) is not None:
            hooks.append(layer.self_attn.indexer.register_forward_hook(lambda m, a, o, i=i: sel.__setitem__(i, o)))
    with torch.no_grad():
        logits = model(prompt, use_cache=False).logits[0]
    for h in hooks:
        h.remove()
    topk = []
    for i in range(cfg.num_hidden_layers):
        topk.append(sel[i][0] if i in sel else topk[-1])
    return {
        "logits": logits.numpy(),
        "layer_out": torch.stack(outs)[:, 0].numpy(),
        "topk": torch.stack(topk).numpy().astype(np.int32),
    }


def generate_lm(name: str, model_type: str, cfg: DSAConfig, seed: int, fmt: str | None = None) -> bool:
    """A tiny `DeepseekV32ForCausalLM` / `GlmMoeDsaForCausalLM` of config `cfg`, written to `OUT/name` with
    its checkpoint stored in `fmt` (None: float32, "bf16", "fp8"): greedy generation of 12 tokens after a
    30-token prompt (longer than index_topk = 16), plus `per_layer`'s logits, layer outputs and top-k sets
    of the prompt. Kept only if generation with and without the KV cache agree and every step's top logit
    leads the runner-up by a margin (no tie decides a token)."""
    hf = cfg.to_hf_config()
    hf.pop("model_type")
    hf_cfg = MODELS[model_type][0](**hf)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LM_CLASSES[model_type](hf_cfg).float().eval()
    randomize(model)
    # The weights as the checkpoint stores them (bf16 / FP8), loaded back as their float32 values.
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    files, values = stored(per_expert(state), fmt)
    load_values(model, values)
    prompt = torch.randint(0, cfg.vocab_size, (1, 30))
    recorded = per_layer(model, cfg, prompt)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, output_scores=True,
                                return_dict_in_generate=True)  # fmt: skip
        uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    new = cached.sequences[0, 30:]
    if not torch.equal(new, uncached[0, 30:]):
        return False
    margins = [float((s[0].topk(2).values[0] - s[0].topk(2).values[1]) / s[0].abs().max()) for s in cached.scores]
    if min(margins) < 1e-3:
        return False
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    extra: dict = {"model_type": model_type}
    if fmt == "fp8":
        extra["quantization_config"] = {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]
        }  # fmt: skip
    (d / "config.json").write_text(json.dumps(hf_cfg.to_dict() | extra, indent=1, default=str))
    write_safetensors(d / "model.safetensors", files)
    np.savez_compressed(d / "io.npz", prompt=prompt[0].numpy(), generated=new.numpy(), seed=seed, **recorded)
    print(f"{d.name}: seed {seed}, smallest top-logit margin {min(margins):.2e}")
    return True


def lm_goldens(which: str) -> list[tuple[str, str, DSAConfig, str | None]]:
    """(directory, model type, config, storage format) of the language-model goldens of `which`."""
    if which == "dense":
        return [("deepseek_v32_lm", "deepseek_v32", DSAConfig.tiny("deepseek_v32").replace(index_n_heads=8), None)]
    if which == "moe":
        return [(f"{m}_moe_lm", m, moe_tiny(m), None) for m in LM_CLASSES]
    return [(f"{m}_moe_lm_{f}", m, quant_tiny(m), f) for m in LM_CLASSES for f in ("bf16", "fp8")]


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "dense"
    if which not in ("dense", "moe", "quant"):
        raise SystemExit(f"usage: make_golden.py [dense|moe|quant], got {which!r}")
    for name, model_type, cfg, fmt in lm_goldens(which):
        if not any(generate_lm(name, model_type, cfg, seed, fmt) for seed in range(20)):
            raise SystemExit(f"{name}: no seed whose greedy generation is free of ties")
    if which != "dense":
        return
    for model_type in MODELS:
        for seed in range(100):
            gap = generate(model_type, seed)
            if gap >= 1e-4:
                print(f"{model_type}: seed {seed}, smallest top-k boundary gap {gap:.2e}")
                break
        else:
            raise SystemExit(f"{model_type}: no seed without near-ties")


if __name__ == "__main__":
    main()

"""`dsa-hybrid oracle`: one DSA attention step at DeepSeek-V3.2 widths, computed by `reference`.

Builds a synthetic sequence whose tokens belong to a few "topics" (so that relevant keys exist and
the indexer has something to find), then for a handful of query tokens at the end of the sequence:
lightning-indexer scores (exact and FP8), top-k selection, sparse MLA attention, and dense causal MLA
for comparison. Prints what it computed and how long each stage took.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from dsa_hybrid import reference
from dsa_hybrid.models.config import DSAConfig


@dataclass(frozen=True)
class DemoResult:
    """What `run_oracle_demo` computed (floats are summaries over the query tokens)."""

    seq_len: int
    query_tokens: int
    topk: int
    fp8_recall: float
    attention_mass_kept: float
    max_rel_err_sparse_vs_dense: float
    times_s: dict[str, float]


def _topic_sequence(rng: np.random.Generator, n: int, width: int, topics: int) -> tuple[np.ndarray, np.ndarray]:
    centers = rng.standard_normal((topics, width))
    topic_of = rng.integers(0, topics, size=n)
    return centers[topic_of] + 0.8 * rng.standard_normal((n, width)), topic_of


def run_oracle_demo(
    cfg: DSAConfig | None = None,
    seq_len: int = 6144,
    query_tokens: int = 4,
    seed: int = 0,
    echo: bool = True,
) -> DemoResult:
    """Run one decode-like DSA step of `query_tokens` tokens at the end of a `seq_len` sequence."""
    cfg = cfg or DSAConfig.deepseek_v32()
    say = print if echo else (lambda *a, **k: None)
    rng = np.random.default_rng(seed)
    times: dict[str, float] = {}
    width = 256  # a small stand-in for d_model: the projections below map it to the real widths
    x, _ = _topic_sequence(rng, seq_len, width, topics=16)
    positions = np.arange(seq_len - query_tokens, seq_len)

    H, D, h = cfg.index_n_heads, cfg.index_head_dim, cfg.num_attention_heads
    r, d_rope, K = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_topk
    freqs = cfg.rope_freqs

    t0 = time.perf_counter()
    # Indexer keys and queries (dsa.md §4), RoPE on the first d_rope dims with the indexer's pairing.
    # The indexer and the attention both look at the same hidden states, so tokens that share the
    # query's topic score high under both: the situation a trained indexer is trained to reach (§7).
    w_k = rng.standard_normal((width, D)) / np.sqrt(width)
    k_idx = reference.layer_norm(x @ w_k)
    q_idx = k_idx[positions][:, None, :] * np.abs(rng.standard_normal((1, H, 1)))
    q_idx = q_idx + 0.5 * rng.standard_normal((query_tokens, H, D))
    # RoPE on the first d_rope dims of indexer queries and keys, with the indexer's pairing (§4).
    k_idx[:, :d_rope] = reference.apply_rope(k_idx[:, :d_rope], np.arange(seq_len), freqs, cfg.indexer_rope_pairing)
    q_idx[..., :d_rope] = reference.apply_rope(q_idx[..., :d_rope], positions[:, None], freqs, cfg.indexer_rope_pairing)
    w_heads = np.abs(rng.standard_normal((query_tokens, H))) * cfg.indexer_weight_scale
    # MLA latent rows [c_kv | k_pe] and absorbed queries [q_nope·W_UK | q_pe] (§3).
    w_c = rng.standard_normal((width, r)) / np.sqrt(width)
    w_pe = rng.standard_normal((width, d_rope)) / np.sqrt(width)
    c_kv = reference.rms_norm(x @ w_c, eps=cfg.rms_norm_eps)
    k_pe = reference.apply_rope(x @ w_pe, np.arange(seq_len), freqs, cfg.mla_rope_pairing)
    kv = np.concatenate([c_kv, k_pe], axis=1)
    q_lat = 0.2 * c_kv[positions][:, None, :] + 0.2 * rng.standard_normal((query_tokens, h, r))
    q_pe = 0.2 * rng.standard_normal((query_tokens, h, d_rope))
    q_abs = np.concatenate([q_lat, q_pe], axis=-1)
    times["build inputs"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    exact = reference.indexer_scores(q_idx, w_heads, k_idx)
    times["indexer (exact)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    k8, k_scales = reference.quantize_indexer_keys(k_idx)
    fp8 = reference.indexer_scores_fp8(q_idx, w_heads, k8, k_scales)
    times["indexer (FP8)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sel = reference.select_topk(fp8, positions, K)
    sel_exact = reference.select_topk(exact, positions, K)
    times["top-k"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    out, lse = reference.sparse_mla(q_abs, kv, sel, cfg.softmax_scale, d_v=r)
    times["sparse MLA"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dense_out, dense_lse = reference.dense_mla(q_abs, kv, positions, cfg.softmax_scale, d_v=r)
    times["dense MLA"] = time.perf_counter() - t0

    recall = float(np.mean([np.isin(sel[t], sel_exact[t]).mean() for t in range(query_tokens)]))
    # exp(lse_sparse - lse_dense) = the share of the dense softmax mass that the selected set holds.
    mass = float(np.exp(lse - dense_lse).mean())
    rel = np.linalg.norm(out - dense_out, axis=-1) / np.linalg.norm(dense_out, axis=-1)
    result = DemoResult(
        seq_len=seq_len,
        query_tokens=query_tokens,
        topk=K,
        fp8_recall=recall,
        attention_mass_kept=mass,
        max_rel_err_sparse_vs_dense=float(rel.max()),
        times_s=times,
    )

    say(f"dsa_hybrid oracle demo — {cfg.model_type} widths, float64 numpy reference")
    say(
        f"  sequence {seq_len} tokens, {query_tokens} query tokens at positions {positions[0]}..{positions[-1]}, "
        f"index_topk {K}"
    )
    say(f"  indexer: {H} heads × {D} dims, RoPE pairing '{cfg.indexer_rope_pairing}'; MLA: {h} heads × {r + d_rope}")
    say(f"  softmax scale {cfg.softmax_scale:.7f} (YaRN m² folded in)")
    say("")
    say(f"  selected per token: {np.count_nonzero(sel[0] >= 0)} of {positions[0] + 1} visible keys")
    say(f"  FP8 indexer vs exact indexer: top-k recall {recall:.4f}")
    say(f"  attention mass of dense MLA kept by the selected set: {mass:.4f}")
    say(f"  sparse vs dense MLA output: max relative difference {rel.max():.4f}")
    say(f"  lse (head 0): sparse {lse[:, 0].round(4).tolist()} dense {dense_lse[:, 0].round(4).tolist()}")
    say("")
    say("  cache bytes per token: indexer keys 132 (FP8 + f32 scale), MLA latent 656 (FP8) / 1152 (bf16)")
    idx_bytes, mla_bytes = 132 * seq_len, 656 * min(K, seq_len)
    say(f"  bytes read per query token: indexer {idx_bytes / 1e6:.2f} MB, sparse MLA {mla_bytes / 1e6:.2f} MB")
    say("")
    say("  stage times (float64 numpy, not a benchmark):")
    for name, s in times.items():
        say(f"    {name:<16} {s * 1e3:8.1f} ms")
    return result

"""The host placement's attention in the Rust core (`attend_host`, `forward_host`'s default on a float32
latent cache): the same outputs as the device's XLA attention and the float64 oracle, the cache read in
place (no copy), and named errors where it cannot run."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from dsa_hybrid import DSAConfig, IndexerKeyCache
from dsa_hybrid import reference as ref
from dsa_hybrid.layers import dsa_attention as layer_mod
from dsa_hybrid.layers.dsa_attention import DSACaches, DSAParams, dsa_attention_host
from dsa_hybrid.models.causal_lm import ModelParams, create_caches, forward_host

S = 16


def _layer_run(cfg, p, x, pages, chunks, host_attention, latent_kind="f32"):
    caches = DSACaches.create(cfg, len(pages) + 3, S, latent_kind=latent_kind)
    host = IndexerKeyCache(num_blocks=len(pages) + 3, block_size=S, head_dim=cfg.index_head_dim)
    outs, tops, start = [], [], 0
    for n in chunks:
        pos = np.arange(start, start + n, dtype=np.int32)
        out, caches, topk = dsa_attention_host(
            p, cfg, jnp.asarray(x[start : start + n], jnp.float32), jnp.asarray(pos),
            jnp.asarray(pages[pos // S] * S + pos % S), jnp.asarray(np.tile(pages, (n, 1))), caches, host,
            backend="xla", threads=2, host_attention=host_attention,
        )  # fmt: skip
        outs.append(np.asarray(out))
        tops.append(topk)
        start += n
    return np.concatenate(outs), np.concatenate(tops), caches


def test_layer_attends_on_the_host_like_the_device_and_the_oracle() -> None:
    """Prefill, a decode row and a chunk past `index_topk` (so rows both select everything and select a
    strict subset): the Rust kernel's output equals the XLA path's and, through the oracle's sparse MLA
    over the cached latent rows, the float64 definition."""
    cfg = DSAConfig.tiny()
    p = DSAParams.random(cfg, seed=3)
    L = 3 * cfg.index_topk
    x = np.random.default_rng(4).standard_normal((L, cfg.hidden_size))
    pages = np.random.default_rng(5).permutation(-(-L // S) + 3)[: -(-L // S)].astype(np.int32)
    chunks = (L // 2, 1, L - L // 2 - 1)
    host_out, host_topk, caches = _layer_run(cfg, p, x, pages, chunks, True)
    dev_out, dev_topk, _ = _layer_run(cfg, p, x, pages, chunks, False)
    np.testing.assert_array_equal(host_topk, dev_topk)
    assert (host_topk < 0).any() and (host_topk >= 0).all(axis=1).any()  # both kinds of rows occur
    np.testing.assert_allclose(host_out, dev_out, rtol=2e-5, atol=2e-6)
    # The oracle over the cached rows: attention of the absorbed queries at the selected slots, then the
    # output projection, in float64.
    pos = np.arange(L)
    proj = layer_mod.project_jit(p, cfg, jnp.asarray(x, jnp.float32), jnp.asarray(pos, jnp.int32))
    kv = np.asarray(caches.latent.data, np.float64).reshape(caches.latent.num_slots, -1)
    sel = layer_mod.selected_slots(host_topk, np.tile(pages, (L, 1)), S)
    o_lat, _ = ref.sparse_mla(np.asarray(proj.q_abs, np.float64), kv, sel, cfg.softmax_scale, cfg.kv_lora_rank)
    want = np.asarray(layer_mod.output_projection_jit(p, cfg, jnp.asarray(o_lat, jnp.float32)))
    np.testing.assert_allclose(host_out, want, rtol=1e-4, atol=1e-5)


def test_selected_slots_maps_positions_through_the_tables() -> None:
    tables = np.array([[3, 0, -1], [1, 2, 4]], np.int32)
    topk = np.array([[0, 17, 33, -1], [5, 20, 47, 48]], np.int32)
    got = layer_mod.selected_slots(topk, tables, S)
    # row 0: page 3 → slot 48; page 0 → 1; position 33 is on a −1 page; −1 stays −1.
    # row 1: page 1 → 21; page 2 → 36; page 4 → 79; position 48 is past the table.
    np.testing.assert_array_equal(got, [[48, 1, -1, -1], [21, 36, 79, -1]])


def test_model_host_placement_matches_xla_attention_and_reads_the_cache_in_place() -> None:
    """`forward_host` over two pipelined micro-batches of two sequences (padding rows included): logits
    with the Rust kernel equal those with XLA's attention; the latent caches are updated in place (the
    kernel's view of a cache is dropped before the next write donates it, so XLA never copies it)."""
    cfg = DSAConfig.tiny()
    params = ModelParams.random(cfg, seed=0)
    n_pages, L = 6, 40
    rng = np.random.default_rng(6)
    seqs = [rng.integers(0, cfg.vocab_size, L) for _ in range(2)]
    tables = np.array([[4, 0, 2], [1, 5, 3]], np.int32)

    def run(host_attention: bool):
        caches = create_caches(cfg, n_pages, S, latent_kind="f32")
        hosts = tuple(IndexerKeyCache(n_pages, S, cfg.index_head_dim) for _ in range(cfg.num_hidden_layers))
        outs, ptrs = [], []
        for lo, hi in ((0, 21), (21, 22), (22, L)):  # a prefill chunk, one decode row, the rest (odd sizes)
            n = hi - lo
            pos = np.tile(np.arange(lo, hi, dtype=np.int32), 2)
            seq = np.repeat(np.arange(2), n)
            slots = tables[seq, pos // S] * S + pos % S
            logits, caches = forward_host(
                params, cfg, np.concatenate([s[lo:hi] for s in seqs]), pos, slots, tables[seq], caches, hosts, seq,
                backend="xla", threads=2, micro_batches=2, host_attention=host_attention,
            )  # fmt: skip
            outs.append(np.asarray(logits))
            ptrs.append([c.latent.data.unsafe_buffer_pointer() for c in caches])
        return outs, ptrs

    host_logits, host_ptrs = run(True)
    dev_logits, _ = run(False)
    for a, b in zip(host_logits, dev_logits, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert host_ptrs[0] == host_ptrs[1] == host_ptrs[2]  # written in place at every step


def test_host_attention_needs_a_float32_cache_on_the_cpu() -> None:
    cfg = DSAConfig.tiny()
    p = DSAParams.random(cfg, seed=3)
    x = np.random.default_rng(4).standard_normal((8, cfg.hidden_size))
    pages = np.arange(2, dtype=np.int32)
    bf16 = DSACaches.create(cfg, 4, S, latent_kind="bf16").latent
    assert not layer_mod.host_attention_supported(bf16)
    assert layer_mod.host_attention_supported(DSACaches.create(cfg, 4, S, latent_kind="f32").latent)
    assert not layer_mod.use_host_attention(bf16, "xla", None)  # "auto" falls back to the device
    with pytest.raises(ValueError, match="host_attention"):
        _layer_run(cfg, p, x, pages, (8,), True, latent_kind="bf16")
    # Falling back works on the same cache kind.
    out, _, _ = _layer_run(cfg, p, x, pages, (8,), None, latent_kind="bf16")
    assert np.isfinite(out).all()

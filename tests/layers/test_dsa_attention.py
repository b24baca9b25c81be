"""`dsa_attention`: the JAX DSA layer against a numpy composition of `reference` functions (dsa.md §3–§5), for
prefill, chunked prefill and token-by-token decode, both indexer precisions and both model types."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsa_hybrid import DSAConfig
from dsa_hybrid import reference as ref
from dsa_hybrid.layers.dsa_attention import DSACaches, DSAParams, dsa_attention

PAGE = 8


def reference_layer(p: DSAParams, cfg: DSAConfig, x: np.ndarray, indexer: str):
    """The whole sequence `x` `[L, hidden]` at positions 0..L-1, float64. Returns `(out, topk)`."""
    P = {k: np.asarray(v, np.float64) for k, v in vars(p).items()}
    L = x.shape[0]
    pos = np.arange(L)
    h, nope, rope, r_kv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    c_q = ref.rms_norm(x @ P["q_a"].T, P["q_a_norm"])
    q = (c_q @ P["q_b"].T).reshape(L, h, nope + rope)
    ckv = x @ P["kv_a"].T
    c_kv = ref.rms_norm(ckv[:, :r_kv], P["kv_a_norm"])
    k_pe = ref.apply_rope(ckv[:, r_kv:], pos, cfg.rope_freqs, cfg.mla_rope_pairing)
    q_pe = ref.apply_rope(q[..., nope:], pos[:, None], cfg.rope_freqs, cfg.mla_rope_pairing)
    w_uk, w_uv = ref.split_kv_b(P["kv_b"], h, nope, cfg.v_head_dim)
    q_abs = ref.absorb_query(q[..., :nope], q_pe, w_uk)
    kv = np.concatenate([c_kv, k_pe], axis=1).astype(ml_dtypes.bfloat16).astype(np.float64)  # as cached
    H_I, D_I = cfg.index_n_heads, cfg.index_head_dim
    q_i = (c_q @ P["idx_wq_b"].T).reshape(L, H_I, D_I)
    k_i = ref.layer_norm(x @ P["idx_wk"].T, P["idx_k_norm_w"], P["idx_k_norm_b"])
    pr = cfg.indexer_rope_pairing
    q_i[..., :rope] = ref.apply_rope(q_i[..., :rope], pos[:, None], cfg.rope_freqs, pr)
    k_i[:, :rope] = ref.apply_rope(k_i[:, :rope], pos, cfg.rope_freqs, pr)
    w_i = x @ P["idx_weights"].T * H_I**-0.5
    if indexer == "exact":
        scores = ref.indexer_scores(q_i, w_i, k_i)
    else:
        codes, scales = ref.quantize_indexer_keys(k_i)
        scores = ref.indexer_scores_fp8(q_i, w_i, codes, scales)
    topk = ref.select_topk(scores, pos, cfg.index_topk)
    o_lat, _ = ref.sparse_mla(q_abs, kv, topk, cfg.softmax_scale, r_kv)
    out = ref.mla_output(o_lat, w_uv).reshape(L, -1) @ P["o"].T
    return out, topk, scores


@functools.partial(jax.jit, static_argnames=("cfg",))
def _layer(params, cfg, x, positions, slots, tables, caches):
    return dsa_attention(params, cfg, x, positions, slots, tables, caches, backend="xla")


def run_in_chunks(p, cfg, x, chunks, indexer):
    """Feed `x` through the layer in consecutive chunks of the given sizes; one sequence whose pages are
    scattered over the pool. Returns `(out, topk)` for all positions."""
    L = x.shape[0]
    n_pages = -(-L // PAGE)
    pages = np.random.default_rng(L).permutation(n_pages + 3)[:n_pages].astype(np.int32)
    caches = DSACaches.create(cfg, n_pages + 3, PAGE, indexer=indexer)
    outs, tops, start = [], [], 0
    for n in chunks:
        pos = np.arange(start, start + n, dtype=np.int32)
        slots = pages[pos // PAGE] * PAGE + pos % PAGE
        tables = np.tile(pages, (n, 1))
        out, caches, topk = _layer(
            p,
            cfg,
            jnp.asarray(x[start : start + n], jnp.float32),
            jnp.asarray(pos),
            jnp.asarray(slots),
            jnp.asarray(tables),
            caches,
        )
        outs.append(np.asarray(out))
        tops.append(np.asarray(topk))
        start += n
    return np.concatenate(outs), np.concatenate(tops)


CASES = [("deepseek_v32", "exact"), ("deepseek_v32", "fp8"), ("glm_moe_dsa", "exact")]


@pytest.mark.parametrize(("model", "indexer"), CASES)
@pytest.mark.parametrize("chunks", [(40,), (7, 13, 1, 19), (1,) * 40], ids=["prefill", "chunked", "decode"])
def test_layer_matches_the_reference_composition(model: str, indexer: str, chunks: tuple[int, ...]) -> None:
    cfg = DSAConfig.tiny(model)  # index_topk 16 < 40 positions: selection really drops tokens
    p = DSAParams.random(cfg, seed=1)
    x = np.random.default_rng(2).standard_normal((40, cfg.hidden_size))
    want_out, want_topk, scores = reference_layer(p, cfg, x, indexer)
    out, topk = run_in_chunks(p, cfg, x, chunks, indexer)
    # Same selections (these seeds have no near-ties at the boundary), then the same outputs.
    np.testing.assert_array_equal(topk, want_topk)
    # bf16 latent cache: a value on a rounding boundary may round the other way from float32 than from
    # float64 (one bf16 ulp, 2^-8 relative), hence a bf16-level tolerance.
    np.testing.assert_allclose(out, want_out, rtol=4e-3, atol=2e-3 * np.abs(want_out).max())
    assert (topk[16:] >= 0).all() and (topk[:15] == -1).any()


def test_glm_shared_layers_reuse_the_previous_selection() -> None:
    cfg = DSAConfig.tiny("glm_moe_dsa")
    p = DSAParams.random(cfg, seed=3)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((24, cfg.hidden_size)), jnp.float32)
    pos = jnp.arange(24, dtype=jnp.int32)
    tables = jnp.tile(jnp.arange(3, dtype=jnp.int32), (24, 1))
    caches = DSACaches.create(cfg, 3, PAGE)
    _, _, topk = dsa_attention(p, cfg, x, pos, pos, tables, caches, backend="xla")
    forced = jnp.where(jnp.arange(16)[None, :] < 3, jnp.arange(16)[None, :], -1).repeat(24, 0).astype(jnp.int32)
    out_shared, _, topk_shared = dsa_attention(p, cfg, x, pos, pos, tables, caches, shared_topk=forced, backend="xla")
    np.testing.assert_array_equal(np.asarray(topk_shared), np.asarray(forced))
    # Attending to positions 0..2 only: row 2 sees exactly the same as with its own (full) selection.
    out_own, _, _ = dsa_attention(p, cfg, x, pos, pos, tables, caches, backend="xla")
    np.testing.assert_allclose(np.asarray(out_shared)[2], np.asarray(out_own)[2], rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(out_shared)[20], np.asarray(out_own)[20])


def test_checkpoint_tensors_round_trip_and_errors() -> None:
    cfg = DSAConfig.tiny()
    p = DSAParams.random(cfg, seed=5)
    sd = p.state_dict(3)
    assert "model.layers.3.self_attn.indexer.k_norm.bias" in sd
    q = DSAParams.from_state_dict(sd, cfg, 3)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    missing = dict(sd)
    del missing["model.layers.3.self_attn.kv_b_proj.weight"]
    with pytest.raises(KeyError, match="kv_b_proj.weight: missing"):
        DSAParams.from_state_dict(missing, cfg, 3)
    bad = dict(sd)
    bad["model.layers.3.self_attn.o_proj.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"o_proj.weight: expected shape \[64, 64\]"):
        DSAParams.from_state_dict(bad, cfg, 3)


@pytest.mark.parametrize("chunks", [(40,), (9, 1, 30), (1,) * 40], ids=["prefill", "chunked", "decode"])
def test_host_placement_selects_and_attends_like_the_device(chunks: tuple[int, ...]) -> None:
    """The Rust host indexer (FP8 keys, SIMD select) against the device indexer on the same tokens."""
    from dsa_hybrid import IndexerKeyCache
    from dsa_hybrid.layers.dsa_attention import dsa_attention_host

    cfg = DSAConfig.tiny()
    p = DSAParams.random(cfg, seed=1)
    x = np.random.default_rng(2).standard_normal((40, cfg.hidden_size))
    dev_out, dev_topk = run_in_chunks(p, cfg, x, chunks, "fp8")
    _, want_topk, scores = reference_layer(p, cfg, x, "fp8")
    n_pages = 5
    pages = np.random.default_rng(40).permutation(n_pages + 3)[:n_pages].astype(np.int32)  # as run_in_chunks
    caches = DSACaches.create(cfg, n_pages + 3, PAGE)
    host = IndexerKeyCache(num_blocks=3, block_size=16, head_dim=cfg.index_head_dim)  # its own paging
    host.add_sequence(7)
    outs, tops, start = [], [], 0
    for n in chunks:
        pos = np.arange(start, start + n, dtype=np.int32)
        out, caches, topk = dsa_attention_host(
            p, cfg, jnp.asarray(x[start : start + n], jnp.float32), jnp.asarray(pos),
            jnp.asarray(pages[pos // PAGE] * PAGE + pos % PAGE), jnp.asarray(np.tile(pages, (n, 1))), caches,
            host, np.full(n, 7), backend="xla", threads=1,
        )  # fmt: skip
        outs.append(np.asarray(out))
        tops.append(topk)
        start += n
    host_topk = np.concatenate(tops)
    assert host.length(7) == 40
    # One quantizer fills both indexer caches: the device pages hold the host cache's bytes.
    every = np.arange(40)
    slots = pages[every // PAGE] * PAGE + every % PAGE
    host_codes, host_scales = host.gather(7, every)
    np.testing.assert_array_equal(
        np.asarray(caches.index.codes).view(np.uint8).reshape(-1, cfg.index_head_dim)[slots], host_codes
    )
    np.testing.assert_array_equal(np.asarray(caches.index.scales).reshape(-1)[slots], host_scales)
    np.testing.assert_array_equal(host_topk, want_topk)  # these seeds have no near-ties
    np.testing.assert_array_equal(host_topk, dev_topk)
    np.testing.assert_allclose(np.concatenate(outs), dev_out, rtol=1e-5, atol=1e-6)


def test_host_placement_through_the_callers_block_tables() -> None:
    """`dsa_attention_host` without `seq_ids`: the host cache is paged like the device caches (the same
    block tables and slots, pages of 16 scattered over the pool) and holds no sequence; selection and
    output are the sequence-addressed path's, and both indexer caches hold the same bytes at every slot."""
    from dsa_hybrid import IndexerKeyCache
    from dsa_hybrid.layers.dsa_attention import dsa_attention_host

    cfg = DSAConfig.tiny()
    p = DSAParams.random(cfg, seed=1)
    x = np.random.default_rng(2).standard_normal((40, cfg.hidden_size))
    dev_out, dev_topk = run_in_chunks(p, cfg, x, (9, 1, 30), "fp8")
    S, n_pages = 16, 3
    pages = np.random.default_rng(41).permutation(n_pages + 3)[:n_pages].astype(np.int32)
    caches = DSACaches.create(cfg, n_pages + 3, S)
    host = IndexerKeyCache(num_blocks=n_pages + 3, block_size=S, head_dim=cfg.index_head_dim)
    outs, tops, start = [], [], 0
    for n in (9, 1, 30):
        pos = np.arange(start, start + n, dtype=np.int32)
        out, caches, topk = dsa_attention_host(
            p, cfg, jnp.asarray(x[start : start + n], jnp.float32), jnp.asarray(pos),
            jnp.asarray(pages[pos // S] * S + pos % S), jnp.asarray(np.tile(pages, (n, 1))), caches,
            host, backend="xla", threads=1,
        )  # fmt: skip
        outs.append(np.asarray(out))
        tops.append(topk)
        start += n
    assert host.sequence_ids() == [] and host.num_free_blocks == n_pages + 3  # its own pool is unused
    every = np.arange(40)
    slots = pages[every // S] * S + every % S
    buf = np.asarray(host.pages())
    host_codes = buf[:, : S * cfg.index_head_dim].reshape(-1, S, cfg.index_head_dim)[slots // S, slots % S]
    host_scales = np.ascontiguousarray(buf[:, S * cfg.index_head_dim :]).view(np.float32).reshape(-1, S)
    host_scales = host_scales[slots // S, slots % S]
    np.testing.assert_array_equal(
        np.asarray(caches.index.codes).view(np.uint8).reshape(-1, cfg.index_head_dim)[slots], host_codes
    )
    np.testing.assert_array_equal(np.asarray(caches.index.scales).reshape(-1)[slots], host_scales)
    np.testing.assert_array_equal(np.concatenate(tops), dev_topk)
    np.testing.assert_allclose(np.concatenate(outs), dev_out, rtol=1e-5, atol=1e-6)


def test_bad_layer_inputs_get_named_errors() -> None:
    cfg = DSAConfig.tiny()
    p = DSAParams.random(cfg, seed=1)
    caches = DSACaches.create(cfg, 4, PAGE)
    x = jnp.zeros((3, cfg.hidden_size), jnp.float32)
    pos = jnp.arange(3, dtype=jnp.int32)
    tables = jnp.zeros((3, 4), jnp.int32)
    with pytest.raises(ValueError, match=rf"x: expected shape \['n', {cfg.hidden_size}\]"):
        dsa_attention(p, cfg, jnp.zeros((3, 5)), pos, pos, tables, caches)
    with pytest.raises(ValueError, match=r"slots: expected shape \[3\]"):
        dsa_attention(p, cfg, x, pos, pos[:2], tables, caches)
    with pytest.raises(TypeError, match="positions: expected integers"):
        dsa_attention(p, cfg, x, pos.astype(jnp.float32), pos, tables, caches)
    with pytest.raises(ValueError, match="block_tables"):
        dsa_attention(p, cfg, x, pos, pos, tables[0], caches)

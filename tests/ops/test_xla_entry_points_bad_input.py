"""The JAX entry points' bad-input catalogue: `sparse_mla`, `prefix_mla`, `LatentCache`, `IndexerPages`,
`ExactIndexerKeys`, `select_topk_device`, the layer (`dsa_attention`, `dsa_attention_host`,
`host_select_paged`, the jitted halves `project_jit` / `project_write_keys_jit` / `attend_jit`), the
model (`forward`, `generate_greedy`).

Each bad case states its exception type and a fragment of the message (which names the argument); after
every case the inputs are intact (no array deleted or changed, the host cache's bytes, sequences and
free blocks as before). Good cases check real properties: `sparse_mla` against the float64 oracle,
`prefix_mla` against `sparse_mla` over the same tokens, the device selection's visibility rule, the host
layer selecting what the device layer selects. Shapes are tiny (few compilations)."""

# ruff: noqa: E501 - one catalogue case per line

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_hybrid import DSAConfig, reference
from dsa_hybrid.host.cache import IndexerKeyCache
from dsa_hybrid.layers.dsa_attention import (
    DSACaches,
    DSAParams,
    attend_jit,
    dsa_attention,
    dsa_attention_host,
    host_select_paged,
    project_jit,
    project_write_keys_jit,
)
from dsa_hybrid.models.causal_lm import ModelParams, create_caches, forward, generate_greedy
from dsa_hybrid.ops.indexer import ExactIndexerKeys, IndexerPages, select_topk_device
from dsa_hybrid.ops.latent_cache import LatentCache
from dsa_hybrid.ops.sparse_mla import prefix_mla, sparse_mla

RNG = np.random.default_rng(0)
# ----- the ops' objects: a 4-page cache of 16 slots, latent 32 + rope 16 -------------------------------
C = LatentCache.create(4, 16, kind="f32", latent_dim=32, rope_dim=16)
C = C.write(jnp.arange(64, dtype=jnp.int32), jnp.asarray(RNG.normal(size=(64, 32)), jnp.float32),
            jnp.asarray(RNG.normal(size=(64, 16)), jnp.float32))  # fmt: skip
Q = jnp.asarray(RNG.normal(size=(2, 2, 48)), jnp.float32)
SLOTS = jnp.asarray([[0, 5, 17, -1], [3, 3, 40, 63]], jnp.int32)
BT = jnp.asarray([[0, 1], [2, 3]], jnp.int32)
LENS = jnp.asarray([5, 20], jnp.int32)
P = IndexerPages.create(4, 16, 32).write(
    jnp.arange(64, dtype=jnp.int32), jnp.asarray(RNG.normal(size=(64, 32)), jnp.float32)
)
E = ExactIndexerKeys.create(4, 16, 32).write(
    jnp.arange(64, dtype=jnp.int32), jnp.asarray(RNG.normal(size=(64, 32)), jnp.float32)
)
QI = jnp.asarray(RNG.normal(size=(2, 4, 32)), jnp.float32)
W = jnp.asarray(RNG.random(size=(2, 4)), jnp.float32)
POS = jnp.asarray([3, 20], jnp.int32)
# ----- the layer's and the model's: DSAConfig.tiny, 4 pages of 16 ----------------------------------------
CFG = DSAConfig.tiny()
LP = DSAParams.random(CFG, seed=1)
LC = DSACaches.create(CFG, 4, 16, latent_kind="f32", indexer="fp8")
X = jnp.asarray(RNG.normal(size=(3, CFG.hidden_size)), jnp.float32)
LPOS = jnp.asarray([0, 1, 2], jnp.int32)
LSLOTS = jnp.asarray([0, 1, 2], jnp.int32)
LBT = jnp.asarray([[0, 1]] * 3, jnp.int32)
HOST = IndexerKeyCache(4, 16, CFG.index_head_dim)
SEQ_HOST = IndexerKeyCache(4, 16, CFG.index_head_dim)
SEQ_HOST.add_sequence(0)
MP = ModelParams.random(CFG, seed=2)
MC = create_caches(CFG, 4, 16, latent_kind="f32", indexer="exact")
TOK = jnp.asarray([1, 2, 3], jnp.int32)

ARRAYS = {"C": C, "P": P, "E": E, "LC": LC, "MC": MC}
SAVED = {k: [np.array(a) for a in jax.tree_util.tree_leaves(v)] for k, v in ARRAYS.items()}


def host_state() -> tuple:
    return tuple(
        (h.pages().tobytes(), h.num_free_blocks, [(s, h.length(s)) for s in h.sequence_ids()]) for h in (HOST, SEQ_HOST)
    )


HOST_BEFORE = host_state()


def proj() -> Any:
    return project_jit(LP, CFG, X, LPOS)


# (id, call, exception, message fragment)
Case = tuple[str, Callable[[], Any], type[BaseException], str]
# fmt: off
CASES: list[Case] = [
    # sparse_mla
    ("sparse/q-list", lambda: sparse_mla(np.asarray(Q).tolist(), C, SLOTS, scale=0.1), TypeError, "q: expected an array"),
    ("sparse/q-f16", lambda: sparse_mla(Q.astype(jnp.float16), C, SLOTS, scale=0.1), TypeError, "q: expected float32"),
    ("sparse/q-int", lambda: sparse_mla(Q.astype(jnp.int32), C, SLOTS, scale=0.1), TypeError, "q:"),
    ("sparse/q-width", lambda: sparse_mla(Q[:, :, :40], C, SLOTS, scale=0.1), ValueError, "q: expected [T, h, 48]"),
    ("sparse/q-2d", lambda: sparse_mla(Q[0], C, SLOTS, scale=0.1), ValueError, "q:"),
    ("sparse/cache-none", lambda: sparse_mla(Q, None, SLOTS, scale=0.1), TypeError, "cache: expected a LatentCache"),
    ("sparse/cache-pages", lambda: sparse_mla(Q, P, SLOTS, scale=0.1), TypeError, "cache:"),
    ("sparse/slots-list", lambda: sparse_mla(Q, C, [[0]], scale=0.1), TypeError, "slots: expected an array"),
    ("sparse/slots-float", lambda: sparse_mla(Q, C, SLOTS.astype(float), scale=0.1), TypeError, "slots: expected integers"),
    ("sparse/slots-rows", lambda: sparse_mla(Q, C, SLOTS[:1], scale=0.1), ValueError, "slots: expected [2, K]"),
    ("sparse/slots-K0", lambda: sparse_mla(Q, C, SLOTS[:, :0], scale=0.1), ValueError, "K >= 1"),
    ("sparse/scale-nan", lambda: sparse_mla(Q, C, SLOTS, scale=float("nan")), ValueError, "scale: must be finite"),
    ("sparse/scale-zero", lambda: sparse_mla(Q, C, SLOTS, scale=0.0), ValueError, "scale:"),
    ("sparse/scale-neg", lambda: sparse_mla(Q, C, SLOTS, scale=-0.1), ValueError, "scale:"),
    ("sparse/scale-str", lambda: sparse_mla(Q, C, SLOTS, scale="0.1"), TypeError, "scale: expected a real number"),
    ("sparse/d_v-0", lambda: sparse_mla(Q, C, SLOTS, scale=0.1, d_v=0), ValueError, "d_v: must be in (0, 48]"),
    ("sparse/d_v-wide", lambda: sparse_mla(Q, C, SLOTS, scale=0.1, d_v=49), ValueError, "d_v:"),
    ("sparse/d_v-float", lambda: sparse_mla(Q, C, SLOTS, scale=0.1, d_v=8.0), TypeError, "d_v: expected an integer"),
    ("sparse/d_v-bool", lambda: sparse_mla(Q, C, SLOTS, scale=0.1, d_v=True), TypeError, "d_v:"),
    ("sparse/topk_length-float", lambda: sparse_mla(Q, C, SLOTS, scale=0.1, topk_length=jnp.ones(2)), ValueError, "topk_length"),
    ("sparse/topk_length-list", lambda: sparse_mla(Q, C, SLOTS, scale=0.1, topk_length=[1, 2]), TypeError, "topk_length"),
    ("sparse/backend", lambda: sparse_mla(Q, C, SLOTS, scale=0.1, backend="cuda"), ValueError, "backend:"),
    ("sparse/pallas-off-tpu", lambda: sparse_mla(Q, C, SLOTS, scale=0.1, backend="pallas_tpu"), RuntimeError, "needs a TPU target"),
    ("sparse/splits-0", lambda: sparse_mla(Q, C, SLOTS, scale=0.1, num_splits=0), ValueError, "num_splits"),
    ("sparse/splits-3", lambda: sparse_mla(Q, C, SLOTS, scale=0.1, num_splits=3), ValueError, "divide K = 4"),
    ("sparse/splits-float", lambda: sparse_mla(Q, C, SLOTS, scale=0.1, num_splits=2.0), TypeError, "num_splits"),
    # prefix_mla
    ("prefix/tables-float", lambda: prefix_mla(Q, C, BT.astype(float), LENS, scale=0.1), ValueError, "block_tables:"),
    ("prefix/tables-list", lambda: prefix_mla(Q, C, [[0, 1]], LENS, scale=0.1), TypeError, "block_tables: expected an array"),
    ("prefix/tables-rows", lambda: prefix_mla(Q, C, BT[:1], LENS, scale=0.1), ValueError, "block_tables:"),
    ("prefix/lengths-2d", lambda: prefix_mla(Q, C, BT, LENS[None], scale=0.1), ValueError, "lengths:"),
    ("prefix/lengths-float", lambda: prefix_mla(Q, C, BT, LENS.astype(float), scale=0.1), ValueError, "lengths:"),
    ("prefix/lengths-none", lambda: prefix_mla(Q, C, BT, None, scale=0.1), TypeError, "lengths: expected an array"),
    ("prefix/scale-inf", lambda: prefix_mla(Q, C, BT, LENS, scale=float("inf")), ValueError, "scale:"),
    ("prefix/q-width", lambda: prefix_mla(Q[:, :, :8], C, BT, LENS, scale=0.1), ValueError, "q:"),
    # LatentCache
    ("latent/create-0", lambda: LatentCache.create(0, 16), ValueError, "num_pages: must be >= 1"),
    ("latent/create-float", lambda: LatentCache.create(2.5, 16), TypeError, "num_pages: expected an integer"),
    ("latent/create-bool", lambda: LatentCache.create(True, 16), TypeError, "num_pages:"),
    ("latent/create-page-str", lambda: LatentCache.create(2, "16"), TypeError, "page_size:"),
    ("latent/create-huge", lambda: LatentCache.create(2**30, 2**10, latent_dim=512), MemoryError, "over the limit"),
    ("latent/create-kind", lambda: LatentCache.create(2, 16, kind="int8"), ValueError, "kind must be"),
    ("latent/create-fp8-width", lambda: LatentCache.create(2, 16, kind="fp8", latent_dim=100), ValueError, "latent_dim"),
    ("latent/create-rope-neg", lambda: LatentCache.create(2, 16, rope_dim=-1), ValueError, "rope_dim:"),
    ("latent/write-width", lambda: C.write(jnp.array([0, 1]), jnp.zeros((2, 31)), jnp.zeros((2, 16))), ValueError, "c_kv, k_pe:"),
    ("latent/write-rows", lambda: C.write(jnp.array([0, 1, 2]), jnp.zeros((2, 32)), jnp.zeros((2, 16))), ValueError, "c_kv, k_pe:"),
    ("latent/write-slots-float", lambda: C.write(jnp.array([0.0, 1.0]), jnp.zeros((2, 32)), jnp.zeros((2, 16))), TypeError, "slots:"),
    ("latent/write-slots-2d", lambda: C.write(jnp.zeros((1, 2), jnp.int32), jnp.zeros((2, 32)), jnp.zeros((2, 16))), TypeError, "slots:"),
    ("latent/write-ckv-int", lambda: C.write(jnp.array([0, 1]), jnp.zeros((2, 32), jnp.int32), jnp.zeros((2, 16))), TypeError, "c_kv, k_pe: expected floats"),
    ("latent/write-ckv-list", lambda: C.write(jnp.array([0, 1]), [[0.0] * 32] * 2, jnp.zeros((2, 16))), TypeError, "c_kv: expected an array"),
    ("latent/rows-float", lambda: C.rows(jnp.array([0.5])), TypeError, "slots: expected integers"),
    ("latent/from-flashmla-rows", lambda: LatentCache.from_flashmla_fp8(np.zeros((3, 656), np.uint8)), ValueError, "rows:"),
    ("latent/from-bf16-width", lambda: LatentCache.from_bf16_rows(np.zeros((64, 10), np.uint8)), ValueError, "rows:"),
    # IndexerPages / ExactIndexerKeys
    ("pages/create-0", lambda: IndexerPages.create(0, 16, 32), ValueError, "num_pages:"),
    ("pages/create-float", lambda: IndexerPages.create(2.5, 16, 32), TypeError, "num_pages:"),
    ("pages/create-head-0", lambda: IndexerPages.create(2, 16, 0), ValueError, "head_dim:"),
    ("pages/create-head-odd", lambda: IndexerPages.create(2, 16, 48), ValueError, "head_dim: expected a power-of-two head_dim"),
    ("pages/create-huge", lambda: IndexerPages.create(2**30, 2**10, 2**10), MemoryError, "over the limit"),
    ("pages/write-width", lambda: P.write(jnp.array([0, 1]), jnp.zeros((2, 31))), ValueError, "keys: expected shape"),
    ("pages/write-rows", lambda: P.write(jnp.array([0, 1, 2]), jnp.zeros((2, 32))), ValueError, "slots: expected shape [2]"),
    ("pages/write-slots-float", lambda: P.write(jnp.array([0.0, 1.0]), jnp.zeros((2, 32))), TypeError, "slots: expected integers"),
    ("pages/write-keys-int", lambda: P.write(jnp.array([0, 1]), jnp.zeros((2, 32), jnp.int32)), TypeError, "keys: expected floats"),
    ("pages/write-keys-list", lambda: P.write(jnp.array([0, 1]), [[0.0] * 32]), TypeError, "keys: expected an array"),
    ("pages/write-q-width", lambda: P.write_quantized(jnp.array([0, 1]), jnp.zeros((2, 31), jnp.uint8), jnp.ones(2)), ValueError, "codes:"),
    ("pages/write-q-scales", lambda: P.write_quantized(jnp.array([0, 1]), jnp.zeros((2, 32), jnp.uint8), jnp.ones(3)), ValueError, "scales: expected shape [2]"),
    ("pages/write-q-codes-int32", lambda: P.write_quantized(jnp.array([0, 1]), jnp.zeros((2, 32), jnp.int32), jnp.ones(2)), TypeError, "codes: expected floats"),
    ("pages/from-host", lambda: IndexerPages.from_host_pages(np.zeros((3, 7), np.uint8), 16, 32), ValueError, "pages:"),
    ("exact/create-0", lambda: ExactIndexerKeys.create(0, 16, 32), ValueError, "num_pages:"),
    ("exact/create-huge", lambda: ExactIndexerKeys.create(2**30, 2**10, 2**10), MemoryError, "over the limit"),
    ("exact/write-width", lambda: E.write(jnp.array([0, 1]), jnp.zeros((2, 31))), ValueError, "keys:"),
    ("exact/write-rows", lambda: E.write(jnp.array([0, 1, 2]), jnp.zeros((2, 32))), ValueError, "slots:"),
    # select_topk_device
    ("select/pages-none", lambda: select_topk_device(QI, W, None, BT, POS, 4), TypeError, "pages: expected IndexerPages"),
    ("select/q-list", lambda: select_topk_device(np.asarray(QI).tolist(), W, P, BT, POS, 4), TypeError, "q: expected an array"),
    ("select/q-width", lambda: select_topk_device(QI[:, :, :31], W, P, BT, POS, 4), ValueError, "q: expected shape"),
    ("select/weights-heads", lambda: select_topk_device(QI, W[:, :3], P, BT, POS, 4), ValueError, "weights:"),
    ("select/positions-float", lambda: select_topk_device(QI, W, P, BT, POS.astype(float), 4), TypeError, "positions:"),
    ("select/positions-rows", lambda: select_topk_device(QI, W, P, BT, POS[:1], 4), ValueError, "positions:"),
    ("select/tables-float", lambda: select_topk_device(QI, W, P, BT.astype(float), POS, 4), TypeError, "block_tables:"),
    ("select/tables-1d", lambda: select_topk_device(QI, W, P, BT[0], POS, 4), ValueError, "block_tables:"),
    ("select/k-0", lambda: select_topk_device(QI, W, P, BT, POS, 0), ValueError, "k: must be >= 1"),
    ("select/k-float", lambda: select_topk_device(QI, W, P, BT, POS, 2.5), TypeError, "k: expected an integer"),
    ("select/k-huge", lambda: select_topk_device(QI, W, P, BT, POS, 2**40), ValueError, "k: must be <= 2147483647"),
    ("select/key_chunk-0", lambda: select_topk_device(QI, W, P, BT, POS, 4, key_chunk=0), ValueError, "key_chunk:"),
    ("select/row_block-bool", lambda: select_topk_device(QI, W, P, BT, POS, 4, row_block=True), TypeError, "row_block:"),
    ("select/backend", lambda: select_topk_device(QI, W, P, BT, POS, 4, backend="cuda"), ValueError, "backend:"),
    # the layer
    ("layer/x-width", lambda: dsa_attention(LP, CFG, X[:, :8], LPOS, LSLOTS, LBT, LC), ValueError, "x: expected shape"),
    ("layer/x-list", lambda: dsa_attention(LP, CFG, np.asarray(X).tolist(), LPOS, LSLOTS, LBT, LC), TypeError, "x: expected an array"),
    ("layer/positions-float", lambda: dsa_attention(LP, CFG, X, LPOS.astype(float), LSLOTS, LBT, LC), TypeError, "positions:"),
    ("layer/positions-rows", lambda: dsa_attention(LP, CFG, X, LPOS[:2], LSLOTS, LBT, LC), ValueError, "positions:"),
    ("layer/slots-2d", lambda: dsa_attention(LP, CFG, X, LPOS, LSLOTS[None], LBT, LC), ValueError, "slots:"),
    ("layer/tables-1d", lambda: dsa_attention(LP, CFG, X, LPOS, LSLOTS, LBT[0], LC), ValueError, "block_tables:"),
    ("layer/tables-rows", lambda: dsa_attention(LP, CFG, X, LPOS, LSLOTS, LBT[:2], LC), ValueError, "block_tables:"),
    ("layer/no-indexer", lambda: dsa_attention(LP.without_indexer(), CFG, X, LPOS, LSLOTS, LBT, LC), ValueError, "shared_topk"),
    ("host/exact-index", lambda: dsa_attention_host(LP, CFG, X, LPOS, LSLOTS, LBT, MC[0], HOST), TypeError, "FP8 IndexerPages"),
    ("host/x-width", lambda: dsa_attention_host(LP, CFG, X[:, :8], LPOS, LSLOTS, LBT, LC, HOST), ValueError, "x:"),
    ("host/tables-block", lambda: dsa_attention_host(LP, CFG, X, LPOS, LSLOTS, LBT + 3, LC, HOST), IndexError, "block_tables: block 4"),
    ("host/tables-hole", lambda: dsa_attention_host(LP, CFG, X, LPOS, LSLOTS, -jnp.ones_like(LBT), LC, HOST), IndexError, "no block for its position"),
    ("host/positions-past", lambda: dsa_attention_host(LP, CFG, X, LPOS + 40, LSLOTS, LBT, LC, HOST), IndexError, "positions: 42 outside"),
    ("host/unknown-seq", lambda: dsa_attention_host(LP, CFG, X, LPOS, LSLOTS, LBT, LC, SEQ_HOST, np.array([0, 0, 7])), KeyError, "unknown sequence 7"),
    ("host/seq-rows", lambda: dsa_attention_host(LP, CFG, X, LPOS, LSLOTS, LBT, LC, SEQ_HOST, np.array([0, 0])), ValueError, "seq_ids:"),
    ("host/seq-float", lambda: dsa_attention_host(LP, CFG, X, LPOS, LSLOTS, LBT, LC, SEQ_HOST, np.zeros(3)), ValueError, "seq_ids:"),
    ("host-select/k-0", lambda: host_select_paged(HOST, np.asarray(LBT), np.asarray(LSLOTS), *project_write_keys_jit(LP, CFG, X, LPOS, LSLOTS, LC.index)[1:3], proj(), np.asarray(LPOS), 0), ValueError, "k:"),
    ("host-select/tables-float", lambda: host_select_paged(HOST, np.asarray(LBT, float), np.asarray(LSLOTS), *project_write_keys_jit(LP, CFG, X, LPOS, LSLOTS, LC.index)[1:3], proj(), np.asarray(LPOS), 4), ValueError, "block_tables:"),
    ("halves/project-x", lambda: project_jit(LP, CFG, X[:, :8], LPOS), ValueError, "x: expected shape"),
    ("halves/project-positions", lambda: project_jit(LP, CFG, X, LPOS.astype(float)), TypeError, "positions:"),
    ("halves/write-keys-slots", lambda: project_write_keys_jit(LP, CFG, X, LPOS, LSLOTS[:2], LC.index), ValueError, "slots: expected shape [3]"),
    ("halves/write-keys-exact", lambda: project_write_keys_jit(LP, CFG, X, LPOS, LSLOTS, MC[0].index), TypeError, "index: expected FP8 IndexerPages"),
    ("halves/attend-slots", lambda: attend_jit(LP, CFG, proj(), LSLOTS.astype(float), LBT, LC.latent, jnp.zeros((3, 4), jnp.int32), "xla"), TypeError, "slots:"),
    # the model
    ("forward/tokens-float", lambda: forward(MP, CFG, TOK.astype(float), LPOS, LSLOTS, LBT, MC, "xla"), TypeError, "tokens: expected integers"),
    ("forward/tokens-list", lambda: forward(MP, CFG, [1, 2, 3], LPOS, LSLOTS, LBT, MC, "xla"), TypeError, "tokens: expected an integer array"),
    ("forward/tokens-vocab", lambda: forward(MP, CFG, TOK + CFG.vocab_size, LPOS, LSLOTS, LBT, MC, "xla"), ValueError, "tokens: ids must lie in"),
    ("forward/tokens-negative", lambda: forward(MP, CFG, TOK - 5, LPOS, LSLOTS, LBT, MC, "xla"), ValueError, "tokens:"),
    ("forward/caches-count", lambda: forward(MP, CFG, TOK, LPOS, LSLOTS, LBT, MC[:1], "xla"), ValueError, "caches: expected one DSACaches per layer"),
    ("forward/positions-rows", lambda: forward(MP, CFG, TOK, LPOS[:2], LSLOTS, LBT, MC, "xla"), ValueError, "positions:"),
    ("greedy/empty", lambda: generate_greedy(MP, CFG, [], 2), TypeError, "prompt:"),
    ("greedy/floats", lambda: generate_greedy(MP, CFG, [1.5, 2.0], 2), TypeError, "prompt:"),
    ("greedy/vocab", lambda: generate_greedy(MP, CFG, [1, CFG.vocab_size], 2), ValueError, "prompt: token ids must lie"),
    ("greedy/new-0", lambda: generate_greedy(MP, CFG, [1, 2], 0), ValueError, "max_new_tokens:"),
    ("greedy/page-0", lambda: generate_greedy(MP, CFG, [1, 2], 2, page_size=0), ValueError, "page_size:"),
]
# fmt: on


def intact() -> None:
    """No input array was deleted or changed; the host caches are as they were."""
    for k, v in ARRAYS.items():
        leaves = jax.tree_util.tree_leaves(v)
        assert not any(a.is_deleted() for a in leaves), k
        assert all(np.array_equal(np.array(a), b) for a, b in zip(leaves, SAVED[k], strict=True)), k
    assert host_state() == HOST_BEFORE


@pytest.mark.parametrize(("call", "exc", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_named_error_and_changes_nothing(call: Callable[[], Any], exc: Any, match: str) -> None:
    with pytest.raises(exc) as info:
        call()
    assert match in str(info.value), str(info.value)
    intact()


# ----- good cases ------------------------------------------------------------------------------------
def test_sparse_mla_agrees_with_the_oracle_and_prefix_mla_with_sparse_mla() -> None:
    kv = np.asarray(C.rows(jnp.arange(64, dtype=jnp.int32)))
    out, lse = sparse_mla(Q, C, SLOTS, scale=0.1, d_v=32)
    want, want_lse = reference.sparse_mla(np.asarray(Q), kv, np.asarray(SLOTS), 0.1, d_v=32)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5)
    p_out, p_lse = prefix_mla(Q, C, BT, LENS, scale=0.1, d_v=32)  # rows see slots 0..4 and 32..51
    every = jnp.asarray([[*range(5), *[-1] * 15], list(range(32, 52))], jnp.int32)
    s_out, s_lse = sparse_mla(Q, C, every, scale=0.1, d_v=32)
    np.testing.assert_allclose(p_out, s_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p_lse, s_lse, rtol=1e-5)
    intact()


@pytest.mark.parametrize("cache", ["fp8", "exact"])
def test_device_selection_keeps_the_visibility_rule(cache: str) -> None:
    top = np.asarray(select_topk_device(QI, W, P if cache == "fp8" else E, BT, POS, 4))
    assert top.shape == (2, 4) and top.dtype == np.int32
    for row, p in zip(top, np.asarray(POS), strict=True):
        chosen = row[row >= 0]
        assert len(chosen) == min(4, p + 1) and (chosen <= p).all() and (np.diff(chosen) > 0).all()
    intact()


def test_the_host_layer_selects_what_the_device_layer_selects() -> None:
    host = IndexerKeyCache(4, 16, CFG.index_head_dim)
    layer = jax.jit(dsa_attention, static_argnums=1, static_argnames=("backend",))  # not donated: LC stays
    out_d, caches_d, top_d = layer(LP, CFG, X, LPOS, LSLOTS, LBT, LC, backend="xla")
    out_h, caches_h, top_h = dsa_attention_host(LP, CFG, X, LPOS, LSLOTS, LBT, LC, host, backend="xla")
    np.testing.assert_array_equal(np.asarray(top_d), top_h)
    np.testing.assert_allclose(out_d, out_h, rtol=1e-5, atol=1e-6)
    assert out_d.shape == (3, CFG.hidden_size)
    intact()  # the layer returns new caches; the ones passed in are untouched


def test_the_host_layer_with_sequences_appends_each_rows_keys_once() -> None:
    host = IndexerKeyCache(4, 16, CFG.index_head_dim)
    for s in (0, 1):
        host.add_sequence(s)
    _, _, top = dsa_attention_host(LP, CFG, X, jnp.asarray([0, 1, 0], jnp.int32), LSLOTS, LBT, LC, host,
                                   np.array([0, 0, 1]), backend="xla")  # fmt: skip
    assert [host.length(0), host.length(1)] == [2, 1]
    assert top[0, 0] == 0 and top[1, :2].tolist() == [0, 1] and top[2, 0] == 0


def test_forward_and_generate_greedy_take_good_input() -> None:
    logits, new = jax.jit(forward, static_argnums=(1, 7))(MP, CFG, TOK, LPOS, LSLOTS, LBT, MC, "xla")  # not donated
    assert logits.shape == (3, CFG.vocab_size) and np.isfinite(np.asarray(logits)).all() and len(new) == len(MC)
    a = generate_greedy(MP, CFG, np.array([1, 2, 3], np.int64), 2, page_size=16, latent_kind="f32", indexer="exact")
    assert len(a) == 2 and all(0 <= t < CFG.vocab_size for t in a)
    assert a[0] == int(np.argmax(np.asarray(logits)[-1]))  # the same prompt at the same positions
    intact()

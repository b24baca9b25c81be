"""The device indexer: FP8 pages on the device, scores and chunked top-k in JAX (dsa.md §4, §5), against the
FP8 oracle and the host `IndexerKeyCache.select` on the same pages."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from indexer_problems import Problem, oracle_scores, problems, tie_atol

import dsa_hybrid as dh
from dsa_hybrid import reference as ref
from dsa_hybrid.ops.indexer import IndexerPages, hadamard, quantize_rows, select_topk_device
from dsa_hybrid.testing import assert_topk_equal

_select = jax.jit(
    functools.partial(select_topk_device, backend="xla"), static_argnames=("k", "quantize_queries", "key_chunk")
)
# The Rust host indexer as an XLA custom call ("auto" on a CPU for FP8 pages whose widths it takes).
_select_kernel = jax.jit(
    functools.partial(select_topk_device, backend="cpu_kernel"), static_argnames=("k", "quantize_queries")
)


def _tables(p: Problem) -> np.ndarray:
    tabs = [p.cache.block_table(int(s)) for s in p.seq_ids]
    out = np.full((len(tabs), max(t.size for t in tabs)), -1, np.int32)
    for i, t in enumerate(tabs):
        out[i, : t.size] = t
    return out


def test_hadamard_and_quantization_follow_the_reference() -> None:
    x = np.random.default_rng(0).standard_normal((50, 128)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(hadamard(jnp.asarray(x))), ref.hadamard(x), rtol=1e-5, atol=1e-6)
    rotated = ref.hadamard(x).astype(np.float32)
    codes, scales = quantize_rows(jnp.asarray(rotated))
    want_codes, want_scales = ref.quantize_fp8(rotated)
    np.testing.assert_array_equal(np.asarray(codes).view(np.uint8), want_codes)
    np.testing.assert_array_equal(np.asarray(scales), want_scales)


def test_pages_move_between_host_and_device_unchanged() -> None:
    rng = np.random.default_rng(1)
    cache = dh.IndexerKeyCache(num_blocks=6, block_size=16, head_dim=32)
    cache.add_sequence(0)
    keys = rng.standard_normal((70, 32)).astype(np.float32)
    cache.append(0, keys)
    dev = IndexerPages.from_host_pages(cache.pages(), page_size=16, head_dim=32)
    np.testing.assert_array_equal(dev.to_host_pages(), cache.pages())
    # Writing on the device gives the host's bytes, but for codes on an f32-vs-f64 rounding boundary.
    table = cache.block_table(0)
    slots = table[np.arange(70) // 16] * 16 + np.arange(70) % 16
    written = IndexerPages.create(6, 16, 32).write(jnp.asarray(slots), jnp.asarray(keys)).to_host_pages()
    host = cache.pages()
    assert np.mean(written == host) > 0.999
    codes_w = written[:, : 16 * 32].reshape(-1).view(np.int8).astype(int)
    codes_h = host[:, : 16 * 32].reshape(-1).view(np.int8).astype(int)
    assert np.abs(codes_w - codes_h).max() <= 1  # one e4m3 step at most (same sign and exponent run)


@settings(max_examples=20)
@given(problems(), st.sampled_from(["xla", "cpu_kernel"]))
def test_device_selection_matches_the_oracle_and_the_host(p: Problem, backend: str) -> None:
    dev = IndexerPages.from_host_pages(p.cache.pages(), p.cache.block_size, p.cache.head_dim)
    want_scores = oracle_scores(p, quantized=True)
    args = (jnp.asarray(p.q), jnp.asarray(p.w), dev, jnp.asarray(_tables(p)), jnp.asarray(p.positions.astype(np.int32)))
    if backend == "xla":
        got = np.asarray(_select(*args, p.k, key_chunk=64))
    else:  # the host's own kernels: its selection bit for bit
        got = np.asarray(_select_kernel(*args, p.k))
        np.testing.assert_array_equal(got, p.cache.select(p.seq_ids, p.q, p.w, p.positions, p.k))
    want = ref.select_topk(np.where(np.isfinite(want_scores), want_scores, -1e300), p.positions, p.k)
    assert_topk_equal(got, want, want_scores, tie_atol=tie_atol(want_scores))
    host = p.cache.select(p.seq_ids, p.q, p.w, p.positions, p.k)
    assert_topk_equal(got, host, want_scores, tie_atol=tie_atol(want_scores))
    # Ascending positions, then −1 padding.
    for row in got:
        sel = row[row >= 0]
        assert np.all(np.diff(sel) > 0) and np.all(row[sel.size :] == -1)


@pytest.mark.parametrize("key_chunk", [16, 100, 4096])
def test_chunking_changes_nothing(key_chunk: int) -> None:
    rng = np.random.default_rng(2)
    cache = dh.IndexerKeyCache(num_blocks=40, block_size=16, head_dim=64)
    cache.add_sequence(3)
    cache.append(3, rng.standard_normal((600, 64)).astype(np.float32))
    dev = IndexerPages.from_host_pages(cache.pages(), 16, 64)
    q = jnp.asarray(rng.standard_normal((4, 8, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 8)) / 3, jnp.float32)
    pos = jnp.array([599, 30, 0, 300], jnp.int32)
    tables = jnp.asarray(np.tile(cache.block_table(3), (4, 1)))
    got = _select(q, w, dev, tables, pos, 32, key_chunk=key_chunk)
    base = _select(q, w, dev, tables, pos, 32, key_chunk=600)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(base))
    np.testing.assert_array_equal(np.asarray(got)[2], [0] + [-1] * 31)  # a row at position 0 sees one key
    exact = _select(q, w, dev, tables, pos, 32, quantize_queries=False, key_chunk=key_chunk)
    host_exact = cache.select([3] * 4, np.asarray(q), np.asarray(w), np.asarray(pos), 32, quantize_queries=False)
    codes, scales = cache.gather(3, np.arange(600))
    keys = ref.fp8_decode(codes) * scales[:, None]
    scores = ref.indexer_scores(ref.hadamard(np.asarray(q)), np.asarray(w), keys)
    assert_topk_equal(np.asarray(exact), host_exact, scores, tie_atol=1e-5 * np.abs(scores).max())


def test_bad_host_pages() -> None:
    with pytest.raises(ValueError, match=r"pages: expected uint8 \[num_pages, 8448\]"):
        IndexerPages.from_host_pages(np.zeros((2, 100), np.uint8))
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        IndexerPages.create(1, 16, 100)


def test_bad_shapes_get_named_errors() -> None:
    """Wrong shapes and dtypes name the argument, at trace time (so under jit as well)."""
    from dsa_hybrid.ops.indexer import ExactIndexerKeys

    pages = IndexerPages.create(4, 16, 32)
    keys = jnp.zeros((3, 32), jnp.float32)
    with pytest.raises(ValueError, match=r"keys: expected shape \['n', 32\]"):
        pages.write(jnp.arange(3), jnp.zeros((3, 16)))
    with pytest.raises(ValueError, match=r"slots: expected shape \[3\]"):
        pages.write(jnp.arange(4), keys)
    with pytest.raises(TypeError, match="slots: expected integers"):
        ExactIndexerKeys.create(4, 16, 32).write(jnp.zeros(3), keys)
    q, w = jnp.zeros((2, 4, 32)), jnp.zeros((2, 4))
    tables, pos = jnp.zeros((2, 4), jnp.int32), jnp.zeros(2, jnp.int32)
    with pytest.raises(ValueError, match=r"q: expected shape \[T, H, 32\]"):
        select_topk_device(jnp.zeros((2, 4, 16)), w, pages, tables, pos, 8)
    with pytest.raises(ValueError, match=r"weights: expected shape \[2, 4\]"):
        jax.jit(lambda w: select_topk_device(q, w, pages, tables, pos, 8))(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="block_tables"):
        select_topk_device(q, w, pages, jnp.zeros((3, 4), jnp.int32), pos, 8)
    with pytest.raises(TypeError, match="positions: expected integers"):
        select_topk_device(q, w, pages, tables, jnp.zeros(2), 8)


# ----- row blocks (the XLA path scores a block of rows × heads against each key chunk at once) ----------

_select_blocks = jax.jit(
    functools.partial(select_topk_device, backend="xla"), static_argnames=("k", "key_chunk", "row_block")
)


@st.composite
def paged_batches(draw: st.DrawFn) -> dict:
    """Random FP8 pages and an engine-like batch over them: per sequence a chunk of contiguous causal rows
    (one sequence may share another's first pages, as a fork), decode rows, padding rows (position 0, an
    all −1 table, as the runner pads), tables wider than needed and sometimes with −1 holes, duplicated
    keys (exact ties), and `k` above and below the rows' visible counts."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    S, D, H = draw(st.sampled_from([8, 16])), 16, draw(st.sampled_from([1, 4]))
    P = 24
    keys = rng.standard_normal((P * S, D))
    if draw(st.booleans()):
        keys[rng.integers(0, P * S, P * S // 3)] = keys[0]  # the same key at many slots: exact ties
    codes, scales = ref.quantize_fp8(ref.hadamard(keys))
    pages = IndexerPages(jnp.asarray(codes.reshape(P, S, D)), jnp.asarray(scales.reshape(P, 1, S)))
    width = draw(st.integers(1, 12))
    tables, rows = [], []  # rows: (table index, position)
    for s in range(draw(st.integers(1, 3))):
        n_pages = draw(st.integers(1, width))
        tab = np.full(width, -1, np.int32)
        tab[:n_pages] = rng.permutation(P)[:n_pages]
        if s > 0 and draw(st.booleans()):  # a fork: the first pages of sequence 0
            shared = min(n_pages, int(np.sum(tables[0] >= 0)))
            tab[:shared] = tables[0][:shared]
        if draw(st.integers(0, 4)) == 0:  # a hole: a page the sequence does not have
            tab[rng.integers(0, n_pages)] = -1
        tables.append(tab)
        length = n_pages * S
        count = draw(st.integers(1, min(4, length)))
        start = draw(st.integers(0, length - count))
        rows += [(s, p) for p in range(start, start + count)]  # a prefill chunk
        if draw(st.booleans()):
            rows.append((s, length - 1))  # a decode row
    rows += [(-1, 0)] * (16 - len(rows))  # padding rows, to 16 (fewer shapes to compile)
    T = len(rows)
    table_rows = np.stack([tables[s] if s >= 0 else np.full(width, -1, np.int32) for s, _ in rows])
    return {
        "pages": pages,
        "codes": codes,
        "scales": scales,
        "tables": table_rows,
        "positions": np.array([p for _, p in rows], np.int32),
        "q": rng.standard_normal((T, H, D)).astype(np.float32),
        "w": (rng.standard_normal((T, H)) * H**-0.5).astype(np.float32),
        "k": draw(st.sampled_from([1, 5, 40])),
        "row_block": draw(st.sampled_from([None, 1, 2, 4])),
        "key_chunk": draw(st.sampled_from([None, 16, 40])),
    }


def _paged_oracle(b: dict) -> tuple[np.ndarray, np.ndarray]:
    """float64 oracle scores `[T, L]` (−inf where a row sees no key) and the oracle's selection: the
    `min(k, visible)` best visible keys, ascending, ties to the lowest position, −1 padded."""
    tables, positions, k = b["tables"], b["positions"], b["k"]
    S = b["pages"].page_size
    T, L = tables.shape[0], tables.shape[1] * S
    scores = np.full((T, L), -np.inf)
    want = np.full((T, k), -1, np.int32)
    for t in range(T):
        pos = np.arange(positions[t] + 1)
        pos = pos[tables[t, pos // S] >= 0]
        slots = tables[t, pos // S] * S + pos % S
        row = ref.indexer_scores_fp8(b["q"][t : t + 1], b["w"][t : t + 1], b["codes"][slots], b["scales"][slots])[0]
        scores[t, pos] = row
        best = pos[np.lexsort((pos, -row))[:k]]
        want[t, : best.size] = np.sort(best)
    return scores, want


@settings(max_examples=15, deadline=None)
@given(paged_batches())
def test_row_blocks_match_the_oracle(b: dict) -> None:
    """Blocks of one sequence's rows (one matmul per key chunk), blocks mixing sequences (each row its own
    keys), padding rows, holes and skipped chunks all select what the oracle selects."""
    got = np.asarray(
        _select_blocks(
            jnp.asarray(b["q"]), jnp.asarray(b["w"]), b["pages"], jnp.asarray(b["tables"]),
            jnp.asarray(b["positions"]), b["k"], key_chunk=b["key_chunk"], row_block=b["row_block"],
        )
    )  # fmt: skip
    scores, want = _paged_oracle(b)
    assert_topk_equal(got, want, scores, tie_atol=tie_atol(np.where(np.isfinite(scores), scores, 0.0)))
    for row in got:  # ascending positions, then −1 padding
        sel = row[row >= 0]
        assert np.all(np.diff(sel) > 0) and np.all(row[sel.size :] == -1)
    assert np.all(got[b["tables"].max(axis=1) < 0] == -1)  # padding rows select nothing


@pytest.mark.parametrize("row_block", [1, 4, None])
def test_exact_ties_go_to_the_lowest_position(row_block: int | None) -> None:
    """Every key alike, so every visible score ties: each row takes its lowest visible positions, across
    chunk boundaries, in blocks of one sequence's rows and in blocks mixing sequences."""
    S, D, P, k = 8, 16, 12, 10
    codes, scales = ref.quantize_fp8(ref.hadamard(np.ones((1, D))))
    pages = IndexerPages(
        jnp.asarray(np.broadcast_to(codes.reshape(1, 1, D), (P, S, D))),
        jnp.asarray(np.broadcast_to(scales.reshape(1, 1, 1), (P, 1, S))),
    )
    one = np.arange(6, dtype=np.int32)
    tables = np.stack([one, one, one, one[::-1], one[::-1], np.full(6, -1, np.int32), one, 6 + one])
    tables[6, 0] = -1  # row 6 has no first page
    positions = np.array([47, 3, 20, 47, 9, 0, 30, 33], np.int32)
    q = jnp.ones((8, 2, D), jnp.float32)
    args = (q, jnp.ones((8, 2)), pages, jnp.asarray(tables), jnp.asarray(positions), k)
    got = np.asarray(_select_blocks(*args, key_chunk=16, row_block=row_block))
    for t in range(8):
        pos = np.arange(positions[t] + 1)
        visible = pos[tables[t, pos // S] >= 0][:k]
        np.testing.assert_array_equal(got[t], np.pad(visible, (0, k - visible.size), constant_values=-1))


def test_row_block_size_bounds_the_temporaries() -> None:
    from dsa_hybrid.ops.indexer import ROW_BLOCK_BYTES, row_block_size

    for rows, heads, dim, chunk in [(1, 64, 128, 2048), (1024, 16, 64, 2048), (5, 1, 16, 16), (128, 64, 128, 4096)]:
        b = row_block_size(rows, heads, dim, chunk)
        assert b >= 1 and b & (b - 1) == 0 and b <= 1 << (rows - 1).bit_length()
        assert b == 1 or b * chunk * (heads + dim) * 4 <= ROW_BLOCK_BYTES
    assert row_block_size(1024, 16, 64, 2048) == 16  # one Zen 4 core's best at the small model's widths


def test_bad_chunk_and_block_options() -> None:
    pages = IndexerPages.create(4, 16, 32)
    q, w = jnp.zeros((2, 4, 32)), jnp.zeros((2, 4))
    tables, pos = jnp.zeros((2, 4), jnp.int32), jnp.zeros(2, jnp.int32)
    with pytest.raises(ValueError, match="row_block: must be >= 1"):
        select_topk_device(q, w, pages, tables, pos, 8, row_block=0)
    with pytest.raises(ValueError, match="key_chunk: must be >= 1"):
        select_topk_device(q, w, pages, tables, pos, 8, key_chunk=0)

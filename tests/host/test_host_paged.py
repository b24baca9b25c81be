"""IndexerKeyCache addressed by external block tables (the engine's way): `write_slots`, `select_paged`,
`scores_paged` and `copy_block` equal the sequence API on the same pages, across forks and truncations, on
every SIMD path; an engine-style cache with a `BlockPool` matches a cache that forks; bad input gets a named
error and changes nothing."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from indexer_problems import Problem, problems
from test_host_topk import SIMD_PATHS

import dsa_hybrid as dh
from dsa_hybrid.host import BlockPool, CacheFullError


def tables_of(cache: dh.IndexerKeyCache, seq_ids: np.ndarray, pad: int = 0, fill: int = -1) -> np.ndarray:
    """The block tables of the rows' sequences as one int32 `[T, W]` array, `fill` padded (`pad` extra pages)."""
    tabs = [cache.block_table(int(s)) for s in seq_ids]
    width = max((len(t) for t in tabs), default=0) + pad
    out = np.full((len(tabs), width), fill, np.int32)
    for row, t in zip(out, tabs, strict=True):
        row[: len(t)] = t
    return out


class Engine:
    """The serving engine's side, in miniature: one BlockPool, one block table per request, keys written at
    slots, a shared partial page copied (copy_block) before it is written, and scoring through the tables."""

    def __init__(self, num_blocks: int, bs: int, d: int) -> None:
        self.pool = BlockPool(num_blocks)
        self.cache = dh.IndexerKeyCache(num_blocks, bs, d)
        self.bs = bs
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    def add(self, r: int) -> None:
        self.tables[r], self.lengths[r] = [], 0

    def append(self, r: int, keys: np.ndarray) -> None:
        table, start, bs = self.tables[r], self.lengths[r], self.bs
        if len(keys) and start % bs and self.pool.refcount(table[-1]) > 1:  # copy on write
            [fresh] = self.pool.allocate(1).tolist()
            self.cache.copy_block(table[-1], fresh)
            self.pool.release([table[-1]])
            table[-1] = fresh
        table += self.pool.allocate(-(-(start + len(keys)) // bs) - len(table)).tolist()
        codes, scales = dh._core.fp8_quantize_rows(keys)
        pos = np.arange(start, start + len(keys))
        self.cache.write_slots(np.asarray(table, np.int64)[pos // bs] * bs + pos % bs, codes, scales)
        self.lengths[r] = start + len(keys)

    def fork(self, parent: int, child: int) -> None:
        self.tables[child], self.lengths[child] = list(self.tables[parent]), self.lengths[parent]
        self.pool.retain(self.tables[child])

    def truncate(self, r: int, n: int) -> None:
        keep = -(-n // self.bs)
        self.pool.release(self.tables[r][keep:])
        del self.tables[r][keep:]
        self.lengths[r] = n

    def block_tables(self, rows: np.ndarray) -> np.ndarray:
        width = max(len(self.tables[int(r)]) for r in rows)
        out = np.full((len(rows), width), -1, np.int32)
        for i, r in enumerate(rows):
            out[i, : len(self.tables[int(r)])] = self.tables[int(r)]
        return out


ops = st.lists(st.tuples(st.sampled_from(["append", "fork", "truncate"]), st.integers(0, 10**6), st.integers(0, 45)))


@given(st.integers(1, 60), ops, st.integers(0, 2**32 - 1))
def test_an_engine_with_a_block_pool_matches_a_forking_cache(first: int, steps: list, seed: int) -> None:
    """Random appends, forks (prefix sharing) and truncations (rollback), applied to a cache's own sequences
    and to an engine-style pool + tables + write_slots/copy_block: select_paged and scores_paged through the
    engine's tables equal select and scores on the sequences, on every SIMD path."""
    rng = np.random.default_rng(seed)
    bs, D, H = 16, 32, 4
    seq, eng = dh.IndexerKeyCache(64, bs, D), Engine(64, bs, D)
    seq.add_sequence(0)
    eng.add(0)
    for kind, pick, n in [("append", 0, first), *steps]:
        live = seq.sequence_ids()
        r = live[pick % len(live)]
        if kind == "append":
            keys = rng.standard_normal((n, D)).astype(np.float32)
            if not seq.can_append(r, n):
                continue
            seq.append(r, keys)
            eng.append(r, keys)
        elif kind == "fork":
            child = max(live) + 1
            seq.fork(r, child)
            eng.fork(r, child)
        elif seq.length(r) > 1:
            keep = 1 + pick % (seq.length(r) - 1)
            seq.truncate(r, keep)
            eng.truncate(r, keep)
    assert eng.pool.num_free == seq.num_free_blocks
    rows = np.array([s for s in seq.sequence_ids() if seq.length(s)] * 2)
    if not len(rows):
        return
    pos = np.array([rng.integers(0, seq.length(int(s))) for s in rows])
    pos[0] = seq.length(int(rows[0])) - 1
    q = rng.standard_normal((len(rows), H, D)).astype(np.float32)
    w = rng.standard_normal((len(rows), H)).astype(np.float32)
    tables = eng.block_tables(rows)
    for path in SIMD_PATHS:
        dh.set_simd_path(path)
        try:
            np.testing.assert_array_equal(eng.cache.scores_paged(tables, pos, q, w), seq.scores(rows, q, w, pos))
            for k in (1, 16, 100):
                want = seq.select(rows, q, w, pos, k)
                np.testing.assert_array_equal(eng.cache.select_paged(tables, pos, q, w, k), want, err_msg=path)
                got_slots = eng.cache.select_paged(tables, pos, q, w, k, as_slots=True, sorted=True)
                want_slots = seq.select(rows, q, w, pos, k, as_slots=True, sorted=True)
                np.testing.assert_array_equal(got_slots < 0, want_slots < 0)
                sel = got_slots >= 0
                np.testing.assert_array_equal(codes_at(eng.cache, got_slots[sel]), codes_at(seq, want_slots[sel]))
        finally:
            dh.set_simd_path(None)


def test_errors_are_exceptions_with_their_numbers() -> None:
    cache = dh.IndexerKeyCache(2, 16, 16)
    cache.add_sequence(0)
    with pytest.raises(CacheFullError, match="keys: block pool exhausted: 3 blocks needed, 2 free") as e:
        cache.append(0, np.ones((40, 16), np.float32))
    assert (e.value.wanted, e.value.free) == (3, 2)
    with pytest.raises(IndexError, match=r"block: block 2 is outside \[0, 2\)"):
        cache.block_refcount(2)
    for n, bs in [(2**27 + 1, 16), (2, 2**62)]:  # slots past int32, or a buffer past memory: no panic
        with pytest.raises(ValueError, match="too large"):
            dh.IndexerKeyCache(n, bs, 128)


def codes_at(cache: dh.IndexerKeyCache, slots: np.ndarray) -> np.ndarray:
    """The FP8 codes stored at `slots`, read from the page buffer (codes first in each page)."""
    bs, d = cache.block_size, cache.head_dim
    pages = cache.pages()
    return np.stack([pages[s // bs, (s % bs) * d : (s % bs + 1) * d] for s in slots]).reshape(len(slots), d)


def scales_at(cache: dh.IndexerKeyCache, slots: np.ndarray) -> np.ndarray:
    """The float32 scales stored at `slots` (after each page's codes)."""
    bs, d = cache.block_size, cache.head_dim
    pages = cache.pages()
    return np.array(
        [pages[s // bs, bs * d + 4 * (s % bs) : bs * d + 4 * (s % bs + 1)].view(np.float32)[0] for s in slots]
    )


def paged_copy(p: Problem) -> dh.IndexerKeyCache:
    """A sequence-less cache of the same geometry holding the same keys at the same slots (via write_slots)."""
    c = p.cache
    paged = dh.IndexerKeyCache(c.num_blocks, c.block_size, c.head_dim)
    for sid in c.sequence_ids():
        n = c.length(sid)
        pos = np.arange(n)
        codes, scales = c.gather(sid, pos)
        slots = c.slots([sid], pos[None])[0]
        paged.write_slots(slots, codes, scales)
    return paged


@given(problems(), st.booleans(), st.integers(0, 3))
def test_paged_calls_equal_the_sequence_calls_on_every_path(p: Problem, quantized: bool, pad: int) -> None:
    c = p.cache
    paged = paged_copy(p)
    assert paged.sequence_ids() == [] and paged.num_free_blocks == paged.num_blocks
    for sid in c.sequence_ids():  # every key is where the sequence's block table says
        n = c.length(sid)
        slots = c.slots([sid], np.arange(n)[None])[0]
        codes, scales = c.gather(sid, np.arange(n))
        np.testing.assert_array_equal(codes_at(paged, slots), codes.reshape(n, paged.head_dim))
        np.testing.assert_array_equal(scales_at(paged, slots), scales)
    # Pages past what a row needs may hold anything (the engine pads with -1 or stale ids).
    tables = tables_of(c, p.seq_ids, pad, fill=-1 if pad % 2 else 10**6)
    args = (p.q, p.w)
    for path in SIMD_PATHS:
        dh.set_simd_path(path)
        try:
            want_scores = c.scores(p.seq_ids, *args, p.positions, quantize_queries=quantized)
            for cache in (paged, c):  # the sequence cache itself, addressed by its own tables, too
                got_scores = cache.scores_paged(tables, p.positions, *args, quantize_queries=quantized)
                np.testing.assert_array_equal(got_scores, want_scores, err_msg=path)
            for opts in (dict(), dict(as_slots=True), dict(sorted=True), dict(threads=2), dict(threads=1)):
                want = c.select(p.seq_ids, *args, p.positions, p.k, quantize_queries=quantized, **opts)
                for cache in (paged, c):
                    got = cache.select_paged(tables, p.positions, *args, p.k, quantize_queries=quantized, **opts)
                    np.testing.assert_array_equal(got, want, err_msg=f"{path} {opts}")
        finally:
            dh.set_simd_path(None)


def test_long_paged_rows_split_over_threads_agree() -> None:
    """Rows long enough for the thread pool: a decode row split in spans, and many rows spread over workers."""
    rng = np.random.default_rng(4)
    pool = BlockPool(300)
    cache = dh.IndexerKeyCache(num_blocks=300, block_size=64, head_dim=128)
    L = 12_000
    blocks = pool.allocate(-(-L // 64))
    keys = rng.standard_normal((L, 128)).astype(np.float32)
    codes, scales = dh._core.fp8_quantize_rows(keys)
    slots = blocks[np.arange(L) // 64] * 64 + np.arange(L) % 64
    cache.write_slots(slots, codes, scales)
    for T in (1, 9):
        q = rng.standard_normal((T, 64, 128)).astype(np.float32)
        w = rng.random((T, 64)).astype(np.float32)
        tables = np.tile(blocks, (T, 1))
        pos = rng.integers(L - 3000, L, T)
        base = cache.select_paged(tables, pos, q, w, 2048, threads=1)
        for threads in (2, 3, None):
            np.testing.assert_array_equal(cache.select_paged(tables, pos, q, w, 2048, threads=threads), base)
        np.testing.assert_array_equal(base, dh.topk(cache.scores_paged(tables, pos, q, w), 2048, pos + 1))


def test_an_engine_style_cache_matches_a_forking_cache() -> None:
    """Two requests sharing a 40-token prefix: the engine retains the prefix blocks, copies the shared partial
    page before writing into it (copy_block), and scores through its tables — as a cache that forks."""
    rng = np.random.default_rng(7)
    bs, D = 16, 32
    k_prefix = rng.standard_normal((40, D)).astype(np.float32)
    k_a = rng.standard_normal((30, D)).astype(np.float32)
    k_b = rng.standard_normal((12, D)).astype(np.float32)

    seq = dh.IndexerKeyCache(16, bs, D)
    seq.add_sequence(0)
    seq.append(0, k_prefix)
    seq.fork(0, 1)
    seq.append(0, k_a)
    seq.append(1, k_b)
    seq.truncate(1, 45)  # a rollback: the engine simply writes fewer slots
    seq.append(1, k_b[5:9])

    pool = BlockPool(16)
    cache = dh.IndexerKeyCache(16, bs, D)

    def write(table: list[int], start: int, keys: np.ndarray) -> None:
        codes, scales = dh._core.fp8_quantize_rows(keys)
        pos = np.arange(start, start + len(keys))
        cache.write_slots(np.asarray(table)[pos // bs] * bs + pos % bs, codes, scales)

    table_a = pool.allocate(3).tolist()  # 40 tokens: pages 0, 1 full, page 2 partial (8 tokens)
    write(table_a, 0, k_prefix)
    table_b = list(table_a)
    pool.retain(table_b)
    # Request a writes into the shared partial page: copy it first.
    [fresh] = pool.allocate(1).tolist()
    cache.copy_block(table_a[2], fresh)
    pool.release([table_a[2]])
    table_a[2] = fresh
    table_a += pool.allocate(2).tolist()
    write(table_a, 40, k_a)
    # Request b now holds page 2 alone: it writes in place, then rolls back and rewrites.
    assert pool.refcount(table_b[2]) == 1
    table_b += pool.allocate(1).tolist()
    write(table_b, 40, k_b)
    write(table_b, 45, k_b[5:9])

    T, H = 4, 4
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    w = rng.standard_normal((T, H)).astype(np.float32)
    ids, pos = np.array([0, 1, 0, 1]), np.array([69, 48, 39, 20])
    width = max(len(table_a), len(table_b))
    tables = np.full((T, width), -1, np.int32)
    for t, s in enumerate(ids):
        tab = table_a if s == 0 else table_b
        tables[t, : len(tab)] = tab
    for k in (8, 64):
        np.testing.assert_array_equal(cache.select_paged(tables, pos, q, w, k), seq.select(ids, q, w, pos, k))
        # Slots differ (different block ids) but hold the same keys.
        got = cache.select_paged(tables, pos, q, w, k, as_slots=True)
        want = seq.select(ids, q, w, pos, k, as_slots=True)
        np.testing.assert_array_equal(got < 0, want < 0)
        sel = got >= 0
        np.testing.assert_array_equal(codes_at(cache, got[sel]), codes_at(seq, want[sel]))
    np.testing.assert_array_equal(cache.scores_paged(tables, pos, q, w), seq.scores(ids, q, w, pos))


def _setup() -> tuple[dh.IndexerKeyCache, np.ndarray]:
    cache = dh.IndexerKeyCache(num_blocks=3, block_size=16, head_dim=16)
    codes, scales = dh._core.fp8_quantize_rows(np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32))
    cache.write_slots(np.arange(40), codes, scales)
    return cache, cache.pages().copy()


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (dict(tables=[[0, -1, -1]], positions=[20]), IndexError, "block_tables: row 0 needs page 1 .* −1"),
        (
            dict(tables=[[0, 3, -1]], positions=[20]),
            IndexError,
            r"block_tables: row 0 needs page 1 .* block 3, outside \[0, 3\)",
        ),
        (dict(positions=[48]), IndexError, "block_tables: row 0 at position 48 needs 4 pages, its block table has 3"),
        (dict(positions=[-1]), IndexError, "positions: position -1 .* is negative"),
        (dict(tables=[[0, 1, 2**40]]), IndexError, "block_tables: entries must fit in int32"),
        (dict(tables=[[0.0, 1.0, 2.0]]), TypeError, "block_tables: expected integers"),
        (dict(tables=[0, 1, 2]), ValueError, "block_tables: expected 2 dimension"),
        (dict(tables=[[0, 1, 2], [0, 1, 2]]), ValueError, "block_tables and positions: 2 rows of 3 and 1 entries"),
        (dict(q=np.full((1, 4, 16), np.nan, np.float32)), ValueError, "q: non-finite"),
        (dict(w=np.ones((1, 3), np.float32)), ValueError, r"weights: expected \[1, 4\]"),
        (dict(q=np.ones((1, 4, 32), np.float32)), ValueError, "q: head_dim 32 does not match the cache's 16"),
        (dict(k=0), ValueError, "k: must be at least 1"),
        (dict(threads=0), ValueError, "threads: must be at least 1"),
    ],
)
def test_bad_paged_selects_raise_named_errors_and_change_nothing(
    args: dict, error: type[Exception], match: str
) -> None:
    cache, before = _setup()
    a = dict(tables=[[0, 1, 2]], positions=[39], q=np.ones((1, 4, 16), np.float32), w=np.ones((1, 4), np.float32), k=4)
    a.update(args)
    extra = {"threads": a.pop("threads")} if "threads" in a else {}
    with pytest.raises(error, match=match):
        cache.select_paged(a["tables"], a["positions"], a["q"], a["w"], a["k"], **extra)
    if error is not TypeError and "k" not in args and "threads" not in args:
        with pytest.raises(error, match=match):
            cache.scores_paged(a["tables"], a["positions"], a["q"], a["w"])
    np.testing.assert_array_equal(cache.pages(), before)


def test_a_paged_select_sees_only_the_pages_it_needs() -> None:
    cache, _ = _setup()
    q, w = np.ones((2, 4, 16), np.float32), np.ones((2, 4), np.float32)
    got = cache.select_paged([[2, -1, -1], [0, 1, -5]], [3, 17], q, w, 20)
    np.testing.assert_array_equal(got[0], [0, 1, 2, 3] + [-1] * 16)
    np.testing.assert_array_equal(got[1], np.arange(18).tolist() + [-1, -1])
    slots = cache.select_paged([[2, -1, -1], [0, 1, -5]], [3, 17], q, w, 20, as_slots=True)
    np.testing.assert_array_equal(slots[0, :4], [32, 33, 34, 35])
    assert cache.select_paged(np.zeros((0, 0), np.int32), np.zeros(0, np.int64), q[:0], w[:0], 4).shape == (0, 4)
    assert cache.scores_paged(np.zeros((0, 5), np.int32), [], q[:0], w[:0]).shape == (0, 0)


@pytest.mark.parametrize(
    ("slots", "fp8", "scales", "error", "match"),
    [
        ([0, 48], None, None, IndexError, r"slots: slot 48 \(entry 1\) is outside \[0, 48\)"),
        ([0, -2], None, None, IndexError, "slots: slot -2"),
        ([0, 2**40], None, None, IndexError, "slots: entries must fit in int32"),
        ([0.0, 1.0], None, None, TypeError, "slots: expected integers"),
        ([0, 1], "nan", None, ValueError, "fp8: row 1 holds the e4m3fn NaN code"),
        ([0, 1], None, [1.0, 0.0], ValueError, "scales: scale of row 1 is not a finite positive number"),
        ([0, 1], None, [1.0, np.inf], ValueError, "scales: scale of row 1"),
        ([0, 1], None, [1.0], ValueError, r"scales: expected float32 \[2\]"),
        ([0], None, None, ValueError, r"fp8: expected \[1, 16\] for 1 slots"),
        ([0, 1], "wide", None, ValueError, r"fp8: expected shape \[n, 16\]"),
        ([0, 1], "f32", None, TypeError, "fp8: expected uint8 or float8_e4m3fn"),
    ],
)
def test_bad_writes_raise_named_errors_and_write_nothing(slots, fp8, scales, error, match) -> None:
    cache, before = _setup()
    codes = np.full((2, 16), 0x38, np.uint8)
    if fp8 == "nan":
        codes[1, 3] = 0x7F
    elif fp8 == "wide":
        codes = np.zeros((2, 32), np.uint8)
    elif fp8 == "f32":
        codes = codes.astype(np.float32)
    s = np.asarray(scales if scales is not None else [1.0, 1.0], np.float32)
    with pytest.raises(error, match=match):
        cache.write_slots(slots, codes, s)
    np.testing.assert_array_equal(cache.pages(), before)


def test_write_slots_skips_minus_one_and_accepts_float8() -> None:
    cache, before = _setup()
    codes = np.full((3, 16), 0x7F, np.uint8)  # NaN codes, but only in skipped rows
    codes[1] = 0x40
    cache.write_slots(np.array([-1, 5, -1]), codes.view(ml_dtypes.float8_e4m3fn), np.array([0, 2, -1], np.float32))
    after = cache.pages()
    changed = np.argwhere(after != before)
    assert set(changed[:, 0].tolist()) == {0}
    page = after[0]
    np.testing.assert_array_equal(page[5 * 16 : 6 * 16], codes[1])
    assert page[16 * 16 + 4 * 5 : 16 * 16 + 4 * 6].view(np.float32)[0] == 2.0


def test_copy_block_copies_a_whole_page_and_refuses_bad_ids() -> None:
    cache, before = _setup()
    for src, dst, match in [(3, 0, "src: block 3 is outside"), (0, -1, "dst: block -1 is outside")]:
        with pytest.raises(IndexError, match=match):
            cache.copy_block(src, dst)
        np.testing.assert_array_equal(cache.pages(), before)
    cache.copy_block(1, 2)
    np.testing.assert_array_equal(cache.pages()[2], before[1])
    np.testing.assert_array_equal(cache.pages()[:2], before[:2])
    cache.copy_block(np.int64(0), np.int32(0))
    np.testing.assert_array_equal(cache.pages()[0], before[0])

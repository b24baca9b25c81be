"""IndexerKeyCache (Rust core): layout against the oracle, a state machine against a pure-Python model,
bad input, and concurrent appends."""

import threading

import ml_dtypes
import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dsa_hybrid import CacheFullError, IndexerKeyCache, reference


def keys(n, seed, d=128):
    return (np.random.default_rng(seed).standard_normal((n, d)) * 3).astype(np.float32)


@pytest.mark.parametrize("block_size", [16, 64])
def test_pages_equal_the_reference_pack(block_size):
    c = IndexerKeyCache(num_blocks=10, block_size=block_size)
    c.add_sequence(0)
    k = keys(150, 1)
    c.append(0, k[:37])
    c.append(0, k[37:])
    codes, scales = reference.quantize_indexer_keys(k)
    table = c.block_table(0)
    np.testing.assert_array_equal(c.pages()[table], reference.pack_indexer_pages(codes, scales, block_size))
    got_codes, got_scales = c.gather(0, np.arange(150))
    np.testing.assert_array_equal(got_codes, codes)
    np.testing.assert_array_equal(got_scales, scales)
    np.testing.assert_array_equal(c.dequantize(0), reference.dequantize_fp8(codes, scales).astype(np.float32))
    assert c.page_bytes == block_size * 132


def test_bfloat16_keys_and_append_quantized():
    c = IndexerKeyCache(4, 16)
    k = keys(20, 2).astype(ml_dtypes.bfloat16)
    c.add_sequence(1)
    c.append(1, k)
    codes, scales = reference.quantize_indexer_keys(k.astype(np.float32))
    c.add_sequence(2)
    c.append_quantized(2, codes.view(ml_dtypes.float8_e4m3fn), scales)
    np.testing.assert_array_equal(c.gather(1, range(20))[0], c.gather(2, range(20))[0])


def test_slots_follow_block_tables():
    c = IndexerKeyCache(8, 16)
    for s in (10, 11):
        c.add_sequence(s)
    c.append(10, keys(5, 3))
    c.append(11, keys(40, 4))
    c.append(10, keys(30, 5))
    pos = np.array([[0, 34, -1], [39, 16, 0]])
    got = c.slots([10, 11], pos)
    for row, s in enumerate((10, 11)):
        np.testing.assert_array_equal(got[row], reference.positions_to_slots(pos[row], c.block_table(s), 16))


def snapshot(c):
    return (
        c.pages().copy(),
        c.num_free_blocks,
        {s: (c.length(s), c.block_table(s).tolist()) for s in c.sequence_ids()},
    )


def assert_unchanged(c, snap):
    pages, free, seqs = snapshot(c)
    np.testing.assert_array_equal(pages, snap[0])
    assert (free, seqs) == (snap[1], snap[2])


def test_bad_input_raises_clear_errors_and_changes_nothing():
    c = IndexerKeyCache(3, 16)
    c.add_sequence(1)
    c.append(1, keys(20, 6))
    snap = snapshot(c)
    nan_keys = keys(4, 7)
    nan_keys[2, 3] = np.nan
    inf_keys = keys(4, 7)
    inf_keys[0, 0] = np.inf
    cases = [
        (KeyError, "seq_id: unknown sequence id 5", lambda: c.append(5, keys(1, 0))),
        (ValueError, "seq_id: sequence id 1 already exists", lambda: c.add_sequence(1)),
        (ValueError, r"keys: expected shape \[n, 128\]", lambda: c.append(1, keys(2, 0, d=64))),
        (ValueError, r"keys: expected shape", lambda: c.append(1, keys(2, 0)[0])),
        (TypeError, "keys: expected float32 or bfloat16", lambda: c.append(1, keys(2, 0).astype(np.float64))),
        (ValueError, "keys: must be C-contiguous", lambda: c.append(1, np.asfortranarray(keys(3, 0)))),
        (ValueError, "keys: non-finite value .* row 2, column 3", lambda: c.append(1, nan_keys)),
        (ValueError, "keys: non-finite", lambda: c.append(1, inf_keys)),
        (CacheFullError, "keys: block pool exhausted: 2 blocks needed, 1 free", lambda: c.append(1, keys(30, 0))),
        (IndexError, r"positions: position 20 .* outside \[0, 20\)", lambda: c.gather(1, [0, 20])),
        (IndexError, "positions: position -1", lambda: c.gather(1, [-1])),
        (IndexError, "positions: position -2", lambda: c.slots([1], [[-2]])),
        (KeyError, "seq_ids: unknown", lambda: c.slots([9], [[0]])),
        (ValueError, "seq_ids: 2 ids for 1 rows", lambda: c.slots([1, 1], [[0]])),
        (ValueError, "n: cannot truncate to 21", lambda: c.truncate(1, 21)),
        (KeyError, "seq_id: unknown", lambda: c.free(2)),
        (KeyError, "parent: unknown", lambda: c.fork(4, 5)),
        (ValueError, "child: sequence id 1 already exists", lambda: c.fork(1, 1)),
        (
            ValueError,
            "scales: scale of row 0",
            lambda: c.append_quantized(1, np.zeros((1, 128), np.uint8), np.zeros(1, np.float32)),
        ),
        (
            ValueError,
            r"scales: expected float32 \[1\]",
            lambda: c.append_quantized(1, np.zeros((1, 128), np.uint8), np.ones(2, np.float32)),
        ),
        (TypeError, "positions: expected integers", lambda: c.gather(1, [0.5])),
    ]
    for exc, msg, call in cases:
        with pytest.raises(exc, match=msg):
            call()
        assert_unchanged(c, snap)
    with pytest.raises(ValueError, match="read-only"):
        c.pages()[0, 0] = 1
    c.free(1)
    with pytest.raises(KeyError, match="unknown sequence id 1"):
        c.free(1)  # double free
    with pytest.raises(ValueError, match="block_size must be a positive multiple of 16"):
        IndexerKeyCache(2, 24)
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        IndexerKeyCache(2, 16, 96)


def test_concurrent_appends_to_different_sequences_lose_nothing():
    c = IndexerKeyCache(num_blocks=64, block_size=16)
    data = {s: keys(100, 100 + s) for s in range(6)}
    for s in data:
        c.add_sequence(s)

    def work(s):
        for i in range(0, 100, 7):
            c.append(s, data[s][i : i + 7])

    threads = [threading.Thread(target=work, args=(s,)) for s in data]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s, k in data.items():
        assert c.length(s) == 100
        np.testing.assert_array_equal(c.gather(s, np.arange(100))[0], reference.quantize_indexer_keys(k)[0])
    assert c.num_free_blocks == 64 - 6 * 7


class CacheMachine(RuleBasedStateMachine):
    """Random add/append/fork/truncate/free/gather against a dict of expected quantized keys."""

    @initialize(num_blocks=st.integers(1, 12), block_size=st.sampled_from([16, 32]))
    def setup(self, num_blocks, block_size):
        self.c = IndexerKeyCache(num_blocks, block_size)
        self.bs = block_size
        self.model = {}  # seq id -> (codes [n, 128], scales [n])
        self.next_id = 0
        self.seed = 0

    def _ids(self):
        return sorted(self.model)

    @rule()
    def add(self):
        self.c.add_sequence(self.next_id)
        self.model[self.next_id] = (np.zeros((0, 128), np.uint8), np.zeros(0, np.float32))
        self.next_id += 1

    @precondition(lambda self: self.model)
    @rule(pick=st.integers(0, 10**6), n=st.integers(0, 40))
    def append(self, pick, n):
        s = self._ids()[pick % len(self.model)]
        self.seed += 1
        k = keys(n, self.seed)
        fits = self.c.can_append(s, n)
        try:
            self.c.append(s, k)
        except CacheFullError:
            assert not fits
            return
        assert fits
        codes, scales = reference.quantize_indexer_keys(k)
        old_c, old_s = self.model[s]
        self.model[s] = (np.concatenate([old_c, codes]), np.concatenate([old_s, scales]))

    @precondition(lambda self: self.model)
    @rule(pick=st.integers(0, 10**6))
    def fork(self, pick):
        parent = self._ids()[pick % len(self.model)]
        self.c.fork(parent, self.next_id)
        self.model[self.next_id] = self.model[parent]
        self.next_id += 1

    @precondition(lambda self: self.model)
    @rule(pick=st.integers(0, 10**6), frac=st.floats(0, 1))
    def truncate(self, pick, frac):
        s = self._ids()[pick % len(self.model)]
        n = int(len(self.model[s][1]) * frac)
        self.c.truncate(s, n)
        self.model[s] = (self.model[s][0][:n], self.model[s][1][:n])

    @precondition(lambda self: self.model)
    @rule(pick=st.integers(0, 10**6))
    def free(self, pick):
        s = self._ids()[pick % len(self.model)]
        self.c.free(s)
        del self.model[s]
        with pytest.raises(KeyError):
            self.c.free(s)

    @invariant()
    def contents_lengths_and_counts_match(self):
        if not hasattr(self, "c"):
            return
        assert self.c.sequence_ids() == self._ids()
        held = {}
        for s, (codes, scales) in self.model.items():
            n = len(scales)
            assert self.c.length(s) == n
            table = self.c.block_table(s)
            assert len(table) == -(-n // self.bs)
            for b in table.tolist():
                held[b] = held.get(b, 0) + 1
            got_c, got_s = self.c.gather(s, np.arange(n))
            np.testing.assert_array_equal(got_c, codes)
            np.testing.assert_array_equal(got_s, scales)
        for b in range(self.c.num_blocks):
            assert self.c.block_refcount(b) == held.get(b, 0)
        assert self.c.num_free_blocks == self.c.num_blocks - len(held)
        assert self.c.bytes_used == len(held) * self.c.page_bytes


TestCacheMachine = CacheMachine.TestCase

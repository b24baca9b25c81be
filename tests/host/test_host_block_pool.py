"""BlockPool (Rust core): order, all-or-nothing, refcounts, errors that change nothing, thread safety, and a
state machine against a pure-Python model of the pool."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dsa_hybrid import CacheFullError, _core
from dsa_hybrid.host import BlockPool


def state(p: BlockPool) -> tuple[list[int], list[int], int]:
    return p.refcounts().tolist(), p.free_blocks().tolist(), p.num_free


def test_a_fresh_pool_hands_out_the_lowest_ids_first_and_is_all_or_nothing() -> None:
    p = BlockPool(6)
    assert (p.num_blocks, p.num_free) == (6, 6)
    a = p.allocate(4)
    assert a.dtype == np.int32 and a.tolist() == [0, 1, 2, 3]
    before = state(p)
    with pytest.raises(CacheFullError, match="n: 3 blocks wanted, 2 free") as e:
        p.allocate(3)
    assert (e.value.wanted, e.value.free) == (3, 2)
    assert state(p) == before
    assert p.allocate(0).tolist() == []
    assert p.refcounts().dtype == np.int32 and p.refcounts().tolist() == [1, 1, 1, 1, 0, 0]
    assert p.free_blocks().dtype == np.int32 and p.free_blocks().tolist() == [4, 5]
    assert repr(p) == "BlockPool(num_blocks=6, num_free=2)"


def test_a_released_run_is_handed_out_again_in_the_same_order() -> None:
    p = BlockPool(8)
    a, b = p.allocate(3), p.allocate(2)
    p.release(b)
    p.release(a)
    assert p.free_blocks().tolist()[:5] == a.tolist() + b.tolist()
    assert p.allocate(3).tolist() == a.tolist()
    assert p.allocate(2).tolist() == b.tolist()


def test_refcounts_count_every_holder() -> None:
    p = BlockPool(4)
    blocks = p.allocate(2)
    p.retain(blocks)  # a second request adopts the prefix
    p.retain([1, 1])  # an id listed twice gains two
    assert [p.refcount(b) for b in range(4)] == [2, 4, 0, 0]
    p.release(blocks)
    p.release([1, 1, 1])
    assert p.refcounts().tolist() == [1, 0, 0, 0]
    assert p.free_blocks().tolist() == [1, 2, 3]
    p.release([0])
    assert p.num_free == 4


@pytest.mark.parametrize(
    "blocks", [[0, 2], (0, 2), range(0, 3, 2), np.array([0, 2]), np.array([0, 2], np.int32), np.array([0, 2], np.uint8)]
)
def test_blocks_may_be_any_int_array_like(blocks: object) -> None:
    p = BlockPool(3)
    p.allocate(3)
    p.retain(blocks)
    assert p.refcounts().tolist() == [2, 1, 2]
    p.release(blocks)
    p.retain(np.arange(3)[::2])  # strided arrays are read as they are
    assert p.refcounts().tolist() == [2, 1, 2]
    p.retain([])
    p.release(np.zeros(0, np.int64))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda p: p.allocate(5), CacheFullError, "n: 5 blocks wanted, 3 free"),
        (lambda p: p.allocate(-1), ValueError, "n: must be >= 0"),
        (lambda p: p.retain([0, 5]), IndexError, r"blocks: block 5 \(entry 1\) is outside \[0, 5\)"),
        (lambda p: p.retain([-1]), IndexError, r"blocks: block -1 \(entry 0\) is outside"),
        (lambda p: p.retain([0, 3]), ValueError, r"blocks: block 3 \(entry 1\) is free"),
        (lambda p: p.release([0, 9]), IndexError, "blocks: block 9"),
        (lambda p: p.release([3]), ValueError, "blocks: block 3 .* is free"),
        (lambda p: p.release([1, 1]), ValueError, "blocks: block 1 .* is free"),  # held once, released twice
        (lambda p: p.release([0, 0, 0]), ValueError, "is free"),  # held twice
        (lambda p: p.release([2, 1, 4]), ValueError, "block 4"),  # the valid entries are undone
        (lambda p: p.retain([0.5]), TypeError, "blocks: expected a 1-D sequence or array of integers"),
        (lambda p: p.retain(np.array([0.0])), TypeError, "blocks: expected"),
        (lambda p: p.retain("01"), TypeError, "blocks: expected"),
        (lambda p: p.retain([[0]]), TypeError, "blocks: expected"),
        (lambda p: p.retain(None), TypeError, "blocks: expected"),
        (lambda p: p.refcount(5), IndexError, r"block: 5 is outside \[0, 5\)"),
        (lambda p: p.refcount(-1), IndexError, "block: -1"),
    ],
)
def test_bad_calls_raise_named_errors_and_change_nothing(call, error: type[Exception], match: str) -> None:
    p = BlockPool(5)
    p.allocate(2)
    p.retain([0])
    before = state(p)
    with pytest.raises(error, match=match):
        call(p)
    assert state(p) == before


@pytest.mark.parametrize("n", [0, -3, 2**31, 2**64])
def test_pool_size_is_bounded(n: int) -> None:
    with pytest.raises(ValueError, match=r"num_blocks: must be in \[1, 2147483647\]"):
        BlockPool(n)
    with pytest.raises(TypeError, match="num_blocks: expected an int"):
        BlockPool(2.0)  # type: ignore[arg-type]


def test_the_wrapper_and_the_core_class_agree() -> None:
    a, b = BlockPool(4), _core.BlockPool(4)
    for p in (a, b):
        p.allocate(3)
        p.release([1])
    assert state(a) == state(b)  # type: ignore[arg-type]


def test_concurrent_allocations_never_hand_out_a_block_twice() -> None:
    p = BlockPool(64)
    seen: list[list[int]] = [[] for _ in range(8)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(200):
                try:
                    got = p.allocate(3)
                except CacheFullError:
                    continue
                seen[i].append(len(got))
                p.retain(got)
                p.release(got)
                p.release(got)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert p.num_free == 64 and sorted(p.free_blocks().tolist()) == list(range(64))
    assert not p.refcounts().any()


class ModelPool:
    """The pool as plain Python: a free stack popped from its end and reference counts."""

    def __init__(self, n: int) -> None:
        self.free = list(range(n - 1, -1, -1))
        self.refs = [0] * n

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self.free):
            return None
        out = [self.free.pop() for _ in range(n)]
        for b in out:
            self.refs[b] = 1
        return out

    def retain(self, blocks: list[int]) -> bool:
        if any(not 0 <= b < len(self.refs) or self.refs[b] == 0 for b in blocks):
            return False
        for b in blocks:
            self.refs[b] += 1
        return True

    def release(self, blocks: list[int]) -> bool:
        refs, free = list(self.refs), list(self.free)
        for b in reversed(blocks):
            if not 0 <= b < len(refs) or refs[b] == 0:
                return False
            refs[b] -= 1
            if refs[b] == 0:
                free.append(b)
        self.refs, self.free = refs, free
        return True


class PoolMachine(RuleBasedStateMachine):
    """Random allocate / retain / release (valid or not) against `ModelPool`."""

    @initialize(n=st.integers(1, 12))
    def setup(self, n: int) -> None:
        self.p = BlockPool(n)
        self.model = ModelPool(n)
        self.held: list[list[int]] = []  # runs handed out, for realistic retains and releases

    @rule(n=st.integers(0, 6))
    def allocate(self, n: int) -> None:
        want = self.model.allocate(n)
        if want is None:
            with pytest.raises(CacheFullError):
                self.p.allocate(n)
        else:
            assert self.p.allocate(n).tolist() == want
            self.held.append(want)

    @precondition(lambda self: self.held)
    @rule(pick=st.integers(0, 10**6))
    def share_a_run(self, pick: int) -> None:
        run = self.held[pick % len(self.held)]
        ok = self.model.retain(run)
        if ok:
            self.p.retain(run)
            self.held.append(list(run))
        else:
            with pytest.raises(ValueError):
                self.p.retain(run)

    @precondition(lambda self: self.held)
    @rule(pick=st.integers(0, 10**6))
    def release_a_run(self, pick: int) -> None:
        run = self.held.pop(pick % len(self.held))
        if self.model.release(run):
            self.p.release(run)
        else:
            with pytest.raises(ValueError):
                self.p.release(run)

    @rule(blocks=st.lists(st.integers(-2, 13), max_size=5), retain=st.booleans())
    def arbitrary_ids(self, blocks: list[int], retain: bool) -> None:
        ok = self.model.retain(blocks) if retain else self.model.release(blocks)
        call = self.p.retain if retain else self.p.release
        if ok:
            call(blocks)
        else:
            with pytest.raises((ValueError, IndexError)):
                call(blocks)

    @invariant()
    def pool_matches_the_model(self) -> None:
        if not hasattr(self, "p"):
            return
        assert self.p.refcounts().tolist() == self.model.refs
        assert self.p.free_blocks().tolist() == self.model.free[::-1]
        assert self.p.num_free == len(self.model.free)


TestPoolMachine = PoolMachine.TestCase

"""The KV manager alone: the Rust `BlockPool` it allocates from (reference counts, all or nothing), one
block table per request, prefix adoption through the `PrefixIndex` (refcounts per holder, nothing lost)."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

from dsa_hybrid import CacheFullError
from dsa_hybrid.host import BlockPool
from dsa_hybrid.serving.kv_manager import KVManager


def test_block_pool_counts_holders() -> None:
    pool = BlockPool(3)
    a = pool.allocate(2)
    assert a.dtype == np.int32 and a.tolist() == [0, 1] and pool.num_free == 1
    pool.retain(a[:1])
    pool.release(a)  # block 0 is still held once
    assert pool.refcount(0) == 1 and pool.num_free == 2
    with pytest.raises(CacheFullError):
        pool.allocate(3)
    assert pool.num_free == 2  # nothing was taken
    with pytest.raises(ValueError):
        pool.release(np.array([1], np.int32))  # not held
    with pytest.raises(ValueError):
        pool.retain(np.array([2], np.int32))  # free: only held blocks can be shared
    assert pool.refcounts().tolist() == [1, 0, 0]  # the refused calls changed nothing
    pool.release(np.array([0], np.int32))
    assert sorted(pool.free_blocks().tolist()) == [0, 1, 2] and pool.num_free == 3


@dataclasses.dataclass
class Req:
    id: int
    tokens: list[int]
    computed: int = 0


def holders(kv: KVManager) -> Counter:
    return Counter(b for t in kv.block_tables().values() for b in t)


def check(kv: KVManager) -> None:
    """Every block is held exactly by the tables listing it, or free; none is both or neither."""
    held = holders(kv)
    counts = kv.pool.refcounts()
    assert {b: int(counts[b]) for b in held} == dict(held)
    assert sorted([*held, *kv.pool.free_blocks().tolist()]) == list(range(kv.num_blocks))


def test_allocate_is_all_or_nothing_and_free_gives_everything_back() -> None:
    kv = KVManager(5, 4)
    a, b = Req(0, list(range(10))), Req(1, list(range(30)))
    assert kv.blocks_needed(a.id, 10) == 3 and kv.allocate(a.id, 10)
    assert kv.block_table(a.id) == [0, 1, 2] and kv.allocate(a.id, 12) and kv.num_free == 2  # 12 still fits
    assert not kv.allocate(b.id, 30)  # needs 8 blocks, 2 free: nothing taken
    assert kv.num_free == 2 and kv.block_table(b.id) == []
    assert kv.allocate(b.id, 8)
    check(kv)
    kv.free(a)
    kv.free(b)
    assert kv.num_free == 5 and kv.block_tables() == {}
    check(kv)


def test_a_request_adopts_the_whole_computed_blocks_of_another() -> None:
    kv = KVManager(8, 4)
    prompt = list(range(100, 113))  # 13 tokens: 3 whole blocks
    donor, twin = Req(0, list(prompt)), Req(1, list(prompt))
    kv.allocate(donor.id, 13)
    assert kv.adopt_prefix(twin) is None  # the donor has computed nothing yet
    donor.computed = 13
    kv.mark_computed(donor)
    kv.allocate(twin.id, 4)  # its own first block, replaced by the adoption
    assert kv.adopt_prefix(twin) == 12  # 3 whole blocks (the last token is always computed)
    assert kv.block_table(twin.id) == kv.block_table(donor.id)[:3]
    assert [int(kv.pool.refcount(b)) for b in kv.block_table(donor.id)] == [2, 2, 2, 1]
    check(kv)
    twin.computed = 12
    kv.mark_computed(twin)
    kv.free(donor)  # the shared blocks stay with the twin
    assert [int(kv.pool.refcount(b)) for b in kv.block_table(twin.id)] == [1, 1, 1]
    check(kv)
    other = Req(2, prompt[:5] + [0] * 8)  # shares one block with the twin
    assert kv.adopt_prefix(other) == 4
    check(kv)
    kv.free(twin)
    kv.free(other)
    assert kv.num_free == 8


def test_prefix_sharing_can_be_switched_off() -> None:
    kv = KVManager(4, 4, prefix_sharing=False)
    a, b = Req(0, list(range(9)), computed=9), Req(1, list(range(9)))
    kv.allocate(a.id, 9)
    kv.mark_computed(a)
    assert kv.adopt_prefix(b) is None
    with pytest.raises(ValueError):
        KVManager(0, 4)

"""`serving.mesh.MeshScheduler`: requests land on DP ranks by load (ties: the lowest rank; a long prefix
hit wins), stay on their rank, preempt only within it, and a rolled-back step restores every rank. No
devices needed: the scheduler never touches a cache."""

from __future__ import annotations

import numpy as np
import pytest

from dsa_hybrid.serving.kv_manager import KVManager
from dsa_hybrid.serving.mesh import MeshScheduler, MeshSchedulerOutput
from dsa_hybrid.serving.sampling import SamplingParams
from dsa_hybrid.serving.scheduler import Request

PAGE = 4


def req(rid: int, n: int, new: int = 4, first: int = 0) -> Request:
    tokens = list(range(first, first + n))
    return Request(rid, tokens, n, new, SamplingParams(), np.random.default_rng(0))


def mesh_scheduler(dp: int, pages: int = 16, budget: int = 8, prefix: bool = True) -> MeshScheduler:
    kvs = [KVManager(pages, PAGE, prefix_sharing=prefix) for _ in range(dp)]
    return MeshScheduler(kvs, max_tokens_per_step=budget)


def test_requests_land_on_the_least_loaded_rank() -> None:
    s = mesh_scheduler(3)
    # Loads (tokens of waiting + running requests) after each add; ties go to the lowest rank.
    assert s.add(req(0, 10)) == 0  # [10, 0, 0]
    assert s.add(req(1, 3, first=100)) == 1  # [10, 3, 0]
    assert s.add(req(2, 5, first=200)) == 2  # [10, 3, 5]
    assert s.add(req(3, 4, first=300)) == 1  # [10, 7, 5]
    assert s.add(req(4, 5, first=400)) == 2  # [10, 7, 10]
    assert s.loads() == [10, 7, 10]
    assert s.add(req(5, 1, first=500)) == 1  # [10, 8, 10]
    assert s.add(req(6, 2, first=600)) == 1  # [10, 10, 10] after: tie broken by the lowest rank first
    assert s.add(req(7, 1, first=700)) == 0
    assert [s.rank_of(i) for i in range(8)] == [0, 1, 2, 1, 2, 1, 1, 0]
    assert sorted(s.live) == list(range(8))
    with pytest.raises(ValueError, match="already"):
        s.add(req(3, 2))
    with pytest.raises(KeyError):
        s.rank_of(99)


def test_finished_requests_stop_counting_and_requests_stay_on_their_rank() -> None:
    s = mesh_scheduler(2, budget=64)
    s.add(req(0, 8))
    s.add(req(1, 6, first=50))
    assert [s.rank_of(0), s.rank_of(1)] == [0, 1]
    for _ in range(6):  # run both to completion (max_new_tokens 4), a token per step each
        out = s.schedule()
        assert [ch.request_id for ch in out.per_rank[0].chunks] in ([0], [])
        assert [ch.request_id for ch in out.per_rank[1].chunks] in ([1], [])
        s.update_from_output(out, {ch.request_id: 7 for ch in out.chunks if ch.samples})
    assert not s.has_unfinished() and s.loads() == [0, 0]
    assert all(kv.num_free == kv.num_blocks for kv in s.kvs)
    assert s.add(req(2, 3)) == 0


def test_a_long_prefix_hit_wins_over_load() -> None:
    s = mesh_scheduler(2, budget=8)
    s.add(req(0, 20))  # rank 0
    out = s.schedule()  # computes 8 tokens of request 0 (two whole pages)
    s.update_from_output(out, {})
    out = s.schedule()
    s.update_from_output(out, {})  # 16 computed: four pages indexed on rank 0
    assert s.loads() == [20, 0]
    # Same first 16 tokens: the hit (16 >= one step's budget of 8) beats rank 1's empty load.
    assert s.add(req(1, 18)) == 0
    # A different prompt goes by load.
    assert s.add(req(2, 18, first=1000)) == 1
    # A hit shorter than one step's budget does not win.
    s2 = mesh_scheduler(2, budget=32)
    s2.add(req(0, 20))
    out = s2.schedule()
    s2.update_from_output(
        out, {ch.request_id: 1 for ch in out.chunks if ch.samples}
    )  # all 20 prompt tokens computed, 5 pages indexed
    assert s2.add(req(1, 18)) == 1
    # The lookups left nothing behind in the indexes of the ranks not chosen.
    assert s2.kvs[0].prefix is not None and s2.kvs[0].prefix.longest_match(req(9, 3, first=900)) is None


def test_preemption_stays_within_a_rank() -> None:
    # 3 pages of 4 tokens per rank: requests 0 and 2 (rank 0) each grow to 11 tokens, 3 pages.
    s = mesh_scheduler(2, pages=3, budget=16)
    assert s.add(req(0, 2, new=9)) == 0
    assert s.add(req(1, 3, new=1, first=50)) == 1  # loads [2, 0]
    assert s.add(req(2, 2, new=9, first=100)) == 0  # loads [2, 3]
    preempted: list[int] = []
    for _ in range(30):
        if not s.has_unfinished():
            break
        out = s.schedule()
        preempted += out.preempted
        for r, o in enumerate(out.per_rank):
            assert all(s.rank_of(ch.request_id) == r for ch in o.chunks)
            assert all(max(ch.block_table, default=-1) < 3 for ch in o.chunks)  # the rank's own pages
        s.update_from_output(out, {ch.request_id: 1 for ch in out.chunks if ch.samples})
    assert not s.has_unfinished()
    assert preempted == [2]  # the younger request on the crowded rank gave way, nothing else
    assert all(kv.num_free == kv.num_blocks for kv in s.kvs)


def test_a_rolled_back_step_restores_every_rank() -> None:
    s = mesh_scheduler(2, pages=4, budget=4)
    for i, n in enumerate((9, 7, 5)):
        s.add(req(i, n, first=100 * i))
    s.update_from_output(s.schedule(), {})
    before = s.snapshot()
    tables = [kv.block_tables() for kv in s.kvs]
    refs = [kv.pool.refcounts().copy() for kv in s.kvs]
    progress = {r.id: (r.computed, len(r.tokens)) for r in s.live.values()}
    out = s.schedule()  # allocates on both ranks; then the step "fails"
    assert isinstance(out, MeshSchedulerOutput) and len(out.per_rank) == 2
    assert [kv.block_tables() for kv in s.kvs] != tables
    s.restore(before)
    assert [kv.block_tables() for kv in s.kvs] == tables
    assert all(np.array_equal(kv.pool.refcounts(), ref) for kv, ref in zip(s.kvs, refs, strict=True))
    assert {r.id: (r.computed, len(r.tokens)) for r in s.live.values()} == progress
    with pytest.raises(TypeError, match="state"):
        s.restore(s.ranks[0].snapshot())
    with pytest.raises(TypeError, match="out"):
        s.update_from_output(s.ranks[0].schedule(), {})

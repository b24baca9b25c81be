"""The scheduler alone, with a KV manager and no model: admission, the token budget, chunked prefill,
who is preempted, and the stop conditions with their finish reasons (tokens fed in by hand)."""

from __future__ import annotations

import numpy as np
import pytest

from dsa_hybrid.serving.kv_manager import KVManager
from dsa_hybrid.serving.sampling import SamplingParams
from dsa_hybrid.serving.scheduler import Request, Scheduler, SchedulerOutput


def request(rid: int, n_prompt: int, max_new: int = 4, **sp) -> Request:
    return Request(rid, list(range(1, n_prompt + 1)), n_prompt, max_new, SamplingParams(**sp), np.random.default_rng(0))


def commit(s: Scheduler, out: SchedulerOutput, token: int = 0) -> tuple[dict, list]:
    return s.update_from_output(out, {c.request_id: token for c in out.chunks if c.samples})


def test_chunked_prefill_within_the_budget_then_decodes() -> None:
    s = Scheduler(KVManager(16, 4), max_tokens_per_step=8)
    s.add(request(0, 10))
    s.add(request(1, 3))
    out = s.schedule()
    assert [(c.request_id, c.start, c.count, c.samples) for c in out.chunks] == [(0, 0, 8, False)]
    assert out.num_tokens == 8 and out.prompt_tokens == 8 and not out.decode_only
    assert out.chunks[0].block_table == [0, 1]
    commit(s, out)
    out = s.schedule()  # the rest of request 0's prompt, then all of request 1's
    assert [(c.request_id, c.start, c.count, c.samples) for c in out.chunks] == [(0, 8, 2, True), (1, 0, 3, True)]
    new, done = commit(s, out, token=42)
    assert new == {0: [42], 1: [42]} and done == []
    out = s.schedule()
    assert out.decode_only and [(c.request_id, c.start, c.count) for c in out.chunks] == [(0, 10, 1), (1, 3, 1)]


def test_only_younger_requests_give_way() -> None:
    """Two requests that each grow to the whole pool (4 blocks of 4): both start, then the younger is
    preempted (its blocks back, computed reset, first in the waiting queue); the older never is."""
    kv = KVManager(4, 4)
    s = Scheduler(kv, max_tokens_per_step=64)
    old, young = request(0, 5, max_new=10), request(1, 5, max_new=10)
    s.add(old)
    s.add(young)
    preempted = []
    while old.finish_reason is None:
        out = s.schedule()
        assert s.running[0] is old and 0 not in out.preempted
        preempted += out.preempted
        commit(s, out)
    assert old.finish_reason == "length" and len(old.output) == 10
    assert preempted and set(preempted) == {1} and young.computed == 0 and s.waiting == [young]
    while s.has_unfinished():
        commit(s, s.schedule())
    assert young.finish_reason == "length" and kv.num_free == 4


def test_stop_conditions_and_finish_reasons() -> None:
    s = Scheduler(KVManager(32, 4), max_tokens_per_step=64, eos_token_ids=[9])
    reqs = [
        request(0, 2, max_new=3),  # runs to its length
        request(1, 2, max_new=10),  # meets EOS
        request(2, 2, max_new=10, ignore_eos=True, stop_token_ids=[7]),  # past EOS, stops at 7
        request(3, 2, max_new=10, stop=[[5, 6]]),  # a stop sequence of two tokens
        request(4, 2, max_new=10),  # aborted
    ]
    for r in reqs:
        s.add(r)
    feed = {0: [1, 2, 3], 1: [1, 9], 2: [9, 7], 3: [5, 1, 5, 6]}
    finished = {}
    for step in range(4):
        out = s.schedule()
        sampled = {c.request_id: feed.get(c.request_id, [1] * 9)[step] for c in out.chunks if c.samples}
        _, done = s.update_from_output(out, sampled)
        finished.update({o.id: o for o in done})
        if step == 1:
            finished[4] = s.abort(4).to_output()
    reasons = {i: o.finish_reason for i, o in finished.items()}
    assert reasons == {0: "length", 1: "eos", 2: "stop", 3: "stop", 4: "abort"}
    assert finished[1].output == [1, 9] and finished[2].output == [9, 7] and finished[3].output == [5, 1, 5, 6]
    assert finished[4].output == [1, 1] and not s.has_unfinished() and s.kv.num_free == 32
    with pytest.raises(KeyError):
        s.abort(4)

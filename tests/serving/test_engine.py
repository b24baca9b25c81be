"""`Engine`: continuous batching, chunked prefill, prefix sharing, page accounting, preemption, abort,
placement and sampling. A hypothesis state machine adds and aborts requests and steps the engine at
random; outputs must equal each prompt's own greedy generation (batching, chunking, sharing and
preemption change nothing), no request is lost or duplicated, and every page is held exactly by the
requests that list it."""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dsa_hybrid import DSAConfig
from dsa_hybrid.models.causal_lm import ModelParams, generate_greedy
from dsa_hybrid.serving.engine import Engine
from dsa_hybrid.serving.placement import PlacementCosts
from dsa_hybrid.serving.sampling import SamplingParams

CFG = DSAConfig.tiny()
PARAMS = ModelParams.random(CFG, seed=3)
PROMPTS = [np.random.default_rng(i).integers(0, CFG.vocab_size, n).tolist() for i, n in enumerate((3, 17, 25, 8, 40))]
# Prompts sharing a prefix with PROMPTS[4]: 33 of its tokens then others, and all 40 of them.
PROMPTS += [PROMPTS[4][:33] + [5, 6, 7, 8, 9], list(PROMPTS[4])]
MAX_NEW = 4
KW = dict(latent_kind="f32", indexer="exact", backend="xla")


@functools.cache
def expected(i: int) -> list[int]:
    return generate_greedy(PARAMS, CFG, PROMPTS[i], MAX_NEW, page_size=8, **KW)


class EngineMachine(RuleBasedStateMachine):
    # Two pool sizes only: every cache shape is a separate compilation.
    @initialize(pages=st.sampled_from([7, 12]), budget=st.sampled_from([4, 64]))
    def start(self, pages: int, budget: int) -> None:
        self.engine = Engine(
            PARAMS, CFG, num_pages=pages, page_size=8, max_tokens_per_step=budget, max_model_len=64, **KW
        )
        self.prompt_of: dict[int, int] = {}
        self.streamed: dict[int, list[int]] = {}
        self.aborted: set[int] = set()

    @rule(i=st.integers(0, len(PROMPTS) - 1))
    def add(self, i: int) -> None:
        rid = self.engine.add_request(PROMPTS[i], MAX_NEW)
        assert rid not in self.prompt_of
        self.prompt_of[rid] = i
        self.streamed[rid] = []

    @precondition(lambda self: self.engine.has_unfinished())
    @rule()
    def step(self) -> None:
        for rid, toks in self.engine.step().items():
            self.streamed[rid].extend(toks)

    @precondition(lambda self: self.engine.has_unfinished())
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        live = [r.id for r in self.engine.running + self.engine.waiting]
        rid = data.draw(st.sampled_from(live))
        self.engine.abort(rid)
        self.aborted.add(rid)

    @invariant()
    def pages_are_accounted_for(self) -> None:
        e = self.engine
        holders = Counter(p for r in e.running + e.waiting for p in r.pages)
        assert all(e.pool.refcount(p) == n for p, n in holders.items())  # shared pages counted per holder
        assert sorted([*holders, *e.free_pages]) == list(range(e.num_pages))
        for r in e.running + e.waiting:
            assert len(set(r.pages)) == len(r.pages) and len(r.pages) * 8 >= r.computed

    @invariant()
    def every_request_is_somewhere_once(self) -> None:
        e = self.engine
        ids = [r.id for r in e.running + e.waiting] + list(e.finished)
        assert len(ids) == len(set(ids))
        assert set(ids) | self.aborted == set(self.prompt_of)

    @invariant()
    def outputs_are_the_greedy_ones(self) -> None:
        for rid, r in self.engine.finished.items():
            assert r.output == expected(self.prompt_of[rid]) == self.streamed[rid]

    def teardown(self) -> None:
        if hasattr(self, "engine"):
            while self.engine.has_unfinished():
                self.step()
            self.outputs_are_the_greedy_ones()
            assert len(self.engine.free_pages) == self.engine.num_pages


TestEngine = EngineMachine.TestCase
TestEngine.settings = settings(max_examples=12, stateful_step_count=25, deadline=None)


def test_generate_streams_and_matches_greedy() -> None:
    engine = Engine(PARAMS, CFG, num_pages=10, page_size=8, max_tokens_per_step=16, max_model_len=64, **KW)
    seen: dict[int, list[int]] = {}
    outs = engine.generate(PROMPTS, MAX_NEW, on_tokens=lambda rid, toks: seen.setdefault(rid, []).extend(toks))
    assert outs == [expected(i) for i in range(len(PROMPTS))]
    assert [seen[i] for i in range(len(PROMPTS))] == outs
    assert engine.preemptions > 0  # 10 pages cannot hold all five at once


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([], 4), "non-empty"),
        (([1, 2], 0), "max_new_tokens"),
        (([1] * 60, 10), "max_model_len"),
        (([300], 2), "vocabulary|token_ids must lie"),
    ],
)
def test_bad_requests(args, match: str) -> None:
    engine = Engine(PARAMS, CFG, num_pages=10, page_size=8, max_model_len=64, **KW)
    with pytest.raises(ValueError, match=match):
        engine.add_request(*args)
    with pytest.raises(KeyError):
        engine.abort(99)


def test_host_placement_gives_the_device_tokens_and_frees_its_sequences() -> None:
    """The indexer on the host (Rust, one IndexerKeyCache per layer) against the device (FP8 both ways);
    a pool of 5 pages of 16 forces preemptions, whose host sequences must be freed and rebuilt."""
    kw = dict(num_pages=5, page_size=16, max_tokens_per_step=16, max_model_len=64, backend="xla")
    device = Engine(PARAMS, CFG, placement="device", **kw).generate(PROMPTS, MAX_NEW)
    host_engine = Engine(PARAMS, CFG, placement="host", host_threads=1, **kw)
    assert host_engine.generate(PROMPTS, MAX_NEW) == device
    assert host_engine.preemptions > 0
    assert all(h.sequence_ids() == [] and h.num_free_blocks == 5 for h in host_engine.host_caches)
    with pytest.raises(ValueError, match="placement"):
        Engine(PARAMS, CFG, placement="gpu")


def test_two_requests_that_cannot_coexist_both_finish() -> None:
    """Each needs 6 of the 7 pages: the younger gives way to the older, which is never preempted and
    never recomputed. (A policy preempting "the most recently admitted" bounced them back and forth:
    9 preemptions and 29 steps here, against 3 and 12.)"""
    engine = Engine(PARAMS, CFG, num_pages=7, page_size=8, max_tokens_per_step=16, max_model_len=64, **KW)
    a = engine.add_request(PROMPTS[4], MAX_NEW)
    b = engine.add_request(PROMPTS[4], MAX_NEW)
    steps = 0
    while engine.has_unfinished() and steps < 40:
        engine.step()
        steps += 1
        assert a in engine.finished or engine.running[0].id == a  # the older request is never preempted
    assert not engine.has_unfinished() and steps <= 12 and engine.preemptions <= 3
    assert engine.finished[a].output == engine.finished[b].output == expected(4)
    assert len(engine.free_pages) == 7


def test_shared_prefixes_are_adopted_not_recomputed() -> None:
    """PROMPTS[6] is PROMPTS[4] again and PROMPTS[5] shares its first 33 tokens: once PROMPTS[4]'s pages
    are computed the others adopt its whole pages (32 tokens: 4 pages of 8; the last prompt token is
    always computed), and every output is unchanged."""
    kw = dict(num_pages=24, page_size=8, max_tokens_per_step=16, max_model_len=64, **KW)
    prompts = [PROMPTS[4], PROMPTS[5], PROMPTS[6]]
    unshared = Engine(PARAMS, CFG, prefix_sharing=False, **kw)
    shared = Engine(PARAMS, CFG, **kw)
    want = [expected(4), expected(5), expected(6)]
    assert unshared.generate(prompts, MAX_NEW) == want == shared.generate(prompts, MAX_NEW)
    assert unshared.stats.shared_tokens == 0
    assert shared.stats.shared_tokens == 2 * 32
    assert shared.stats.prompt_tokens_computed == unshared.stats.prompt_tokens_computed - 2 * 32
    assert len(shared.free_pages) == 24


def test_host_placement_forks_shared_prefixes() -> None:
    """On the host the adopting request's indexer sequence is a `fork` of the donor's, truncated."""
    kw = dict(num_pages=12, page_size=16, max_tokens_per_step=16, max_model_len=64, backend="xla")
    prompts = [PROMPTS[4], PROMPTS[6], PROMPTS[5]]
    device = Engine(PARAMS, CFG, placement="device", **kw).generate(prompts, MAX_NEW)
    host_engine = Engine(PARAMS, CFG, placement="host", host_threads=1, **kw)
    assert host_engine.generate(prompts, MAX_NEW) == device
    assert host_engine.stats.shared_tokens > 0
    assert all(h.sequence_ids() == [] and h.num_free_blocks == 12 for h in host_engine.host_caches)


# Host when the device would scan 4× more keys than the rows can see: decodes and prefill chunks of
# short prompts go to the host, those of long ones to the device, so a run switches back and forth.
SWITCHING = PlacementCosts(host_fixed=0.0, host_per_key=4.0, device_fixed=0.0, device_per_key=1.0)


def test_auto_placement_switches_and_keeps_both_indexer_caches_identical() -> None:
    kw = dict(num_pages=12, page_size=16, max_tokens_per_step=24, max_model_len=64, backend="xla")
    device = Engine(PARAMS, CFG, placement="device", **kw).generate(PROMPTS, MAX_NEW)
    auto = Engine(PARAMS, CFG, placement="auto", cost_model=SWITCHING, host_threads=1, **kw)
    for p in PROMPTS:
        auto.add_request(p, MAX_NEW)
    while auto.has_unfinished():
        auto.step()
        for r in (r for r in auto.running if r.computed):  # every computed key is in both caches, byte for byte
            pos = np.arange(r.computed)
            slots = np.asarray(r.pages)[pos // 16] * 16 + pos % 16
            for layer, host in zip(auto.caches, auto.host_caches, strict=True):
                codes, scales = host.gather(r.id, pos)
                np.testing.assert_array_equal(
                    np.asarray(layer.index.codes).view(np.uint8).reshape(-1, 32)[slots], codes
                )
                np.testing.assert_array_equal(np.asarray(layer.index.scales).reshape(-1)[slots], scales)
    assert [auto.finished[i].output for i in range(len(PROMPTS))] == device
    assert auto.stats.steps_by_placement["host"] > 0 and auto.stats.steps_by_placement["device"] > 0


def test_auto_placement_measures_a_cost_model_at_startup() -> None:
    engine = Engine(PARAMS, CFG, placement="auto", num_pages=8, page_size=16, max_model_len=128, backend="xla")
    costs = engine.cost_model
    assert isinstance(costs, PlacementCosts)
    assert min(costs.host_fixed, costs.host_per_key, costs.device_fixed, costs.device_per_key) >= 0
    assert costs.choose(10**9, 8, 10**9) == "host" or costs.device_per_key == 0  # the device scans 8× more
    with pytest.raises(ValueError, match="fp8"):
        Engine(PARAMS, CFG, placement="auto", indexer="exact", cost_model=SWITCHING)
    with pytest.raises(ValueError, match="multiple of 16"):
        Engine(PARAMS, CFG, placement="host", page_size=8)


def test_sampled_outputs_depend_only_on_the_seed() -> None:
    """Temperature / top-p sampling from per-request seeded generators: the same seeds give the same tokens
    whatever the batching and preemption; other seeds give other tokens."""
    sp = [SamplingParams(temperature=1.5, top_p=0.95, seed=i) for i in range(len(PROMPTS))]

    def run(pages: int, budget: int, seeds: list[SamplingParams]) -> tuple[list[list[int]], int]:
        e = Engine(PARAMS, CFG, num_pages=pages, page_size=8, max_tokens_per_step=budget, max_model_len=64, **KW)
        ids = [e.add_request(p, 6, s) for p, s in zip(PROMPTS, seeds, strict=True)]
        while e.has_unfinished():
            e.step()
        return [e.finished[i].output for i in ids], e.preemptions

    roomy, no_preempt = run(40, 64, sp)
    tight, preempted = run(8, 4, sp)
    assert roomy == tight and no_preempt == 0 and preempted > 0
    other, _ = run(40, 64, [dataclasses.replace(s, seed=s.seed + 100) for s in sp])
    assert other != roomy
    assert roomy != [generate_greedy(PARAMS, CFG, p, 6, page_size=8, **KW) for p in PROMPTS]


def test_glm_shared_layers_on_every_placement() -> None:
    """GLM-5 style: layer 1 reuses layer 0's selection and has no indexer cache on either side. Host and
    auto placements give the device's tokens, which are the model's own greedy generation."""
    cfg = DSAConfig.tiny("glm_moe_dsa").replace(num_hidden_layers=3, first_k_dense_replace=3,
                                                indexer_types=("full", "shared", "full"))  # fmt: skip
    params = ModelParams.random(cfg, seed=5)
    prompts = PROMPTS[3:6]
    want = [generate_greedy(params, cfg, p, MAX_NEW, page_size=16, backend="xla") for p in prompts]
    kw = dict(num_pages=12, page_size=16, max_tokens_per_step=16, max_model_len=64, backend="xla", host_threads=1)
    for placement in ("device", "host", "auto"):
        engine = Engine(params, cfg, placement=placement, cost_model=SWITCHING, **kw)
        assert engine.generate(prompts, MAX_NEW) == want, placement
        if placement != "device":
            assert engine.host_caches[1] is None and engine.host_caches[0] is not None

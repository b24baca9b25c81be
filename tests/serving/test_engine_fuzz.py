"""A hypothesis fuzz of the engine as users and faults attack it: random sequences of good requests
(greedy and seeded sampling), malformed requests, aborts (of live and of unknown ids), steps, and steps
that fail (an exception before the runner runs, half-way through the commit, a KeyboardInterrupt after
the device forward consumed its donated caches).

Invariants after every operation: every block is held exactly by the live requests' tables that list it
(the pool's reference counts) or free; every request is in exactly one place (waiting, running,
finished or aborted) and none is lost; a refused request or a failed step changed nothing it should not
have; every finished request's output equals that of the same request served alone in a fresh engine
(tokens do not depend on batching, chunking, preemption, sharing, refusals or failures). Bounded: a tiny
model, one pool and one budget (few compilations), `max_examples` × `stateful_step_count` small."""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dsa_hybrid import DSAConfig
from dsa_hybrid.models.causal_lm import ModelParams
from dsa_hybrid.serving import runner as runner_mod
from dsa_hybrid.serving.engine import Engine
from dsa_hybrid.serving.sampling import SamplingParams

CFG = DSAConfig.tiny()
V = CFG.vocab_size
PARAMS = ModelParams.random(CFG, seed=5)
ENGINE_KW: dict[str, Any] = dict(num_pages=9, page_size=8, max_tokens_per_step=12, max_model_len=48,
                                 latent_kind="f32", indexer="exact", backend="xla")  # fmt: skip
_base = np.random.default_rng(0).integers(0, V, 30).tolist()
PROMPTS = [_base[:n] for n in (3, 17, 30)] + [
    _base[:17] + [1, 2, 3],
    np.random.default_rng(1).integers(0, V, 9).tolist(),
]
SAMPLINGS = [
    None,
    SamplingParams(temperature=1.2, top_p=0.9, seed=11),
    SamplingParams(temperature=0.7, top_k=5, seed=3),
]
NEW = 3
BAD: list[tuple[tuple, dict, type[Exception]]] = [
    (([], NEW), {}, ValueError),
    (([1.5, 2], NEW), {}, TypeError),
    (([V], NEW), {}, ValueError),
    (([1, 2], 0), {}, ValueError),
    (([1] * 48, 1), {}, ValueError),
    (([1] * 70, None), {}, ValueError),  # more than the pool (72 tokens) can ever hold with max_model_len
    (([1, 2], NEW, {"temperature": 1.0}), {}, TypeError),
    (([1, 2], NEW, SamplingParams(stop_token_ids=[V + 1])), {}, ValueError),
    ((np.array([[1, 2]]), NEW), {}, TypeError),
    (([1, 2], NEW), {"request_id": -5}, ValueError),
]


@functools.cache
def alone(prompt: int, sampling: int) -> list[int]:
    """The request served alone in a fresh engine of the same settings."""
    e = Engine(PARAMS, CFG, **ENGINE_KW)
    rid = e.add_request(PROMPTS[prompt], NEW, SAMPLINGS[sampling])
    while e.has_unfinished():
        e.step()
    return e.finished[rid].output


def snapshot(e: Engine) -> tuple:
    return (
        [(r.id, r.computed, list(r.tokens)) for r in e.running],
        [(r.id, r.computed, list(r.tokens)) for r in e.waiting],
        e.kv.block_tables(),
        e.pool.refcounts().tolist(),
    )


class Injected(Exception):
    pass


class EngineFuzz(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.engine = Engine(PARAMS, CFG, **ENGINE_KW)
        self.kind: dict[int, tuple[int, int]] = {}  # request id → (prompt, sampling)
        self.streamed: dict[int, list[int]] = {}
        self.aborted: set[int] = set()

    # ----- requests ------------------------------------------------------------------------------
    @rule(i=st.integers(0, len(PROMPTS) - 1), s=st.integers(0, len(SAMPLINGS) - 1))
    def add(self, i: int, s: int) -> None:
        rid = self.engine.add_request(PROMPTS[i], NEW, SAMPLINGS[s])
        assert rid not in self.kind
        self.kind[rid], self.streamed[rid] = (i, s), []

    @rule(case=st.sampled_from(BAD))
    def add_bad(self, case: tuple[tuple, dict, type[Exception]]) -> None:
        args, kwargs, exc = case
        before = snapshot(self.engine)
        try:
            self.engine.add_request(*args, **kwargs)
        except exc:
            pass
        else:
            raise AssertionError(f"add_request{args} was accepted")
        assert snapshot(self.engine) == before

    @precondition(lambda self: self.engine.has_unfinished())
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        live = [r.id for r in self.engine.running + self.engine.waiting]
        rid = data.draw(st.sampled_from(live))
        out = self.engine.abort(rid)
        assert out.finish_reason == "abort"
        self.aborted.add(rid)

    @rule(rid=st.integers(1000, 1010))
    def abort_unknown(self, rid: int) -> None:
        before = snapshot(self.engine)
        try:
            self.engine.abort(rid)
        except KeyError:
            pass
        else:
            raise AssertionError("an unknown id was aborted")
        assert snapshot(self.engine) == before

    # ----- steps ---------------------------------------------------------------------------------
    @precondition(lambda self: self.engine.has_unfinished())
    @rule()
    def step(self) -> None:
        for rid, toks in self.engine.step().items():
            self.streamed[rid].extend(toks)

    @precondition(lambda self: self.engine.has_unfinished())
    @rule(where=st.sampled_from(["execute", "commit", "donated"]))
    def failing_step(self, where: str) -> None:
        e = self.engine
        before = snapshot(e)
        failed = e.stats.failed_steps
        undo: list[tuple[Any, str, Any]] = []

        def patch(obj: Any, name: str, value: Any) -> None:
            undo.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)

        if where == "execute":
            patch(e.runner, "execute", lambda out: (_ for _ in ()).throw(Injected()))
        elif where == "commit":
            real_mark = e.kv.mark_computed
            patch(e.kv, "mark_computed", lambda r: (real_mark(r), (_ for _ in ()).throw(Injected()))[1])
        else:
            real = runner_mod.forward_jit

            def interrupted(*args: Any, **kw: Any) -> Any:
                real(*args, **kw)
                raise KeyboardInterrupt

            patch(runner_mod, "forward_jit", interrupted)
        try:
            new = e.step()
        except (Injected, KeyboardInterrupt):
            new = None
        finally:
            for obj, name, value in reversed(undo):
                if obj is e.runner or obj is e.kv:
                    delattr(obj, name)  # the instance attribute goes; the class's method shows again
                else:
                    setattr(obj, name, value)
        if new is None:
            assert e.stats.failed_steps == failed + 1
            if not e.runner.caches_lost() and where != "donated":
                assert snapshot(e) == before
        else:  # nothing ran (e.g. the device forward was not used by this step)
            for rid, toks in new.items():
                self.streamed[rid].extend(toks)

    # ----- invariants ----------------------------------------------------------------------------
    @invariant()
    def blocks_are_accounted_for(self) -> None:
        e = self.engine
        live = e.running + e.waiting
        holders = Counter(p for r in live for p in e.kv.block_table(r.id))
        assert e.pool.refcounts().tolist() == [holders[b] for b in range(e.num_pages)]
        assert set(e.kv.block_tables()) <= {r.id for r in live}

    @invariant()
    def no_request_is_lost(self) -> None:
        e = self.engine
        ids = [r.id for r in e.running + e.waiting] + list(e.finished)
        assert len(ids) == len(set(ids)) and set(ids) | self.aborted == set(self.kind)

    @invariant()
    def outputs_are_those_of_each_request_alone(self) -> None:
        for rid, r in self.engine.finished.items():
            want = alone(*self.kind[rid])
            if rid in self.aborted:
                assert r.output == want[: len(r.output)] == self.streamed[rid]
            else:
                assert r.output == want == self.streamed[rid], (rid, self.kind[rid])

    def teardown(self) -> None:
        if hasattr(self, "engine"):
            while self.engine.has_unfinished():
                self.step()
            self.outputs_are_those_of_each_request_alone()
            assert len(self.engine.free_pages) == self.engine.num_pages


TestEngineFuzz = EngineFuzz.TestCase
TestEngineFuzz.settings = settings(
    max_examples=6, stateful_step_count=18, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

"""The engine's bad-input catalogue and its failing steps.

Refusals: a table of bad `add_request` calls and `SamplingParams`, each with the exception type and a
fragment of its message (which names the argument), each checked to leave the engine exactly as it was
(queues, every request's progress and tokens, block tables, the pool's reference counts and free list);
then the requests that were in flight all along finish with the tokens of an undisturbed run.

Failing steps: faults injected at a chosen step (an exception before the runner touches anything, after
the device forward consumed its donated caches, a KeyboardInterrupt in the middle of a host forward, a
failure in the host cache's write, a failure half-way through the commit, SIGINT during the commit, one
request's logits turning NaN). Every failed step leaves every request and page as before it, the next
steps run, and the outputs equal those of the same requests in an undisturbed run (sampled requests
included: their generators go back too); a request whose own logits fail ends alone with reason
"error" and nobody else's tokens change.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from dsa_hybrid import DSAConfig
from dsa_hybrid.host.cache import IndexerKeyCache
from dsa_hybrid.layers import dsa_attention as layer_mod
from dsa_hybrid.models.causal_lm import ModelParams
from dsa_hybrid.serving import runner as runner_mod
from dsa_hybrid.serving import sampling as sampling_mod
from dsa_hybrid.serving.engine import Engine
from dsa_hybrid.serving.sampling import SamplingError, SamplingParams

CFG = DSAConfig.tiny()
V = CFG.vocab_size
PARAMS = ModelParams.random(CFG, seed=3)
KW: dict[str, Any] = dict(latent_kind="f32", indexer="exact", backend="xla")
ENGINE_KW: dict[str, Any] = dict(num_pages=10, page_size=8, max_tokens_per_step=16, max_model_len=64, **KW)
HOST_KW: dict[str, Any] = dict(num_pages=12, page_size=16, max_tokens_per_step=16, max_model_len=64,
                               backend="xla", placement="host", host_threads=1, latent_kind="f32")  # fmt: skip
PROMPTS = [np.random.default_rng(10 + i).integers(0, V, n).tolist() for i, n in enumerate((5, 19, 11))]
NEW = 4


def state(e: Engine) -> dict[str, Any]:
    """Everything a refusal or a failed step must leave as it was."""
    return {
        "running": [(r.id, r.computed, list(r.tokens), r.finish_reason) for r in e.running],
        "waiting": [(r.id, r.computed, list(r.tokens), r.finish_reason) for r in e.waiting],
        "live": sorted(e.scheduler.live),
        "tables": e.kv.block_tables(),
        "refcounts": e.pool.refcounts().tolist(),
        "free": sorted(e.free_pages),
        "finished": list(e.finished),
    }


# ----- refusals ----------------------------------------------------------------------------------------
# (id, args, kwargs, exception, message fragment); the engine has max_model_len 64 and 10 pages of 8.
BAD_REQUESTS: list[tuple[str, tuple, dict, type[Exception], str]] = [
    ("empty", ([], 4), {}, ValueError, "non-empty"),
    ("empty-array", (np.zeros(0, np.int32), 4), {}, ValueError, "non-empty"),
    ("string", ("hello", 4), {}, TypeError, "token_ids"),
    ("bytes", (b"\x01\x02", 4), {}, TypeError, "token_ids"),
    ("int", (7, 4), {}, TypeError, "token_ids"),
    ("none", (None, 4), {}, TypeError, "token_ids"),
    ("float-ids", ([1.5, 2], 4), {}, TypeError, "token_ids must be integers"),
    ("float-exact", ([1.0, 2], 4), {}, TypeError, "token_ids must be integers"),
    ("bool-ids", ([True, 1], 4), {}, TypeError, "token_ids must be integers"),
    ("str-ids", (["1", "2"], 4), {}, TypeError, "token_ids must be integers"),
    ("nested", ([[1, 2], [3, 4]], 4), {}, TypeError, "token_ids must be integers"),
    ("float-array", (np.array([1.0, 2.0]), 4), {}, TypeError, "integer dtype"),
    ("bool-array", (np.array([True, False]), 4), {}, TypeError, "integer dtype"),
    ("2d-array", (np.array([[1, 2]]), 4), {}, TypeError, "1-D"),
    ("negative-id", ([3, -1], 4), {}, ValueError, "vocabulary"),
    ("id-vocab", ([3, V], 4), {}, ValueError, "vocabulary"),
    ("id-huge", ([2**70], 4), {}, ValueError, "vocabulary"),
    ("id-uint64", (np.array([2**63 + 5], np.uint64), 4), {}, ValueError, "vocabulary"),
    ("new-zero", ([1, 2], 0), {}, ValueError, "max_new_tokens"),
    ("new-negative", ([1, 2], -3), {}, ValueError, "max_new_tokens"),
    ("new-float", ([1, 2], 2.5), {}, TypeError, "max_new_tokens"),
    ("new-bool", ([1, 2], True), {}, TypeError, "max_new_tokens"),
    ("new-str", ([1, 2], "4"), {}, TypeError, "max_new_tokens"),
    ("new-huge", ([1, 2], 10**30), {}, ValueError, "max_model_len"),
    ("prompt-fills-max-len", ([1] * 64, None), {}, ValueError, "no room"),
    ("prompt-past-max-len", ([1] * 100, 1), {}, ValueError, "no room"),
    ("total-past-max-len", ([1] * 60, 10), {}, ValueError, "max_model_len"),
    ("sampling-dict", ([1, 2], 4, {"temperature": 1.0}), {}, TypeError, "sampling must be a SamplingParams"),
    ("sampling-str", ([1, 2], 4, "greedy"), {}, TypeError, "sampling must be a SamplingParams"),
    ("stop-id-vocab", ([1, 2], 4, SamplingParams(stop_token_ids=[V])), {}, ValueError, "vocabulary"),
    ("stop-seq-vocab", ([1, 2], 4, SamplingParams(stop=[[1, V + 5]])), {}, ValueError, "vocabulary"),
    ("rid-live", ([1, 2], 4), {"request_id": 0}, ValueError, "already waiting or running"),
    ("rid-negative", ([1, 2], 4), {"request_id": -1}, ValueError, "request_id"),
    ("rid-float", ([1, 2], 4), {"request_id": 1.0}, TypeError, "request_id"),
    ("rid-bool", ([1, 2], 4), {"request_id": False}, TypeError, "request_id"),
    ("rid-str", ([1, 2], 4), {"request_id": "a"}, TypeError, "request_id"),
]


@pytest.fixture(scope="module")
def busy() -> Engine:
    """An engine with two requests in flight (the first mid-prefill after one step)."""
    e = Engine(PARAMS, CFG, **ENGINE_KW)
    assert [e.add_request(PROMPTS[i], NEW) for i in (1, 2)] == [0, 1]
    e.step()
    assert e.running and e.running[0].computed == 16
    return e


@pytest.mark.parametrize(("args", "kwargs", "exc", "match"), [c[1:] for c in BAD_REQUESTS],
                         ids=[c[0] for c in BAD_REQUESTS])  # fmt: skip
def test_a_bad_request_is_refused_alone_and_changes_nothing(
    busy: Engine, args: tuple, kwargs: dict, exc: type[Exception], match: str
) -> None:
    before = state(busy)
    with pytest.raises(exc, match=match):
        busy.add_request(*args, **kwargs)
    assert state(busy) == before


def test_the_requests_in_flight_finish_untouched_by_the_refusals(busy: Engine) -> None:
    """After the whole table (or alone): the next id is the next one (no refusal consumed an id), and both
    requests in flight give their own greedy tokens."""
    rid = busy.add_request(PROMPTS[0], NEW)
    assert rid == 2
    while busy.has_unfinished():
        busy.step()
    outs = {i: busy.finished[i].output for i in (0, 1, 2)}
    want = undisturbed(False)  # the same prompts batched otherwise: the same tokens
    assert outs == {0: want[1], 1: want[2], 2: want[0]}
    assert len(busy.free_pages) == busy.num_pages and busy.stats.failed_steps == 0


def test_a_request_that_could_never_fit_the_pool_is_refused_at_once() -> None:
    e = Engine(PARAMS, CFG, **{**ENGINE_KW, "num_pages": 4})  # 32 tokens of pages, max_model_len 64
    with pytest.raises(ValueError, match="more pages than the pool has"):
        e.add_request([1] * 30, 5)
    with pytest.raises(ValueError, match="more pages than the pool has"):
        e.add_request([1] * 40)  # None: up to the pool, and the prompt alone does not fit
    assert e.add_request([1] * 30) == 0 and e.waiting[0].max_new_tokens == 2  # None: what the pool allows


@pytest.mark.parametrize(
    "token_ids",
    [[1, 2, 3], (1, 2, 3), range(1, 4), np.array([1, 2, 3], np.int32), np.array([1, 2, 3], np.uint8),
     [np.int64(1), np.int16(2), 3], (t for t in [1, 2, 3])],
    ids=["list", "tuple", "range", "int32", "uint8", "numpy-scalars", "generator"],
)  # fmt: skip
def test_good_prompts_of_every_integer_kind_are_taken(token_ids: Any) -> None:
    e = Engine(PARAMS, CFG, **ENGINE_KW)
    rid = e.add_request(token_ids, np.int64(3), request_id=np.int32(5))
    assert rid == 5 and e.waiting[0].tokens == [1, 2, 3] and e.waiting[0].max_new_tokens == 3
    assert e.add_request([4]) == 6  # the next free id follows the given one
    with pytest.raises(ValueError, match="already waiting"):
        e.add_request([4], request_id=6)
    e.abort(5)
    assert e.add_request([4], request_id=5) == 5  # an id is free again once its request has ended


def test_generate_checks_every_prompt_before_queueing_any() -> None:
    e = Engine(PARAMS, CFG, **ENGINE_KW)
    with pytest.raises(ValueError, match="vocabulary"):
        e.generate([PROMPTS[0], [V + 1]], NEW)
    assert not e.has_unfinished() and len(e.free_pages) == e.num_pages
    assert e.add_request(PROMPTS[0], NEW) == 0  # no id was used up


# (id, kwargs, exception, message fragment)
BAD_SAMPLING: list[tuple[str, dict, type[Exception], str]] = [
    ("temp-negative", dict(temperature=-1.0), ValueError, "temperature"),
    ("temp-nan", dict(temperature=float("nan")), ValueError, "temperature"),
    ("temp-inf", dict(temperature=float("inf")), ValueError, "temperature"),
    ("temp-str", dict(temperature="1.0"), TypeError, "temperature"),
    ("temp-none", dict(temperature=None), TypeError, "temperature"),
    ("temp-bool", dict(temperature=True), TypeError, "temperature"),
    ("topk-negative", dict(top_k=-1), ValueError, "top_k"),
    ("topk-float", dict(top_k=2.5), TypeError, "top_k"),
    ("topk-bool", dict(top_k=True), TypeError, "top_k"),
    ("topp-zero", dict(top_p=0.0), ValueError, "top_p"),
    ("topp-big", dict(top_p=1.5), ValueError, "top_p"),
    ("topp-nan", dict(top_p=float("nan")), ValueError, "top_p"),
    ("topp-str", dict(top_p="0.5"), TypeError, "top_p"),
    ("seed-negative", dict(seed=-1), ValueError, "seed"),
    ("seed-huge", dict(seed=2**64), ValueError, "seed"),
    ("seed-float", dict(seed=1.5), TypeError, "seed"),
    ("seed-str", dict(seed="1"), TypeError, "seed"),
    ("stop-ids-negative", dict(stop_token_ids=[-1]), ValueError, "stop_token_ids"),
    ("stop-ids-float", dict(stop_token_ids=[1.5]), TypeError, "stop_token_ids"),
    ("stop-ids-str", dict(stop_token_ids="12"), TypeError, "stop_token_ids"),
    ("stop-ids-int", dict(stop_token_ids=5), TypeError, "stop_token_ids"),
    ("stop-empty-seq", dict(stop=[[]]), ValueError, "stop"),
    ("stop-negative", dict(stop=[[1, -1]]), ValueError, "stop"),
    ("stop-flat", dict(stop=[5]), TypeError, "stop"),
    ("stop-str", dict(stop="ab"), TypeError, "stop"),
    ("ignore-eos-str", dict(ignore_eos="yes"), TypeError, "ignore_eos"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), [c[1:] for c in BAD_SAMPLING], ids=[c[0] for c in BAD_SAMPLING])
def test_bad_sampling_params_are_refused_when_made(kwargs: dict, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        SamplingParams(**kwargs)


def test_good_sampling_params_of_numpy_kinds_are_normalised() -> None:
    sp = SamplingParams(np.float32(0.5), np.int64(3), np.float64(0.9), np.uint64(2**64 - 1), np.array([1, 2]),
                        [np.array([3, 4])], np.bool_(True))  # fmt: skip
    assert (sp.temperature, sp.top_k, sp.top_p, sp.seed) == (0.5, 3, 0.9, 2**64 - 1)
    assert type(sp.top_k) is int and type(sp.seed) is int and sp.ignore_eos is True
    assert sp.stop_token_ids == (1, 2) and sp.stop == ((3, 4),) and sp.max_token_id() == 4
    assert SamplingParams().max_token_id() == -1 and isinstance(hash(sp), int)


# ----- failing steps -----------------------------------------------------------------------------------
SAMPLED = SamplingParams(temperature=0.9, top_k=20, seed=7)


def add_all(e: Engine) -> list[int]:
    """Three greedy requests and one sampled one."""
    ids = [e.add_request(p, NEW) for p in PROMPTS]
    return ids + [e.add_request(PROMPTS[1], NEW, SAMPLED)]


@functools.cache
def undisturbed(host: bool) -> tuple[list[int], ...]:
    e = Engine(PARAMS, CFG, **(HOST_KW if host else ENGINE_KW))
    ids = add_all(e)
    while e.has_unfinished():
        e.step()
    return tuple(e.finished[i].output for i in ids)


def _raise(exc: BaseException) -> Callable[..., Any]:
    def f(*args: Any, **kw: Any) -> Any:
        raise exc

    return f


def fault(where: str, m: pytest.MonkeyPatch, e: Engine) -> type[BaseException]:
    """Make the next step fail at `where`; returns the exception type it raises."""
    if where == "execute":  # before the runner touches anything
        m.setattr(e.runner, "execute", _raise(RuntimeError("injected")))
    elif where == "after-donation":  # the device forward ran (its caches donated), then a failure
        real = runner_mod.forward_jit

        def failing(*args: Any, **kw: Any) -> Any:
            real(*args, **kw)
            raise RuntimeError("injected")

        m.setattr(runner_mod, "forward_jit", failing)
    elif where == "host-interrupt":  # Ctrl-C in the second layer's host selection
        real_select, calls = layer_mod.host_select_paged, []

        def select(*args: Any, **kw: Any) -> Any:
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real_select(*args, **kw)

        m.setattr(layer_mod, "host_select_paged", select)
        return KeyboardInterrupt
    elif where == "host-write":  # the host cache refuses a write
        m.setattr(IndexerKeyCache, "write_slots", _raise(MemoryError("injected")))
        return MemoryError
    elif where == "commit":  # half-way through committing the step
        real_mark, marks = e.kv.mark_computed, []

        def mark(r: Any) -> None:
            marks.append(1)
            if len(marks) == 2:
                raise RuntimeError("injected")
            real_mark(r)

        m.setattr(e.kv, "mark_computed", mark)
    elif where == "sigint-commit":  # a real SIGINT arrives during the commit: deferred, then the step undone
        real_mark = e.kv.mark_computed

        def mark_and_interrupt(r: Any) -> None:
            signal.raise_signal(signal.SIGINT)
            real_mark(r)

        m.setattr(e.kv, "mark_computed", mark_and_interrupt)
        return KeyboardInterrupt
    elif where == "sample":  # drawing the sampled request's token fails after the greedy rows were read
        m.setattr(sampling_mod, "sample_request", _raise(ZeroDivisionError("injected")))
        return ZeroDivisionError
    else:
        raise AssertionError(where)
    return RuntimeError


CASES = [("execute", 1), ("execute", 3), ("after-donation", 2), ("commit", 3), ("sigint-commit", 2),
         ("sample", 4), ("host-interrupt", 2), ("host-write", 3)]  # fmt: skip


@pytest.mark.parametrize(("where", "at"), CASES, ids=[f"{w}@{n}" for w, n in CASES])
def test_a_failed_step_leaves_everything_as_before_and_changes_no_token(where: str, at: int) -> None:
    host = where.startswith("host")
    e = Engine(PARAMS, CFG, **(HOST_KW if host else ENGINE_KW))
    ids = add_all(e)
    for _ in range(at - 1):
        e.step()
    before = state(e)
    # The engine defers SIGINT only under Python's own handler; a library imported by an earlier test in
    # this process may have installed another, so the case installs the default for its step.
    handler = signal.signal(signal.SIGINT, signal.default_int_handler) if where == "sigint-commit" else None
    try:
        with pytest.MonkeyPatch.context() as m:
            exc = fault(where, m, e)
            with pytest.raises(exc):
                e.step()
    finally:
        if handler is not None:
            signal.signal(signal.SIGINT, handler)
    assert e.stats.failed_steps == 1 and e.stats.steps == at - 1
    after = state(e)
    if where in ("after-donation", "host-interrupt", "host-write"):  # caches donated: all running recomputed
        assert not e.running and after["live"] == before["live"]
        assert [r[0] for r in after["waiting"]] == [r[0] for r in before["running"] + before["waiting"]]
        assert all(r[1] == 0 for r in after["waiting"]) and after["free"] == list(range(e.num_pages))
    else:  # exactly as before
        assert after == before
    while e.has_unfinished():
        e.step()
    assert tuple(e.finished[i].output for i in ids) == undisturbed(host)
    assert all(e.finished[i].finish_reason == "length" for i in ids)
    assert len(e.free_pages) == e.num_pages


def test_a_request_whose_logits_fail_ends_alone_and_the_others_keep_their_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sampled request's logits turn NaN at its third token: it ends with reason "error" (its message
    says why) and the tokens it had; the greedy requests finish as if it had never failed."""
    e = Engine(PARAMS, CFG, **ENGINE_KW)
    ids = add_all(e)
    real, drawn = sampling_mod.sample_request, []

    def nan_for_the_sampled(rid: int, logits: np.ndarray, params: SamplingParams, rng: Any) -> int:
        drawn.append(rid)
        if rid == ids[3] and drawn.count(rid) == 3:
            logits = np.full_like(logits, np.nan)
        return real(rid, logits, params, rng)

    monkeypatch.setattr(sampling_mod, "sample_request", nan_for_the_sampled)
    streamed: dict[int, list[int]] = {i: [] for i in ids}
    while e.has_unfinished():
        for rid, toks in e.step().items():
            streamed[rid].extend(toks)
    bad = e.finished[ids[3]]
    assert bad.finish_reason == "error" and bad.error is not None and "NaN" in bad.error
    assert bad.output == undisturbed(False)[3][:2] == streamed[ids[3]]
    assert [e.finished[i].output for i in ids[:3]] == list(undisturbed(False)[:3])
    assert e.stats.failed_steps == 1 and len(e.free_pages) == e.num_pages


def test_the_kv_manager_restores_tables_and_refcounts_whatever_happened_since() -> None:
    """Blocks taken, blocks given back and handed to another request, a shared prefix adopted: `restore`
    brings back every table and every reference count (no JAX involved)."""
    from types import SimpleNamespace

    from dsa_hybrid.serving.kv_manager import KVManager

    kv = KVManager(8, 4)
    a, b, c = (SimpleNamespace(id=i, computed=0, tokens=list(range(12))) for i in range(3))
    assert kv.allocate(0, 12) and kv.allocate(1, 8)
    a.computed = 12
    kv.mark_computed(a)
    tables, refs = kv.snapshot(), kv.pool.refcounts().tolist()
    kv.free(a)  # its 3 blocks go back ...
    assert kv.allocate(2, 16)  # ... and request 2 takes them (and one more)
    assert kv.allocate(1, 12)
    kv.restore(tables, [a, b])
    assert kv.block_tables() == tables and kv.pool.refcounts().tolist() == refs
    assert kv.num_free == 8 - 5
    b.computed = 0
    assert kv.adopt_prefix(b) == 8  # the prefix index was rebuilt from the restored holders
    assert kv.block_table(1) == tables[0][:2] and kv.pool.refcount(tables[0][0]) == 2


def test_sampling_errors_name_the_request() -> None:
    from dsa_hybrid.serving.sampling import sample_request

    rng = np.random.default_rng(0)
    state0 = rng.bit_generator.state
    with pytest.raises(SamplingError, match="request 9: logits hold NaN") as info:
        sample_request(9, np.array([0.0, np.nan]), SAMPLED, rng)
    assert info.value.request_id == 9 and rng.bit_generator.state == state0  # nothing drawn
    with pytest.raises(SamplingError, match="one non-empty row"):
        sample_request(9, np.zeros((2, 2)), SAMPLED, rng)
    assert sample_request(9, np.array([0.0, -np.inf, 1.0]), SAMPLED, rng) in (0, 2)

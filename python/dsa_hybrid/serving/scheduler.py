"""`Scheduler`: decides each step's batch — admission, the token budget, chunked prefill, preemption — and
applies a step's sampled tokens (stop conditions, finished requests).

It holds the requests (`waiting`, `running`, in order of arrival) and asks the `KVManager` for blocks; it
never touches a cache or the model. `schedule()` returns a plain `SchedulerOutput` (which tokens of which
request run, at which positions, through which block table), the runner executes it, and
`update_from_output` commits the result. A step that fails between the two commits nothing: the same
chunks are scheduled again, and since a request only writes positions at or past its `computed` count,
rewriting them is harmless.

Policy (first come, first served):
- a waiting request is admitted when the free blocks can hold its first chunk, or when nothing runs;
- running requests contribute, oldest first, their next tokens under the per-step token budget (one for
  a decode, a chunk of the prompt for a prefill), after adopting any computed prefix another live request
  has (`KVManager.adopt_prefix`);
- when blocks run out, only requests that arrived later give way (youngest first): their blocks go back
  and they wait at the front of the queue, to be recomputed from prompt and output so far (their tokens do
  not change); the oldest request always progresses, and two large requests never preempt each other back
  and forth.

Stop conditions, checked on every new token in this order: an EOS id of the model ("eos", unless the
request's `SamplingParams.ignore_eos`), one of the request's `stop_token_ids` or a stop sequence ending
its output ("stop"), its `max_new_tokens` ("length"). Stop tokens stay in the output.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from dsa_hybrid.serving.kv_manager import KVManager
from dsa_hybrid.serving.sampling import SamplingParams

logger = logging.getLogger(__name__)

# "error": the request alone failed inside a step (its logits could not be sampled); `RequestOutput.error`
# says why, and the other requests went on untouched.
FINISH_REASONS = ("length", "stop", "eos", "abort", "error")


@dataclasses.dataclass
class Request:
    """A generation request as the scheduler tracks it (its blocks live in the `KVManager`)."""

    id: int
    tokens: list[int]  # the prompt, then the output so far: one list, read every step and never rebuilt
    num_prompt: int
    max_new_tokens: int
    sampling: SamplingParams
    rng: np.random.Generator
    computed: int = 0  # tokens whose keys and latents are in the caches
    finish_reason: str | None = None
    error: str | None = None  # why it failed (finish reason "error")

    @property
    def prompt(self) -> list[int]:
        return self.tokens[: self.num_prompt]

    @property
    def output(self) -> list[int]:
        return self.tokens[self.num_prompt :]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_output(self) -> RequestOutput:
        return RequestOutput(self.id, self.prompt, self.output, self.finish_reason, self.error)


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """A finished request: its prompt, its output tokens and why it ended (`FINISH_REASONS`; `error` is the
    message when the reason is "error")."""

    id: int
    prompt: list[int]
    output: list[int]
    finish_reason: str | None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
    """`len(token_ids)` consecutive tokens of one request, at positions `start ..`, to run this step.

    `block_table` is the request's table (covering every position up to the chunk's end); `samples` says
    whether the chunk reaches the request's last token, whose logits then give its next token, drawn with
    `sampling` from the request's own generator `rng`."""

    request_id: int
    start: int
    token_ids: list[int]
    block_table: list[int]
    samples: bool
    sampling: SamplingParams
    rng: np.random.Generator

    @property
    def count(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    """What one step runs: its chunks (oldest request first; a request's rows contiguous), and what the
    scheduling itself did."""

    chunks: tuple[ScheduledChunk, ...]
    num_tokens: int  # rows of the step
    prompt_tokens: int  # tokens of chunks that start inside their prompt (prefill and recompute)
    decode_only: bool  # every chunk starts past its prompt
    preempted: tuple[int, ...] = ()  # requests sent back to the waiting queue while scheduling
    shared_tokens: int = 0  # tokens adopted from other requests' blocks while scheduling

    def __bool__(self) -> bool:
        return bool(self.chunks)


@dataclasses.dataclass(frozen=True)
class SchedulerState:
    """What `Scheduler.snapshot` saves and `Scheduler.restore` brings back: the queues, every live request's
    progress (computed count, token count, finish reason, generator state) and the block tables."""

    waiting: tuple[Request, ...]
    running: tuple[Request, ...]
    progress: tuple[tuple[Request, int, int, str | None, Mapping[str, Any] | None], ...]
    tables: dict[int, list[int]]


class Scheduler:
    """The waiting and running requests and the policy of the module docstring.

    Args:
        kv: the `KVManager` whose blocks the requests take.
        max_tokens_per_step: the token budget of one step (prefill chunks and decodes together).
        eos_token_ids: the model's EOS token ids (`DSAConfig.eos_token_id`).
    """

    def __init__(self, kv: KVManager, *, max_tokens_per_step: int, eos_token_ids: Iterable[int] = ()) -> None:
        if max_tokens_per_step < 1:
            raise ValueError(f"max_tokens_per_step must be >= 1, got {max_tokens_per_step}")
        self.kv = kv
        self.budget = max_tokens_per_step
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.waiting: list[Request] = []  # the front is scheduled first
        self.running: list[Request] = []  # in order of admission
        self.live: dict[int, Request] = {}  # waiting and running, by id

    # ----- requests ------------------------------------------------------------------------------
    def add(self, r: Request) -> None:
        if r.id in self.live:
            raise ValueError(f"request {r.id} is already waiting or running")
        self.waiting.append(r)
        self.live[r.id] = r

    def abort(self, request_id: int) -> Request:
        """Drop a waiting or running request (finish reason "abort"); its blocks go back. KeyError if unknown."""
        r = self.live.get(request_id)
        if r is None:
            raise KeyError(f"request {request_id} is not waiting or running")
        (self.running if r in self.running else self.waiting).remove(r)
        self._finish(r, "abort")
        return r

    def fail(self, request_id: int, message: str) -> Request:
        """Finish a waiting or running request with reason "error" (`message` kept as its `error`); its
        blocks go back. KeyError if unknown."""
        r = self.abort(request_id)
        r.finish_reason, r.error = "error", message
        return r

    def has_unfinished(self) -> bool:
        return bool(self.live)

    def preempt_all(self) -> None:
        """Send every running request back to the waiting queue (in order), to be recomputed: for when
        the caches' contents were lost."""
        for r in reversed(list(self.running)):
            self._preempt(r)

    # ----- transactions --------------------------------------------------------------------------
    def snapshot(self) -> SchedulerState:
        """The state a failed step goes back to (`restore`). Cheap: lists of references, a few ints per
        request, the block tables, and the generator state of requests that draw (not greedy)."""
        progress = tuple(
            (r, r.computed, len(r.tokens), r.finish_reason, None if r.sampling.greedy else r.rng.bit_generator.state)
            for r in self.live.values()
        )
        return SchedulerState(tuple(self.waiting), tuple(self.running), progress, self.kv.snapshot())

    def restore(self, state: SchedulerState) -> None:
        """Undo everything since `snapshot()` returned `state` (a step's scheduling, admissions, preemptions,
        prefix adoptions, block allocations, a partial commit, tokens drawn): afterwards every request and
        every block is as it was, so the next step runs as the failed one would have."""
        self.live = {}
        for r, computed, n_tokens, reason, rng_state in state.progress:
            r.computed, r.finish_reason = computed, reason
            del r.tokens[n_tokens:]
            if rng_state is not None:
                r.rng.bit_generator.state = rng_state
            self.live[r.id] = r
        self.waiting, self.running = list(state.waiting), list(state.running)
        self.kv.restore(state.tables, list(self.live.values()))

    # ----- blocks --------------------------------------------------------------------------------
    def _preempt(self, r: Request) -> None:
        """Take `r` out of the running set: its blocks go back, it waits at the front to be recomputed."""
        self.running.remove(r)
        self.kv.free(r)
        r.computed = 0
        self.waiting.insert(0, r)
        logger.debug("request %d preempted (%d tokens to recompute)", r.id, len(r.tokens))

    def _reserve(self, r: Request, upto: int, preempted: list[int]) -> bool:
        """Blocks for positions `< upto`, preempting younger requests while the pool is dry. False if
        even that is not enough."""
        while not self.kv.allocate(r.id, upto):
            younger = [o for o in self.running if o.id > r.id]
            if not younger:
                return False
            victim = max(younger, key=lambda o: o.id)
            self._preempt(victim)
            preempted.append(victim.id)
        return True

    # ----- scheduling ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """The chunks of the next step, within the token budget (empty when nothing is left to run)."""
        kv = self.kv
        # Admission: a request joins when the free blocks can hold its first chunk (or when nothing runs:
        # the oldest must progress); the rest wait without blocks.
        while self.waiting:
            first_chunk = min(len(self.waiting[0].tokens), self.budget)
            if self.running and kv.blocks_for(first_chunk) > kv.num_free:
                break
            self.running.append(self.waiting.pop(0))
        plan: list[tuple[Request, int, int]] = []
        preempted: list[int] = []  # in order of preemption (a few at most)
        budget, shared = self.budget, 0
        for r in list(self.running):
            if budget == 0:
                break
            if r.id in preempted:  # preempted while reserving blocks for an older one
                continue
            if r.computed < len(r.tokens) - 1:
                adopted = kv.adopt_prefix(r)
                if adopted is not None:
                    shared += adopted - r.computed
                    r.computed = adopted
                    kv.mark_computed(r)
            start = r.computed
            count = min(len(r.tokens) - start, budget)
            if not self._reserve(r, start + count, preempted):
                self._preempt(r)  # waits without holding blocks, so older requests can use them
                preempted.append(r.id)
                continue
            plan.append((r, start, count))
            budget -= count
        gone = set(preempted)
        chunks = tuple(
            ScheduledChunk(
                r.id, s, r.tokens[s : s + c], kv.block_table(r.id), s + c == len(r.tokens), r.sampling, r.rng
            )
            for r, s, c in plan
            if r.id not in gone
        )
        in_prompt = [ch.start < self.live[ch.request_id].num_prompt for ch in chunks]
        return SchedulerOutput(
            chunks,
            num_tokens=sum(ch.count for ch in chunks),
            prompt_tokens=sum(ch.count for ch, p in zip(chunks, in_prompt, strict=True) if p),
            decode_only=not any(in_prompt),
            preempted=tuple(preempted),
            shared_tokens=shared,
        )

    def update_from_output(
        self, out: SchedulerOutput, sampled: dict[int, int]
    ) -> tuple[dict[int, list[int]], list[RequestOutput]]:
        """Commit a step: the chunks' tokens are computed, each sampling chunk's request gets its new
        token (`sampled`: request id → token). Returns the new tokens by request and the requests that
        finished."""
        new: dict[int, list[int]] = {}
        done: list[RequestOutput] = []
        for ch in out.chunks:
            r = self.live[ch.request_id]
            r.computed = ch.start + ch.count
            self.kv.mark_computed(r)
            if not ch.samples:
                continue
            tok = sampled[r.id]
            r.tokens.append(tok)
            new[r.id] = [tok]
            reason = self._stop_reason(r, tok)
            if reason is not None:
                self.running.remove(r)
                done.append(self._finish(r, reason))
        return new, done

    def _stop_reason(self, r: Request, tok: int) -> str | None:
        sp = r.sampling
        if tok in self.eos_token_ids and not sp.ignore_eos:
            return "eos"
        if tok in sp.stop_token_ids:
            return "stop"
        n_out = len(r.tokens) - r.num_prompt
        for seq in sp.stop:
            if len(seq) <= n_out and tuple(r.tokens[-len(seq) :]) == seq:
                return "stop"
        if n_out >= r.max_new_tokens:
            return "length"
        return None

    def _finish(self, r: Request, reason: str) -> RequestOutput:
        r.finish_reason = reason
        self.kv.free(r)
        r.computed = 0
        del self.live[r.id]
        logger.debug("request %d finished (%s) after %d tokens", r.id, reason, len(r.output))
        return r.to_output()

"""`Engine`: continuous batching of generation requests over the small DSA model — the facade.

Every `step()` runs one flattened batch: running requests each contribute their next tokens (one for a
decode, a chunk of the prompt for a prefill) under a per-step token budget (chunked prefill), new
requests join as soon as there is room (continuous batching), and one forward runs them all.

The engine is three parts with narrow interfaces between them (vLLM's seams, docs/architecture.md):
- `serving.scheduler.Scheduler` decides: admission, the token budget, chunked prefill, who gives way when
  blocks run out (younger requests are preempted and later recomputed, so their tokens do not change;
  the oldest always progresses), stop conditions. `schedule()` returns a plain `SchedulerOutput`.
- `serving.kv_manager.KVManager` owns the pages and prefixes: the one Rust `BlockPool`, one block table per
  request (addressing every cache of every layer: latent rows, device and host indexer keys), and the
  prefix index through which a request adopts whole blocks another live request has computed.
- `serving.runner.ModelRunner` executes a step: the padded batch, the indexer's placement per step
  ("device", "host" — the Rust `IndexerKeyCache` of each layer selects between the device halves of the
  layer, pipelined over micro-batches — or "auto", from a cost model measured at start-up,
  `placement.PlacementCosts`), the forward, and sampling.

A step that raises commits nothing: the same chunks run again on the next step (and if the failure cost
the device caches, which are donated to the forward, every running request is recomputed from its tokens).
Either way the requests' tokens are those they would have had.

Logging goes to the `dsa_hybrid.serving` loggers (preemptions, finished requests at DEBUG; the cost model
at INFO; failed steps at WARNING / ERROR).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np

from dsa_hybrid.host import BlockPool, IndexerKeyCache
from dsa_hybrid.models.causal_lm import ModelParams
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.ops.sparse_mla import Backend
from dsa_hybrid.serving.compile_cache import enable_compilation_cache
from dsa_hybrid.serving.kv_manager import KVManager
from dsa_hybrid.serving.placement import PlacementCosts
from dsa_hybrid.serving.runner import PLACEMENTS, ModelRunner
from dsa_hybrid.serving.sampling import SamplingParams
from dsa_hybrid.serving.scheduler import FINISH_REASONS, Request, RequestOutput, Scheduler

logger = logging.getLogger(__name__)

__all__ = ["FINISH_REASONS", "PLACEMENTS", "Engine", "EngineStats", "FinishedRequests", "Request", "RequestOutput"]


@dataclasses.dataclass
class EngineStats:
    """Counters and per-stage seconds since the engine was made."""

    steps: int = 0
    prompt_tokens_computed: int = 0  # prompt (and recomputed) tokens run through the model
    decode_tokens: int = 0  # tokens produced
    shared_tokens: int = 0  # tokens adopted from other requests' pages instead of being computed
    preemptions: int = 0
    failed_steps: int = 0  # steps that raised (nothing of them was committed)
    steps_by_placement: dict[str, int] = dataclasses.field(default_factory=lambda: {"device": 0, "host": 0})
    seconds: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"schedule": 0.0, "forward": 0.0, "sample": 0.0}
    )
    # (seconds, tokens produced) of each step in which every row was a decode (no prompt chunk)
    decode_step_log: list[tuple[float, int]] = dataclasses.field(default_factory=list)

    @property
    def decode_steps(self) -> int:
        return len(self.decode_step_log)

    @property
    def decode_step_seconds(self) -> float:
        return sum(s for s, _ in self.decode_step_log)

    @property
    def decode_step_tokens(self) -> int:
        return sum(n for _, n in self.decode_step_log)


class FinishedRequests(Mapping[int, RequestOutput]):
    """The last `capacity` finished requests (`RequestOutput` by id, oldest first): a bounded record, so a
    long-running engine does not keep every request it ever served."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"max_finished must be >= 0, got {capacity}")
        self.capacity = capacity
        self._outputs: OrderedDict[int, RequestOutput] = OrderedDict()

    def add(self, out: RequestOutput) -> None:
        self._outputs[out.id] = out
        while len(self._outputs) > self.capacity:
            self._outputs.popitem(last=False)

    def __getitem__(self, request_id: int) -> RequestOutput:
        return self._outputs[request_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._outputs)

    def __len__(self) -> int:
        return len(self._outputs)


class Engine:
    """Serve generation requests in continuous batches.

    Args:
        params, cfg: the model (`ModelParams`, `DSAConfig`; `cfg.eos_token_id` ends requests, finish
            reason "eos").
        num_pages, page_size: the page pool shared by every layer's caches.
        max_tokens_per_step: the token budget of one step (prefill chunks and decodes together).
        max_model_len: the longest sequence (prompt + output) a request may reach.
        latent_kind, indexer: cache formats (see `DSACaches.create`); "host" and "auto" need the FP8 indexer.
            `latent_kind` defaults to "bf16", except on a CPU backend: "f32" there, because XLA on CPU
            updates a bf16 array by converting all of it to f32 and back, a whole-cache pass per layer
            and step (measured: +40 ms per V3.2 layer at 64K).
        backend: `sparse_mla` backend ("auto", "xla", "pallas_tpu").
        placement: "device", "host" or "auto" (the indexer's side, see the module docstring).
        cost_model: for "auto", a `PlacementCosts` to use instead of the one measured at start-up (or
            loaded: a model measured before on this machine for these widths and versions is stored in
            the per-user cache directory and reused, `PlacementCosts.cached`; `DSA_HYBRID_REMEASURE=1`
            measures afresh). The Engine also turns on JAX's persistent compilation cache there
            (`compile_cache`; `DSA_HYBRID_CACHE_DIR=off` turns both off).
        host_threads: threads of the host indexer (None: all cores).
        micro_batches: row groups pipelined in host steps (1: no overlap).
        prefix_sharing: adopt other live requests' computed pages for equal leading tokens.
        max_finished: how many finished requests `finished` keeps (the most recent ones).
    """

    def __init__(
        self,
        params: ModelParams,
        cfg: DSAConfig,
        *,
        num_pages: int = 256,
        page_size: int = 16,
        max_tokens_per_step: int = 128,
        max_model_len: int = 4096,
        latent_kind: str | None = None,
        indexer: str = "fp8",
        backend: Backend = "auto",
        placement: str = "device",
        cost_model: PlacementCosts | None = None,
        host_threads: int | None = None,
        micro_batches: int = 2,
        prefix_sharing: bool = True,
        max_finished: int = 1024,
    ) -> None:
        if max_tokens_per_step < 1 or num_pages < 1 or micro_batches < 1:
            raise ValueError("max_tokens_per_step, num_pages and micro_batches must be >= 1")
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 (a prompt token and a new one), got {max_model_len}")
        self.cfg, self.page_size, self.max_model_len = cfg, page_size, max_model_len
        self.finished = FinishedRequests(max_finished)
        enable_compilation_cache()
        self.runner = ModelRunner(
            params, cfg, num_pages=num_pages, page_size=page_size, max_model_len=max_model_len,
            max_tokens_per_step=max_tokens_per_step, latent_kind=latent_kind, indexer=indexer, backend=backend,
            placement=placement, cost_model=cost_model, host_threads=host_threads, micro_batches=micro_batches,
        )  # fmt: skip
        self.kv = KVManager(num_pages, page_size, prefix_sharing=prefix_sharing)
        self.scheduler = Scheduler(self.kv, max_tokens_per_step=max_tokens_per_step, eos_token_ids=cfg.eos_token_id)
        self.stats = EngineStats()
        self._next_id = 0

    # ----- views of the parts ----------------------------------------------------------------------
    @property
    def pool(self) -> BlockPool:
        """The one block pool (`KVManager.pool`)."""
        return self.kv.pool

    @property
    def num_pages(self) -> int:
        return self.kv.num_blocks

    @property
    def free_pages(self) -> list[int]:
        return self.kv.pool.free_blocks().tolist()

    @property
    def preemptions(self) -> int:
        return self.stats.preemptions

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def waiting(self) -> list[Request]:
        return self.scheduler.waiting

    @property
    def caches(self) -> tuple:
        """The device caches of every layer (`DSACaches`, owned by the runner)."""
        return self.runner.caches

    @property
    def host_caches(self) -> tuple[IndexerKeyCache | None, ...]:
        return self.runner.host_caches

    @property
    def cost_model(self) -> PlacementCosts | None:
        return self.runner.cost_model

    @property
    def cost_model_source(self) -> str | None:
        """Where the cost model came from: "given", "loaded" or "measured" (None: placement not "auto")."""
        return self.runner.cost_model_source

    @property
    def placement(self) -> str:
        return self.runner.placement

    # ----- requests ------------------------------------------------------------------------------
    def add_request(
        self, token_ids: Iterable[int], max_new_tokens: int | None = None, sampling: SamplingParams | None = None
    ) -> int:
        """Queue a request; returns its id. `sampling` defaults to greedy (its `stop_token_ids`, `stop`
        sequences and `ignore_eos` are the request's stop conditions). `max_new_tokens` None: as many as
        `max_model_len` (and the pool) allow. ValueError, naming the argument, for an empty prompt, a
        prompt that leaves no room under `max_model_len`, a too-long request, or token ids outside the
        vocabulary."""
        prompt = [int(t) for t in token_ids]
        if not prompt:
            raise ValueError("token_ids must be non-empty")
        room = self.max_model_len - len(prompt)
        if room < 1:
            raise ValueError(
                f"token_ids: a prompt of {len(prompt)} tokens leaves no room for a new token under "
                f"max_model_len {self.max_model_len}"
            )
        if max_new_tokens is None:
            max_new_tokens = min(room, self.num_pages * self.page_size - len(prompt))
        elif max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (or None), got {max_new_tokens}")
        elif max_new_tokens > room:
            raise ValueError(
                f"max_new_tokens: prompt + max_new_tokens = {len(prompt) + max_new_tokens} exceeds max_model_len "
                f"{self.max_model_len} (None generates up to it)"
            )
        if max_new_tokens < 1 or len(prompt) + max_new_tokens > self.num_pages * self.page_size:
            raise ValueError("the request alone needs more pages than the pool has")
        if min(prompt) < 0 or max(prompt) >= self.cfg.vocab_size:
            raise ValueError(f"token_ids must lie in [0, {self.cfg.vocab_size})")
        sampling = sampling or SamplingParams()
        rid = self._next_id
        self._next_id += 1
        rng = np.random.default_rng(sampling.seed)
        self.scheduler.add(Request(rid, prompt, len(prompt), max_new_tokens, sampling, rng))
        return rid

    def abort(self, rid: int) -> RequestOutput:
        """Drop a waiting or running request; its pages return to the pool and its output so far is
        recorded in `finished` (finish reason "abort"). KeyError if unknown."""
        out = self.scheduler.abort(rid).to_output()
        self.finished.add(out)
        return out

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ----- steps -----------------------------------------------------------------------------------
    def step(self) -> dict[int, list[int]]:
        """Run one batch; returns the new tokens of each request that produced one (streaming)."""
        return self._step()[0]

    def _step(self) -> tuple[dict[int, list[int]], list[RequestOutput]]:
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        st = self.stats
        st.preemptions += len(out.preempted)
        st.shared_tokens += out.shared_tokens
        if not out:
            return {}, []
        t1 = time.perf_counter()
        try:
            result = self.runner.execute(out)
        except BaseException:
            st.failed_steps += 1
            self._recover()
            raise
        new, done = self.scheduler.update_from_output(out, result.tokens)
        for o in done:
            self.finished.add(o)
        t2 = time.perf_counter()
        st.steps += 1
        st.steps_by_placement[result.placement] += 1
        st.prompt_tokens_computed += out.prompt_tokens
        st.decode_tokens += len(new)
        if out.decode_only:
            st.decode_step_log.append((t2 - t0, len(new)))
        secs = result.seconds
        st.seconds["schedule"] += t1 - t0 + secs["prepare"] + (t2 - t1 - sum(secs.values()))
        st.seconds["forward"] += secs["forward"]
        st.seconds["sample"] += secs["sample"]
        return new, done

    def _recover(self) -> None:
        """After a step raised: nothing was committed. If the device caches were lost (donated to the
        failed forward), start from empty ones and recompute every running request."""
        if self.runner.caches_lost():
            logger.error("a step failed and took the device caches with it: every running request is recomputed")
            self.runner.reset_caches()
            self.stats.preemptions += len(self.scheduler.running)
            self.scheduler.preempt_all()
        else:
            logger.warning("a step failed; nothing of it was committed and its chunks run again on the next step")

    def generate(
        self,
        prompts: Iterable[Iterable[int]],
        max_new_tokens: int | None = None,
        sampling: SamplingParams | None = None,
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> list[list[int]]:
        """Add every prompt, run steps until all are done, return their outputs in order. `on_tokens(id,
        tokens)` streams each step's new tokens. (The outputs are collected as requests finish, so they
        do not depend on how many `finished` keeps.)"""
        ids = [self.add_request(p, max_new_tokens, sampling) for p in prompts]
        outputs: dict[int, list[int]] = {}
        while self.has_unfinished():
            new, done = self._step()
            for o in done:
                outputs[o.id] = o.output
            if on_tokens is not None:
                for rid, toks in new.items():
                    on_tokens(rid, toks)
        return [outputs[i] for i in ids]

    # ----- memory ----------------------------------------------------------------------------------
    def cache_bytes(self) -> dict[str, int]:
        """Bytes of every cache (capacity) and of the pages held now, summed over layers."""
        sizes = self.runner.cache_bytes()
        held = (self.num_pages - self.kv.num_free) / self.num_pages
        return {**sizes, "held": int(held * sum(sizes.values()))}

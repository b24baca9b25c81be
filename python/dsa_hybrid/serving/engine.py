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

A step is a transaction (docs/errors.md): if anything raises before it is committed, every request and
every block goes back to its state before the step (`Scheduler.snapshot` / `restore`: queues, progress,
tokens, generator states, block tables and pool reference counts) and the next step runs as the failed
one would have (if the failure cost the device caches, which are donated to the forward, every running
request is recomputed from its tokens). One request whose token cannot be sampled ends alone with finish
reason "error". Either way every other request's tokens are those it would have had.

On a device mesh (`Engine(..., mesh=parallel.mesh.make_mesh(dp, tp))`, `serving.mesh`) every DP rank has
its own page pool, block tables and prefix index (`num_pages` pages each), a new request is placed on
the least loaded rank and stays there, every rank's rows run in one sharded program per step, and the
tokens are those of one device. Several `jax.distributed` processes each run the same driver with the
same requests in the same order (SPMD); see docs/parallel.md.

Logging goes to the `dsa_hybrid.serving` loggers (preemptions, finished requests at DEBUG; the cost model
at INFO; failed steps at WARNING / ERROR).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import numbers
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import numpy as np

from dsa_hybrid.host import BlockPool, IndexerKeyCache
from dsa_hybrid.models.causal_lm import ModelParams
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.ops.checks import check_choice
from dsa_hybrid.ops.sparse_mla import Backend
from dsa_hybrid.ops.target import target_device
from dsa_hybrid.serving.compile_cache import enable_compilation_cache
from dsa_hybrid.serving.kv_manager import KVManager
from dsa_hybrid.serving.mesh import MeshRunner, MeshScheduler, MeshSchedulerState
from dsa_hybrid.serving.placement import PlacementCosts
from dsa_hybrid.serving.runner import PLACEMENTS, ModelRunner
from dsa_hybrid.serving.sampling import SamplingError, SamplingParams
from dsa_hybrid.serving.scheduler import FINISH_REASONS, Request, RequestOutput, Scheduler, SchedulerState

if TYPE_CHECKING:
    from jax.sharding import Mesh

logger = logging.getLogger(__name__)

__all__ = [
    "FINISH_REASONS",
    "PLACEMENTS",
    "Engine",
    "EngineStats",
    "FinishedRequests",
    "Request",
    "RequestOutput",
    "default_placement",
]


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


def _integer(name: str, value: object) -> int:
    """`value` as an int: Python or numpy integers only (TypeError for a bool, a float, a string, None)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) for the duration: a KeyboardInterrupt that arrives is raised at the end,
    so a commit or a roll-back is never cut in half. Only in the main thread and only when Python's default
    handler is installed (otherwise a no-op)."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def default_placement(*, indexer: str = "fp8", page_size: int = 16, mesh: Mesh | None = None) -> str:
    """The `Engine`'s placement when none is given: "host" when every device it runs on (the mesh's, or
    the target device, `ops.target.target_device`) is a CPU, `indexer` is "fp8" and `page_size` a
    multiple of 16 (what the host placement needs); "device" otherwise (an accelerator, or a cache the
    host cannot serve). ValueError for an unknown `indexer`, TypeError for a `mesh` that is no `Mesh`; a
    bad `page_size` gives "device" (the engine then names it)."""
    from jax.sharding import Mesh

    check_choice("indexer", indexer, ("fp8", "exact"))
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    if indexer != "fp8" or type(page_size) is not int or page_size < 1 or page_size % 16:
        return "device"
    devices = list(mesh.devices.flat) if mesh is not None else [target_device()]
    return "host" if all(d.platform == "cpu" for d in devices) else "device"


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
        placement: "device", "host" or "auto" (the indexer's side, see the module docstring). None (the
            default): `default_placement` — "host" when the engine's devices are CPUs, the indexer is FP8
            and `page_size` a multiple of 16 (there the Rust kernels select and attend: a 16K prefill of
            `DSAConfig.small()` took 2.8× less CPU than "device", docs/performance.md), else "device".
        cost_model: for "auto", a `PlacementCosts` to use instead of the one measured at start-up (or
            loaded: a model measured before on this machine for these widths and versions is stored in
            the per-user cache directory and reused, `PlacementCosts.cached`; `DSA_HYBRID_REMEASURE=1`
            measures afresh). The Engine also turns on JAX's persistent compilation cache there
            (`compile_cache`; `DSA_HYBRID_CACHE_DIR=off` turns both off).
        host_threads: threads of the host indexer (None: all cores).
        micro_batches: row groups pipelined in host steps (1: no overlap).
        prefix_sharing: adopt other live requests' computed pages for equal leading tokens.
        max_finished: how many finished requests `finished` keeps (the most recent ones).
        mesh: a `("dp", "tp")` mesh (`parallel.mesh.make_mesh`) to serve on: `num_pages` pages per DP rank,
            one pool per rank, requests placed on ranks by load, `max_tokens_per_step` per rank and step,
            `placement` "device" or "host" ("auto" is refused), `cost_model` and `micro_batches` unused.
            None: one device (`ModelRunner`).
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
        placement: str | None = None,
        cost_model: PlacementCosts | None = None,
        host_threads: int | None = None,
        micro_batches: int = 2,
        prefix_sharing: bool = True,
        max_finished: int = 1024,
        mesh: Mesh | None = None,
    ) -> None:
        if max_tokens_per_step < 1 or num_pages < 1 or micro_batches < 1:
            raise ValueError("max_tokens_per_step, num_pages and micro_batches must be >= 1")
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 (a prompt token and a new one), got {max_model_len}")
        self.cfg, self.page_size, self.max_model_len = cfg, page_size, max_model_len
        self.finished = FinishedRequests(max_finished)
        if placement is None:
            placement = default_placement(indexer=indexer, page_size=page_size, mesh=mesh)
        enable_compilation_cache()
        self.mesh = mesh
        self.runner: ModelRunner | MeshRunner
        self.scheduler: Scheduler | MeshScheduler
        if mesh is None:
            self.runner = ModelRunner(
                params, cfg, num_pages=num_pages, page_size=page_size, max_model_len=max_model_len,
                max_tokens_per_step=max_tokens_per_step, latent_kind=latent_kind, indexer=indexer, backend=backend,
                placement=placement, cost_model=cost_model, host_threads=host_threads, micro_batches=micro_batches,
            )  # fmt: skip
            self.kvs = [KVManager(num_pages, page_size, prefix_sharing=prefix_sharing)]
            self.scheduler = Scheduler(
                self.kvs[0], max_tokens_per_step=max_tokens_per_step, eos_token_ids=cfg.eos_token_id
            )
        else:
            self.runner = MeshRunner(
                params, cfg, mesh, pages_per_rank=num_pages, page_size=page_size, max_model_len=max_model_len,
                latent_kind=latent_kind, indexer=indexer, backend=backend, placement=placement,
                host_threads=host_threads,
            )  # fmt: skip
            self.kvs = [KVManager(num_pages, page_size, prefix_sharing=prefix_sharing) for _ in range(self.runner.dp)]
            self.scheduler = MeshScheduler(
                self.kvs, max_tokens_per_step=max_tokens_per_step, eos_token_ids=cfg.eos_token_id
            )
        self.kv = self.kvs[0]
        self.stats = EngineStats()
        self._next_id = 0

    # ----- views of the parts ----------------------------------------------------------------------
    @property
    def pool(self) -> BlockPool:
        """The one block pool (`KVManager.pool`); on a mesh DP rank 0's (`pools` lists every rank's)."""
        return self.kv.pool

    @property
    def pools(self) -> list[BlockPool]:
        """Every DP rank's block pool (one on one device)."""
        return [kv.pool for kv in self.kvs]

    @property
    def num_pages(self) -> int:
        """Pages of one pool (on a mesh: of each DP rank's)."""
        return self.kv.num_blocks

    @property
    def free_pages(self) -> list[int]:
        """The free pages; on a mesh numbered globally (page `p` of rank `r` is `r · num_pages + p`)."""
        return [r * self.num_pages + p for r, kv in enumerate(self.kvs) for p in kv.pool.free_blocks().tolist()]

    def rank_of(self, request_id: int) -> int:
        """The DP rank a waiting or running request lives on (0 on one device). KeyError if unknown."""
        if isinstance(self.scheduler, MeshScheduler):
            return self.scheduler.rank_of(request_id)
        if request_id not in self.scheduler.live:
            raise KeyError(f"request {request_id} is not waiting or running")
        return 0

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
        self,
        token_ids: Iterable[int] | np.ndarray,
        max_new_tokens: int | None = None,
        sampling: SamplingParams | None = None,
        *,
        request_id: int | None = None,
    ) -> int:
        """Queue a request; returns its id.

        Args:
            token_ids: the prompt, a non-empty 1-D sequence (list, tuple, numpy integer array) of token ids
                in `[0, vocab_size)`.
            max_new_tokens: at most this many new tokens (>= 1); None: as many as `max_model_len` and the
                pool allow.
            sampling: a `SamplingParams` (default greedy); its `stop_token_ids`, `stop` sequences and
                `ignore_eos` are the request's stop conditions.
            request_id: the id to use (an int >= 0 no waiting or running request has); None: the next free
                one.

        Everything is checked before anything changes (a refused request leaves the engine as it was, and
        consumes no id): TypeError for token ids that are not integers (floats, bools, strings, a 2-D
        array), a `sampling` that is not a `SamplingParams`, a non-integer `max_new_tokens` or
        `request_id`; ValueError, naming the argument, for an empty prompt, token ids or stop ids outside
        the vocabulary, a prompt that leaves no room under `max_model_len`, `max_new_tokens < 1` or past
        `max_model_len`, a request that alone needs more pages than the pool has (it could never run),
        or a `request_id` already waiting or running."""
        r = self._new_request(token_ids, max_new_tokens, sampling, request_id, taken=())
        self.scheduler.add(r)
        self._next_id = max(self._next_id, r.id + 1)
        return r.id

    def _new_request(
        self, token_ids: object, max_new_tokens: object, sampling: object, request_id: object, taken: Iterable[int]
    ) -> Request:
        """A checked `Request` (see `add_request`), not yet queued; `taken`: ids also in use."""
        taken = set(taken)
        prompt = self._check_prompt(token_ids)
        vocab = self.cfg.vocab_size
        if max_new_tokens is not None:
            max_new_tokens = _integer("max_new_tokens", max_new_tokens)
        if sampling is None:
            sampling = SamplingParams()
        elif not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams or None, got {type(sampling).__name__}")
        if sampling.max_token_id() >= vocab:
            raise ValueError(
                f"sampling: stop token id {sampling.max_token_id()} lies outside the vocabulary [0, {vocab})"
            )
        if request_id is None:
            rid = self._next_id
            while rid in self.scheduler.live or rid in taken:
                rid += 1
        else:
            rid = _integer("request_id", request_id)
            if rid < 0:
                raise ValueError(f"request_id must be >= 0, got {rid}")
            if rid in self.scheduler.live or rid in taken:
                raise ValueError(f"request_id {rid} is already waiting or running")
        room = self.max_model_len - len(prompt)
        if room < 1:
            raise ValueError(
                f"token_ids: a prompt of {len(prompt)} tokens leaves no room for a new token under "
                f"max_model_len {self.max_model_len}"
            )
        capacity = self.num_pages * self.page_size
        if max_new_tokens is None:
            max_new_tokens = min(room, capacity - len(prompt))
        elif max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (or None), got {max_new_tokens}")
        elif max_new_tokens > room:
            raise ValueError(
                f"max_new_tokens: prompt + max_new_tokens = {len(prompt) + max_new_tokens} exceeds max_model_len "
                f"{self.max_model_len} (None generates up to it)"
            )
        if max_new_tokens < 1 or len(prompt) + max_new_tokens > capacity:
            raise ValueError(
                f"token_ids: a prompt of {len(prompt)} tokens + {max(max_new_tokens, 1)} new ones needs more "
                f"pages than the pool has ({self.num_pages} pages of {self.page_size} tokens): it could never run"
            )
        return Request(rid, prompt, len(prompt), max_new_tokens, sampling, np.random.default_rng(sampling.seed))

    def _check_prompt(self, token_ids: object) -> list[int]:
        """`token_ids` as a list of ints, checked (see `add_request`)."""
        if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, (Iterable, np.ndarray)):
            raise TypeError(f"token_ids must be a sequence of integer token ids, got {type(token_ids).__name__}")
        arr = token_ids if isinstance(token_ids, np.ndarray) else None
        if arr is None:
            items = list(token_ids)
            if any(isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Integral) for t in items):
                bad = next(t for t in items if isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Integral))
                raise TypeError(f"token_ids must be integers, got {type(bad).__name__} {bad!r}")
            prompt = [int(t) for t in items]
        else:
            if arr.ndim != 1:
                raise TypeError(f"token_ids must be 1-D, got an array of shape {arr.shape}")
            if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
                raise TypeError(f"token_ids must have an integer dtype, got {arr.dtype}")
            prompt = arr.tolist()
        if not prompt:
            raise ValueError("token_ids must be non-empty")
        lo, hi = min(prompt), max(prompt)
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(
                f"token_ids must lie in the vocabulary [0, {self.cfg.vocab_size}), got {lo if lo < 0 else hi}"
            )
        return prompt

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
        """One step as a transaction: schedule, execute, commit. If anything raises before the commit is
        complete (a late bad argument, the host path, a KeyboardInterrupt, a donated buffer), every request
        and every block goes back to where it was before the step (`Scheduler.restore`) and the exception
        propagates; a `SamplingError` (one request's logits could not be sampled) instead finishes that
        request alone with reason "error" and the step returns nothing else (the others run again on the
        next step, to the tokens they would have had)."""
        t0 = time.perf_counter()
        before = self.scheduler.snapshot()
        try:
            out = self.scheduler.schedule()
            if not out:
                self.stats.preemptions += len(out.preempted)
                return {}, []
            t1 = time.perf_counter()
            result = self.runner.execute(out)
            with _sigint_deferred():  # the commit: no KeyboardInterrupt half-way through it
                new, done = self.scheduler.update_from_output(out, result.tokens)
        except SamplingError as e:
            self._roll_back(before)
            culprit = self.scheduler.fail(e.request_id, str(e)).to_output()
            self.finished.add(culprit)
            logger.warning("request %d failed and was finished alone: %s", e.request_id, e)
            return {}, [culprit]
        except BaseException:
            self._roll_back(before)
            raise
        for o in done:
            self.finished.add(o)
        t2 = time.perf_counter()
        st = self.stats
        st.preemptions += len(out.preempted)
        st.shared_tokens += out.shared_tokens
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

    def _roll_back(self, before: SchedulerState | MeshSchedulerState) -> None:
        """After a step raised: every request and block as before it (`Scheduler.restore`). If the device
        caches were lost (donated to the failed forward), start from empty ones and recompute every
        running request (their tokens do not change)."""
        with _sigint_deferred():
            self.stats.failed_steps += 1
            if isinstance(self.scheduler, MeshScheduler):
                self.scheduler.restore(before)
            else:
                assert isinstance(before, SchedulerState)
                self.scheduler.restore(before)
            if self.runner.caches_lost():
                logger.error("a step failed and took the device caches with it: every running request is recomputed")
                self.runner.reset_caches()
                self.stats.preemptions += len(self.scheduler.running)
                self.scheduler.preempt_all()
            else:
                logger.warning("a step failed; every request and page is as before it")

    def generate(
        self,
        prompts: Iterable[Iterable[int]],
        max_new_tokens: int | None = None,
        sampling: SamplingParams | None = None,
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> list[list[int]]:
        """Add every prompt, run steps until all are done, return their outputs in order. Every prompt is
        checked (as `add_request` does) before any is queued: one bad prompt refuses the call and leaves the
        engine as it was. `on_tokens(id, tokens)` streams each step's new tokens. (The outputs are collected
        as requests finish, so they do not depend on how many `finished` keeps.)"""
        reqs: list[Request] = []  # every prompt checked before any is queued: a bad one refuses them all
        for p in prompts:
            reqs.append(self._new_request(p, max_new_tokens, sampling, None, taken=[r.id for r in reqs]))
        for r in reqs:
            self.scheduler.add(r)
            self._next_id = max(self._next_id, r.id + 1)
        ids = [r.id for r in reqs]
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
        total = self.num_pages * len(self.kvs)
        held = (total - sum(kv.num_free for kv in self.kvs)) / total
        return {**sizes, "held": int(held * sum(sizes.values()))}

"""`Engine`: continuous batching of generation requests over the small DSA model.

Every `step()` builds one flattened batch: running requests each contribute their next tokens (one for
a decode, a chunk of the prompt for a prefill) under a per-step token budget (chunked prefill), new
requests join as soon as there is budget (continuous batching), and one forward runs them all.

Pages: both caches of every layer (latent rows, indexer keys, on the device and, when the host selects,
in the Rust cache) are paged alike from one reference-counted pool (`paging.PagePool`). A request takes
pages as its tokens reach them and lets go when it finishes or is aborted.

Prefix sharing: a request whose leading tokens another live request has already computed adopts that
request's whole pages instead of recomputing them (`paging.PrefixIndex`; the host caches `fork` the
donor's sequence and `truncate` it to the shared length). Shared pages are never written again.

Preemption: when the pool runs dry, requests that arrived later give way to earlier ones: their pages
go back and their tokens (prompt and output so far) are recomputed when they resume, so their output
does not change; the oldest request always progresses.

Placement of the indexer, per step: `"device"` (in the one jitted forward), `"host"` (the Rust
`IndexerKeyCache` of each layer selects between the device halves of the layer, pipelined over two
micro-batches so host and device overlap), or `"auto"`: whichever a cost model measured at start-up
on this machine (`placement.PlacementCosts`) predicts faster for the step's rows. Under "host" and
"auto" the device and host indexer caches are kept byte-identical, so any step may go either way.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from dsa_hybrid.host.cache import IndexerKeyCache
from dsa_hybrid.models.causal_lm import (
    ModelParams,
    create_caches,
    forward_host,
    forward_jit,
    new_index_rows,
    padded_rows,
)
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.serving.kv_manager import PagePool, PrefixIndex
from dsa_hybrid.serving.placement import PlacementCosts
from dsa_hybrid.serving.sampling import SamplingParams, sample

PLACEMENTS = ("device", "host", "auto")


@dataclasses.dataclass
class Request:
    id: int
    tokens: list[int]  # the prompt, then the output so far: one list, read every step and never rebuilt
    num_prompt: int
    max_new_tokens: int
    sampling: SamplingParams
    rng: np.random.Generator
    pages: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # tokens whose keys and latents are in the caches
    finished: bool = False

    @property
    def prompt(self) -> list[int]:
        return self.tokens[: self.num_prompt]

    @property
    def output(self) -> list[int]:
        return self.tokens[self.num_prompt :]


@dataclasses.dataclass
class EngineStats:
    """Counters and per-stage seconds since the engine was made."""

    steps: int = 0
    prompt_tokens_computed: int = 0  # prompt (and recomputed) tokens run through the model
    decode_tokens: int = 0  # tokens produced
    shared_tokens: int = 0  # tokens adopted from other requests' pages instead of being computed
    preemptions: int = 0
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


class Engine:
    """Serve generation requests in continuous batches.

    Args:
        params, cfg: the model (`ModelParams`, `DSAConfig`).
        num_pages, page_size: the page pool shared by every layer's caches.
        max_tokens_per_step: the token budget of one step (prefill chunks and decodes together).
        max_model_len: the longest sequence (prompt + output) a request may reach.
        latent_kind, indexer: cache formats (see `DSACaches.create`); "host" and "auto" need the FP8 indexer.
            `latent_kind` defaults to "bf16", except on a CPU backend: "f32" there, because XLA on CPU
            updates a bf16 array by converting all of it to f32 and back, a whole-cache pass per layer
            and step (measured: +40 ms per V3.2 layer at 64K).
        backend: `sparse_mla` backend ("auto", "xla", "pallas_tpu").
        placement: "device", "host" or "auto" (the indexer's side, see the module docstring).
        cost_model: for "auto", a `PlacementCosts` to use instead of measuring one at start-up.
        host_threads: threads of the host indexer (None: all cores).
        micro_batches: row groups pipelined in host steps (1: no overlap).
        prefix_sharing: adopt other live requests' computed pages for equal leading tokens.
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
        backend: str = "auto",
        placement: str = "device",
        cost_model: PlacementCosts | None = None,
        host_threads: int | None = None,
        micro_batches: int = 2,
        prefix_sharing: bool = True,
    ) -> None:
        if max_tokens_per_step < 1 or num_pages < 1 or micro_batches < 1:
            raise ValueError("max_tokens_per_step, num_pages and micro_batches must be >= 1")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement: expected one of {PLACEMENTS}, got {placement!r}")
        if placement != "device" and indexer != "fp8":
            raise ValueError(f"placement {placement!r} needs indexer='fp8' (the host cache holds FP8 keys)")
        if placement != "device" and page_size % 16:
            raise ValueError(f"placement {placement!r} needs a page_size that is a multiple of 16, got {page_size}")
        self.params, self.cfg, self.page_size, self.backend = params, cfg, page_size, backend
        self.placement, self.host_threads, self.micro_batches = placement, host_threads, micro_batches
        self.budget = max_tokens_per_step
        self.max_model_len = max_model_len
        self.max_pages_per_seq = -(-max_model_len // page_size)
        if latent_kind is None:
            latent_kind = "f32" if jax.default_backend() == "cpu" else "bf16"
        self.caches = create_caches(cfg, num_pages, page_size, latent_kind=latent_kind, indexer=indexer)
        # The host's own paging, same capacity; layers that run no indexer (GLM-5 "shared") have none.
        self.host_caches: tuple[IndexerKeyCache | None, ...] = ()
        if placement != "device":
            D = cfg.index_head_dim
            self.host_caches = tuple(
                None if cfg.layer_indexer_type(i) == "shared" else IndexerKeyCache(num_pages, page_size, D)
                for i in range(cfg.num_hidden_layers)
            )
        self.cost_model = cost_model
        if placement == "auto" and cost_model is None:
            lengths = tuple(sorted({min(2048, max_model_len), min(16384, max_model_len)}))
            layer = next(i for i in range(cfg.num_hidden_layers) if cfg.layer_indexer_type(i) != "shared")
            self.cost_model = PlacementCosts.measure(
                cfg,
                params.blocks[layer].attn,
                page_size,
                lengths=lengths,
                rows=(1, min(8, max_tokens_per_step)),
                threads=host_threads,
                latent_kind=latent_kind,
            )
        self.pool = PagePool(num_pages)
        self.prefix = PrefixIndex(page_size) if prefix_sharing else None
        self.running: list[Request] = []  # in order of admission
        self.waiting: list[Request] = []
        self.finished: dict[int, Request] = {}
        self.stats = EngineStats()
        self._next_id = 0

    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    @property
    def free_pages(self) -> list[int]:
        return self.pool.free_pages

    @property
    def preemptions(self) -> int:
        return self.stats.preemptions

    # ----- requests ------------------------------------------------------------------------------
    def add_request(self, token_ids: Iterable[int], max_new_tokens: int, sampling: SamplingParams | None = None) -> int:
        """Queue a request; returns its id. ValueError for an empty prompt, a too-long request, or token
        ids outside the vocabulary. `sampling` defaults to greedy."""
        prompt = [int(t) for t in token_ids]
        if not prompt or max_new_tokens < 1:
            raise ValueError("token_ids must be non-empty and max_new_tokens >= 1")
        if len(prompt) + max_new_tokens > self.max_model_len:
            raise ValueError(
                f"prompt + max_new_tokens = {len(prompt) + max_new_tokens} exceeds max_model_len {self.max_model_len}"
            )
        if len(prompt) + max_new_tokens > self.num_pages * self.page_size:
            raise ValueError("the request alone needs more pages than the pool has")
        if min(prompt) < 0 or max(prompt) >= self.cfg.vocab_size:
            raise ValueError(f"token_ids must lie in [0, {self.cfg.vocab_size})")
        sampling = sampling or SamplingParams()
        rid = self._next_id
        self._next_id += 1
        rng = np.random.default_rng(sampling.seed)
        self.waiting.append(Request(rid, prompt, len(prompt), max_new_tokens, sampling, rng))
        return rid

    def abort(self, rid: int) -> None:
        """Drop a waiting or running request; its pages return to the pool. KeyError if unknown."""
        for queue in (self.waiting, self.running):
            for r in queue:
                if r.id == rid:
                    queue.remove(r)
                    self._release(r)
                    return
        raise KeyError(f"request {rid} is not waiting or running")

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    # ----- pages -----------------------------------------------------------------------------------
    def _hosts(self) -> list[IndexerKeyCache]:
        return [h for h in self.host_caches if h is not None]

    def _release(self, r: Request) -> None:
        self.pool.release(r.pages)
        if self.prefix is not None:
            self.prefix.forget(r)
        for host in self._hosts():
            if r.id in host.sequence_ids():
                host.free(r.id)
        r.pages, r.computed = [], 0

    def _preempt(self, r: Request) -> None:
        """Take `r` out of the running set: its pages go back, it waits at the front to be recomputed."""
        self.running.remove(r)
        self._release(r)
        self.waiting.insert(0, r)
        self.stats.preemptions += 1

    def _preempt_younger(self, keep: Request) -> bool:
        """Preempt the youngest running request that arrived after `keep`; False if there is none. Only
        younger requests give way, so the oldest always progresses (it fits the pool alone: checked by
        `add_request`) and two large requests cannot preempt each other forever."""
        younger = [r for r in self.running if r.id > keep.id]
        if not younger:
            return False
        self._preempt(max(younger, key=lambda r: r.id))
        return True

    def _reserve(self, r: Request, upto: int) -> bool:
        """Pages for positions `< upto`; preempts others when the pool is dry. False if impossible."""
        need = -(-upto // self.page_size) - len(r.pages)
        while need > self.pool.num_free:
            if not self._preempt_younger(keep=r):
                return False
        r.pages.extend(self.pool.take(max(need, 0)))
        return True

    def _adopt_prefix(self, r: Request) -> None:
        """Replace `r`'s pages by a donor's for the longest run of whole pages it has already computed."""
        match = self.prefix.longest_match(r) if self.prefix is not None else None
        if match is None:
            return
        donor, m = match
        shared = self.pool.share(donor.pages[:m])
        self.pool.release(r.pages)
        self.prefix.forget(r)
        self.stats.shared_tokens += m * self.page_size - r.computed
        r.pages, r.computed = shared, m * self.page_size
        self.prefix.register(r)
        for host in self._hosts():
            if r.id in host.sequence_ids():
                host.free(r.id)
            host.fork(donor.id, r.id)
            host.truncate(r.id, r.computed)

    # ----- scheduling ------------------------------------------------------------------------------
    def _schedule(self) -> list[tuple[Request, int, int]]:
        """`(request, start, count)` chunks of this step, within the token budget."""
        # Admission control, first come first served: a request joins when the free pages can hold its
        # first chunk (or when nothing runs: the oldest must progress); the rest wait without pages.
        while self.waiting:
            first_chunk = min(len(self.waiting[0].tokens), self.budget)
            if self.running and -(-first_chunk // self.page_size) > self.pool.num_free:
                break
            self.running.append(self.waiting.pop(0))
        plan, budget = [], self.budget
        for r in list(self.running):
            if budget == 0:
                break
            if r not in self.running:  # preempted while reserving pages for an earlier one
                continue
            if r.computed < len(r.tokens) - 1:
                self._adopt_prefix(r)
            start = r.computed
            count = min(len(r.tokens) - start, budget)
            if not self._reserve(r, start + count):
                self._preempt(r)  # waits without holding pages, so older requests can use them
                continue
            plan.append((r, start, count))
            budget -= count
        return [(r, s, c) for r, s, c in plan if r in self.running]

    def _choose_placement(self, positions: np.ndarray, device_rows: int, table_keys: int) -> str:
        if self.placement != "auto":
            return self.placement
        assert self.cost_model is not None
        return self.cost_model.choose(int(positions.sum()) + positions.size, device_rows, table_keys)

    def step(self) -> dict[int, list[int]]:
        """Run one batch; returns the new tokens of each request that produced one (streaming)."""
        t0 = time.perf_counter()
        plan = self._schedule()
        if not plan:
            return {}
        S = self.page_size
        # Block tables only as wide as this step needs (a power of two of pages: few compilations),
        # since the device indexer scans every column.
        P = min(self.max_pages_per_seq, 1 << (max(len(r.pages) for r, _, _ in plan) - 1).bit_length())
        tokens, positions, slots, tables, seq_ids = [], [], [], [], []
        for r, start, count in plan:
            pos = np.arange(start, start + count)
            pages = np.asarray(r.pages, np.int32)
            tokens.extend(r.tokens[start : start + count])
            positions.append(pos)
            slots.append(pages[pos // S] * S + pos % S)
            row = np.full(P, -1, np.int32)
            row[: pages.size] = pages
            tables.append(np.repeat(row[None], count, 0))
            seq_ids.append(np.full(count, r.id, np.int64))
            for host in self._hosts():
                if start == 0 and r.id not in host.sequence_ids():  # first chunk, or resumed after preemption
                    host.add_sequence(r.id)
        batch = (np.asarray(tokens, np.int32), np.concatenate(positions).astype(np.int32),
                 np.concatenate(slots).astype(np.int32), np.concatenate(tables), np.concatenate(seq_ids))  # fmt: skip
        T = len(tokens)
        padded = padded_rows(T)
        where = self._choose_placement(batch[1], padded, P * S)
        t1 = time.perf_counter()
        if where == "host":
            logits = self._forward_host(*batch)
        else:
            logits = self._forward_device(*batch, padded)
        logits.block_until_ready()  # dispatch is asynchronous: charge the forward to its own stage
        t2 = time.perf_counter()
        new = self._sample(plan, logits)
        t3 = time.perf_counter()
        st = self.stats
        st.steps += 1
        st.steps_by_placement[where] += 1
        st.prompt_tokens_computed += sum(c for r, s, c in plan if s < r.num_prompt)
        st.decode_tokens += len(new)
        if all(s >= r.num_prompt for r, s, _ in plan):
            st.decode_step_log.append((t3 - t0, len(new)))
        for stage, secs in (("schedule", t1 - t0), ("forward", t2 - t1), ("sample", t3 - t2)):
            st.seconds[stage] += secs
        return new

    def _sample(self, plan: list[tuple[Request, int, int]], logits) -> dict[int, list[int]]:
        """Each request whose chunk reached its end draws its next token from its chunk's last row."""
        ends, row = [], 0
        for r, start, count in plan:
            row += count
            r.computed = start + count
            if self.prefix is not None:
                self.prefix.register(r)
            if r.computed == len(r.tokens):
                ends.append((r, row - 1))
        if not ends:
            return {}
        greedy = np.asarray(jnp.argmax(logits, axis=-1))  # the common case: one small transfer
        sampled = [i for i, (r, _) in enumerate(ends) if not r.sampling.greedy]
        rows = np.asarray(logits[np.asarray([ends[i][1] for i in sampled], np.int32)]) if sampled else None
        new: dict[int, list[int]] = {}
        for i, (r, last) in enumerate(ends):
            tok = int(greedy[last]) if r.sampling.greedy else sample(rows[sampled.index(i)], r.sampling, r.rng)
            r.tokens.append(tok)
            new[r.id] = [tok]
            if len(r.tokens) - r.num_prompt >= r.max_new_tokens:
                r.finished = True
                self.running.remove(r)
                self._release(r)
                self.finished[r.id] = r
        return new

    def _forward_device(self, tokens, positions, slots, tables, seq_ids, padded: int):
        T = len(tokens)
        slots_dev = jnp.asarray(np.pad(slots, (0, padded - T), constant_values=-1))
        logits, self.caches = forward_jit(
            self.params,
            self.cfg,
            jnp.asarray(np.pad(tokens, (0, padded - T))),
            jnp.asarray(np.pad(positions, (0, padded - T))),
            slots_dev,
            jnp.asarray(np.pad(tables, ((0, padded - T), (0, 0)), constant_values=-1)),
            self.caches,
            self.backend,
        )
        if self.host_caches:  # keep the host indexer caches identical: the bytes the device just wrote
            self._append_to_hosts(new_index_rows(self.caches, slots_dev), seq_ids)
        return logits

    def _append_to_hosts(self, rows, seq_ids: np.ndarray) -> None:
        codes, scales = (np.asarray(a)[:, : seq_ids.size] for a in rows)
        for i, host in enumerate(self.host_caches):
            if host is None:
                continue
            for sid in dict.fromkeys(seq_ids.tolist()):
                mask = seq_ids == sid
                host.append_quantized(sid, codes[i][mask], scales[i][mask])

    def _forward_host(self, tokens, positions, slots, tables, seq_ids):
        logits, self.caches = forward_host(
            self.params, self.cfg, tokens, positions, slots, tables, self.caches, self.host_caches, seq_ids,
            self.backend, self.host_threads, self.micro_batches,
        )  # fmt: skip
        return logits

    def generate(
        self,
        prompts: Iterable[Iterable[int]],
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> list[list[int]]:
        """Add every prompt, run steps until all are done, return their outputs in order. `on_tokens(id,
        tokens)` streams each step's new tokens."""
        ids = [self.add_request(p, max_new_tokens, sampling) for p in prompts]
        while self.has_unfinished():
            for rid, toks in self.step().items():
                if on_tokens is not None:
                    on_tokens(rid, toks)
        return [self.finished[i].output for i in ids]

    # ----- memory ----------------------------------------------------------------------------------
    def cache_bytes(self) -> dict[str, int]:
        """Bytes of every cache (capacity) and of the pages held now, summed over layers."""
        latent = sum(sum(a.nbytes for a in _arrays(c.latent)) for c in self.caches)
        index = sum(sum(a.nbytes for a in _arrays(c.index)) for c in self.caches)
        host = sum(h.num_blocks * h.page_bytes for h in self._hosts())
        held = (self.num_pages - self.pool.num_free) / self.num_pages
        return {"latent": latent, "device_indexer": index, "host_indexer": host,
                "held": int(held * (latent + index + host))}  # fmt: skip


def _arrays(tree) -> list:
    return [a for a in jax.tree_util.tree_leaves(tree) if hasattr(a, "nbytes")]

"""`Engine`: continuous batching of greedy generation requests over the small DSA model.

Every `step()` builds one flattened batch: running requests each contribute their next tokens —
one for a decode, a chunk of the prompt for a prefill — under a per-step token budget (chunked
prefill), new requests join as soon as there is budget (continuous batching), and a single
`model.forward` runs them all. Both caches of every layer are paged alike from one pool of pages;
pages are taken when a request's tokens reach them and returned when it finishes or is aborted. When
the pool runs dry, requests that arrived later give way to earlier ones (preemption): their pages go
back and their tokens (prompt and the output so far) are recomputed when they resume, so their output
does not change; the oldest request always progresses.

Placement: `"device"` runs the indexer in JAX with the rest of the layer; `"host"` keeps one Rust
`IndexerKeyCache` per layer and selects on the CPU between the two device halves of each layer
(`dsa_attention_host`): requests are its sequences (added when first scheduled, freed when finished,
aborted or preempted). Not yet: prefix sharing through `fork`, the measured "auto" placement and
host/device overlap, sampling other than greedy (see the project's issue 7).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax.numpy as jnp
import numpy as np

from .cache import IndexerKeyCache
from .config import DSAConfig
from .model import ModelParams, _forward_jit, create_caches, forward_host


@dataclasses.dataclass
class Request:
    id: int
    prompt: list[int]
    max_new_tokens: int
    output: list[int] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # tokens whose keys and latents are in the caches
    finished: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


class Engine:
    """Serve greedy generation requests in continuous batches.

    Args:
        params, cfg: the model (`ModelParams`, `DSAConfig`).
        num_pages, page_size: the page pool shared by every layer's latent and indexer caches.
        max_tokens_per_step: the token budget of one step (prefill chunks and decodes together).
        max_model_len: the longest sequence (prompt + output) a request may reach.
        latent_kind, indexer: cache formats (see `DSACaches.create`).
        backend: `sparse_mla` backend.
        placement: "device" or "host" (the indexer on the CPU; `page_size` a multiple of 16).
        host_threads: threads of the host indexer (None: all cores).
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
        latent_kind: str = "bf16",
        indexer: str = "fp8",
        backend: str = "auto",
        placement: str = "device",
        host_threads: int | None = None,
    ) -> None:
        if max_tokens_per_step < 1 or num_pages < 1:
            raise ValueError("max_tokens_per_step and num_pages must be >= 1")
        if placement not in ("device", "host"):
            raise ValueError(f"placement: expected 'device' or 'host', got {placement!r}")
        self.placement, self.host_threads = placement, host_threads
        self.host_caches: tuple[IndexerKeyCache, ...] = ()
        if placement == "host":
            # The host's own paging: the same capacity as the device pool.
            self.host_caches = tuple(
                IndexerKeyCache(num_pages, page_size, cfg.index_head_dim) for _ in range(cfg.num_hidden_layers)
            )
        self.params, self.cfg, self.page_size, self.backend = params, cfg, page_size, backend
        self.budget = max_tokens_per_step
        self.max_pages_per_seq = -(-max_model_len // page_size)
        self.max_model_len = max_model_len
        self.caches = create_caches(cfg, num_pages, page_size, latent_kind=latent_kind, indexer=indexer)
        self.num_pages = num_pages
        self.free_pages = list(range(num_pages - 1, -1, -1))
        self.running: list[Request] = []  # in order of admission
        self.waiting: list[Request] = []
        self.finished: dict[int, Request] = {}
        self.preemptions = 0
        self._next_id = 0

    # ----- requests ------------------------------------------------------------------------------
    def add_request(self, token_ids: Iterable[int], max_new_tokens: int) -> int:
        """Queue a request; returns its id. ValueError for an empty prompt, a too-long request, or token
        ids outside the vocabulary."""
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
        rid = self._next_id
        self._next_id += 1
        self.waiting.append(Request(rid, prompt, max_new_tokens))
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

    # ----- scheduling ------------------------------------------------------------------------------
    def _release(self, r: Request) -> None:
        self.free_pages.extend(reversed(r.pages))
        if r.pages or r.computed:
            for host in self.host_caches:
                if r.id in host.sequence_ids():
                    host.free(r.id)
        r.pages, r.computed = [], 0

    def _preempt(self, r: Request) -> None:
        """Take `r` out of the running set: its pages go back, it waits at the front to be recomputed."""
        self.running.remove(r)
        self._release(r)
        self.waiting.insert(0, r)
        self.preemptions += 1

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
        while need > len(self.free_pages):
            if not self._preempt_younger(keep=r):
                return False
        r.pages.extend(self.free_pages.pop() for _ in range(max(need, 0)))
        return True

    def _schedule(self) -> list[tuple[Request, int, int]]:
        """`(request, start, count)` chunks of this step, within the token budget."""
        while self.waiting:  # admission: as many as there are requests; budget decides who runs
            self.running.append(self.waiting.pop(0))
        plan, budget = [], self.budget
        for r in list(self.running):
            if budget == 0:
                break
            if r not in self.running:  # preempted while reserving pages for an earlier one
                continue
            start = r.computed
            count = min(len(r.tokens) - start, budget)
            if not self._reserve(r, start + count):
                self._preempt(r)  # waits without holding pages, so older requests can use them
                continue
            plan.append((r, start, count))
            budget -= count
        return [(r, s, c) for r, s, c in plan if r in self.running]

    def step(self) -> dict[int, list[int]]:
        """Run one batch; returns the new tokens of each request that produced one (streaming)."""
        plan = self._schedule()
        if not plan:
            return {}
        S, P = self.page_size, self.max_pages_per_seq
        tokens, positions, slots, tables = [], [], [], []
        for r, start, count in plan:
            pos = np.arange(start, start + count)
            pages = np.asarray(r.pages, np.int32)
            tokens.extend(r.tokens[start : start + count])
            positions.append(pos)
            slots.append(pages[pos // S] * S + pos % S)
            row = np.full(P, -1, np.int32)
            row[: pages.size] = pages
            tables.append(np.repeat(row[None], count, 0))
        T = len(tokens)
        if self.placement == "host":
            logits = self._forward_host(plan, tokens, positions, slots, tables)
        else:
            logits = self._forward_device(tokens, positions, slots, tables)
        next_ids = np.asarray(jnp.argmax(logits, axis=-1))[:T]
        new: dict[int, list[int]] = {}
        row = 0
        for r, start, count in plan:
            row += count
            r.computed = start + count
            if r.computed == len(r.tokens):  # the chunk reached the end: its last row predicts a token
                tok = int(next_ids[row - 1])
                r.output.append(tok)
                new[r.id] = [tok]
                if len(r.output) >= r.max_new_tokens:
                    r.finished = True
                    self.running.remove(r)
                    self._release(r)
                    self.finished[r.id] = r
        return new

    def _forward_device(self, tokens, positions, slots, tables) -> jnp.ndarray:
        T = len(tokens)
        pad = max(8, 1 << (T - 1).bit_length()) - T  # a few batch shapes only: fewer compilations
        logits, self.caches = _forward_jit(
            self.params,
            self.cfg,
            jnp.asarray(np.pad(np.asarray(tokens, np.int32), (0, pad))),
            jnp.asarray(np.pad(np.concatenate(positions).astype(np.int32), (0, pad))),
            jnp.asarray(np.pad(np.concatenate(slots).astype(np.int32), (0, pad), constant_values=-1)),
            jnp.asarray(np.pad(np.concatenate(tables), ((0, pad), (0, 0)), constant_values=-1)),
            self.caches,
            self.backend,
        )
        return logits

    def _forward_host(self, plan, tokens, positions, slots, tables) -> jnp.ndarray:
        # No padding rows here: each row belongs to a sequence of the host caches.
        seq_ids = np.concatenate([np.full(c, r.id, np.int64) for r, _, c in plan])
        for r, start, _ in plan:
            if start == 0:  # first chunk (or resumed after preemption): a fresh host sequence
                for host in self.host_caches:
                    host.add_sequence(r.id)
        latents = tuple(c.latent for c in self.caches)
        logits, latents = forward_host(
            self.params, self.cfg, jnp.asarray(np.asarray(tokens, np.int32)),
            jnp.asarray(np.concatenate(positions).astype(np.int32)),
            jnp.asarray(np.concatenate(slots).astype(np.int32)),
            jnp.asarray(np.concatenate(tables)), latents, self.host_caches, seq_ids, self.backend, self.host_threads,
        )  # fmt: skip
        self.caches = tuple(dataclasses.replace(c, latent=lat) for c, lat in zip(self.caches, latents, strict=True))
        return logits

    def generate(
        self,
        prompts: Iterable[Iterable[int]],
        max_new_tokens: int,
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> list[list[int]]:
        """Add every prompt, run steps until all are done, return their outputs in order. `on_tokens(id,
        tokens)` streams each step's new tokens."""
        ids = [self.add_request(p, max_new_tokens) for p in prompts]
        while self.has_unfinished():
            for rid, toks in self.step().items():
                if on_tokens is not None:
                    on_tokens(rid, toks)
        return [self.finished[i].output for i in ids]

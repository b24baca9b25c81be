"""`ModelRunner`: executes one scheduled step on the device, or with the indexer on the host, and samples.

It owns the caches: every layer's device `DSACaches` (latent rows and indexer keys) and, when the indexer
may run on the host ("host" or "auto" placement), one Rust `IndexerKeyCache` per indexer layer. All of
them are paged through the scheduler's block tables (`KVManager`): a row's keys live at the same slot in
every cache, and the host caches hold no sequences of their own.

One step (`execute`):
1. `build_batch` flattens the chunks into rows (token, absolute position, cache slot, its request's block
   table), the tables only as wide as this step needs, rounded up to one of 8 widths per octave
   (`table_width`), and the rows padded to a power of two on the device (`models.causal_lm.padded_rows`),
   so few shapes compile.
2. The placement: "device", "host", or per step under "auto", whichever `PlacementCosts` predicts faster
   (by more than its measurement's spread; else the platform's default, "host" on a CPU).
3. The forward: `models.causal_lm.forward_jit` (everything on the device; under "host"/"auto" the keys it
   wrote are then copied to the host caches with `write_slots`, so both indexer caches always hold the
   same bytes), or `forward_host` (each layer's selection in the Rust cache, two micro-batches pipelined).
4. Sampling: one argmax per sampling row, and full logits rows only for requests that sample
   (`sampling.sample`, from each request's own generator).

A step that raises leaves the device caches either intact or deleted (they are donated to the forward):
`caches_lost()` says which, and `reset_caches()` starts over with empty ones.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time

import jax
import numpy as np

from dsa_hybrid.host.cache import IndexerKeyCache
from dsa_hybrid.models.causal_lm import (
    ModelParams,
    StepLogits,
    create_caches,
    forward_host_step,
    forward_jit,
    greedy_rows,
    new_index_rows,
    pad_rows,
    padded_rows,
)
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.ops.sparse_mla import Backend
from dsa_hybrid.ops.target import target_device
from dsa_hybrid.serving.placement import PlacementCosts
from dsa_hybrid.serving.sampling import draw_tokens
from dsa_hybrid.serving.scheduler import ScheduledChunk, SchedulerOutput

logger = logging.getLogger(__name__)

PLACEMENTS = ("device", "host", "auto")


@dataclasses.dataclass(frozen=True)
class Batch:
    """One step's rows, unpadded (a chunk's rows contiguous, in chunk order)."""

    tokens: np.ndarray  # int32 [T]
    positions: np.ndarray  # int32 [T] absolute position of each row in its sequence
    slots: np.ndarray  # int32 [T] cache slot of each row (block · block_size + offset)
    block_tables: np.ndarray  # int32 [T, W] each row's request's block table, −1 padded
    row_requests: np.ndarray  # int64 [T] each row's request id
    sample_rows: np.ndarray  # int32 [n] the last row of each chunk that samples, in chunk order

    @property
    def num_rows(self) -> int:
        return int(self.tokens.size)


WIDTHS_PER_OCTAVE = 8


def table_width(pages: int, limit: int) -> int:
    """The block-table width (in pages) a step whose widest table has `pages` pages is padded to: exact
    below `2 · WIDTHS_PER_OCTAVE` pages, then rounded up to a multiple of `2^(floor(log2 pages) − 3)`,
    i.e. 8 widths per octave. The padding is under 12.5% of the width (and costs the device indexer
    almost nothing: it skips the key chunks past a block's last position), and a context growing to `n`
    pages compiles about `8 · log2 n − 17` widths, not one program per width. Capped at `limit` (the
    longest table a request may have), never below `pages`."""
    if pages < 1:
        raise ValueError(f"pages: must be >= 1, got {pages}")
    step = 1 << max(0, pages.bit_length() - 1 - (WIDTHS_PER_OCTAVE.bit_length() - 1))
    return max(pages, min(limit, -(-pages // step) * step))


def build_batch(chunks: tuple[ScheduledChunk, ...] | list[ScheduledChunk], block_size: int, width: int) -> Batch:
    """The rows of `chunks`, block tables `width` blocks wide (each chunk's table must fit). Per chunk, not
    per token: the rows are made by numpy."""
    n = len(chunks)
    counts = np.fromiter((c.count for c in chunks), np.int64, n)
    starts = np.fromiter((c.start for c in chunks), np.int64, n)
    tables = np.full((n, width), -1, np.int32)
    for i, c in enumerate(chunks):
        tables[i, : len(c.block_table)] = c.block_table
    T = int(counts.sum())
    tokens = np.fromiter(itertools.chain.from_iterable(c.token_ids for c in chunks), np.int32, T)
    chunk_of_row = np.repeat(np.arange(n), counts)
    first_row = np.cumsum(counts) - counts
    positions = starts[chunk_of_row] + np.arange(T) - first_row[chunk_of_row]
    row_tables = tables[chunk_of_row]
    slots = row_tables[np.arange(T), positions // block_size] * block_size + positions % block_size
    ids = np.fromiter((c.request_id for c in chunks), np.int64, n)
    samples = np.fromiter((c.samples for c in chunks), bool, n)
    return Batch(
        tokens,
        positions.astype(np.int32),
        slots.astype(np.int32),
        row_tables,
        ids[chunk_of_row],
        (first_row + counts - 1)[samples].astype(np.int32),
    )


@dataclasses.dataclass(frozen=True)
class RunnerOutput:
    """What a step produced: the next token of each request whose chunk samples, where its indexer ran,
    and the seconds of its stages (`prepare`: batch assembly and placement)."""

    tokens: dict[int, int]
    placement: str
    seconds: dict[str, float]


class ModelRunner:
    """The model, its caches and the step executor (arguments as in `Engine`)."""

    def __init__(
        self,
        params: ModelParams,
        cfg: DSAConfig,
        *,
        num_pages: int,
        page_size: int,
        max_model_len: int,
        max_tokens_per_step: int = 128,
        latent_kind: str | None = None,
        indexer: str = "fp8",
        backend: Backend = "auto",
        placement: str = "device",
        cost_model: PlacementCosts | None = None,
        host_threads: int | None = None,
        micro_batches: int = 2,
    ) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement: expected one of {PLACEMENTS}, got {placement!r}")
        if placement != "device" and indexer != "fp8":
            raise ValueError(f"placement {placement!r} needs indexer='fp8' (the host cache holds FP8 keys)")
        if placement != "device" and page_size % 16:
            raise ValueError(f"placement {placement!r} needs a page_size that is a multiple of 16, got {page_size}")
        if micro_batches < 1 or num_pages < 1:
            raise ValueError("num_pages and micro_batches must be >= 1")
        self.params, self.cfg, self.backend = params, cfg, backend
        self.num_pages, self.page_size = num_pages, page_size
        self.placement, self.host_threads, self.micro_batches = placement, host_threads, micro_batches
        self.max_pages_per_seq = -(-max_model_len // page_size)
        if latent_kind is None:
            latent_kind = "f32" if target_device().platform == "cpu" else "bf16"
        self.latent_kind, self.indexer = latent_kind, indexer
        self.caches = create_caches(cfg, num_pages, page_size, latent_kind=latent_kind, indexer=indexer)
        self.host_caches = self._new_host_caches()
        self.cost_model = cost_model
        # Where "auto" goes when the cost model cannot tell the two apart (within its measurement's
        # spread): the platform's default, what `placement=None` runs on a CPU or an accelerator.
        self.auto_default = "host" if target_device().platform == "cpu" else "device"
        # Where the cost model came from: "given", "loaded" (stored by an earlier start-up), "measured".
        self.cost_model_source: str | None = None if cost_model is None else "given"
        if placement == "auto" and cost_model is None:
            lengths = tuple(sorted({min(2048, max_model_len), min(16384, max_model_len)}))
            layer = next(i for i in range(cfg.num_hidden_layers) if cfg.layer_indexer_type(i) != "shared")
            t0 = time.perf_counter()
            self.cost_model, self.cost_model_source = PlacementCosts.cached(
                cfg,
                params.blocks[layer].attn,
                page_size,
                lengths=lengths,
                rows=(1, min(8, max_tokens_per_step)),
                threads=host_threads,
                latent_kind=latent_kind,
                indexer=indexer,
            )
            logger.info(
                "placement cost model %s in %.1f s: %s",
                self.cost_model_source, time.perf_counter() - t0, self.cost_model,
            )  # fmt: skip

    def _new_host_caches(self) -> tuple[IndexerKeyCache | None, ...]:
        """One host cache per indexer layer, as many pages as the device's (none under "device"; layers
        that run no indexer, GLM-5 "shared", have none)."""
        if self.placement == "device":
            return ()
        cfg = self.cfg
        return tuple(
            None
            if cfg.layer_indexer_type(i) == "shared"
            else IndexerKeyCache(self.num_pages, self.page_size, cfg.index_head_dim)
            for i in range(cfg.num_hidden_layers)
        )

    # ----- the step --------------------------------------------------------------------------------
    def choose_placement(self, batch: Batch, padded: int) -> str:
        if self.placement != "auto":
            return self.placement
        assert self.cost_model is not None
        visible = int(batch.positions.sum()) + batch.num_rows
        # The device indexer reads keys up to its rows' last position (it skips chunks past it), not
        # the whole padded table.
        device_keys = min(batch.block_tables.shape[1] * self.page_size, int(batch.positions.max()) + 1)
        return self.cost_model.choose(visible, padded, device_keys, default=self.auto_default)

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run the step `out` describes; returns the sampled tokens (nothing of the scheduler's state is
        touched: the caller commits them)."""
        t0 = time.perf_counter()
        widest = max(len(c.block_table) for c in out.chunks)
        batch = build_batch(out.chunks, self.page_size, table_width(widest, self.max_pages_per_seq))
        padded = padded_rows(batch.num_rows)
        where = self.choose_placement(batch, padded)
        t1 = time.perf_counter()
        logits = self._forward_host(batch) if where == "host" else self._forward_device(batch, padded)
        logits.block_until_ready()  # dispatch is asynchronous: charge the forward to its own stage
        t2 = time.perf_counter()
        tokens = self.sample(out.chunks, batch, logits)
        t3 = time.perf_counter()
        return RunnerOutput(tokens, where, {"prepare": t1 - t0, "forward": t2 - t1, "sample": t3 - t2})

    def _forward_device(self, b: Batch, padded: int) -> StepLogits:
        # The row arrays go in as numpy: jit moves them itself, far cheaper than a `jnp.asarray` each.
        slots = pad_rows(b.slots, padded, -1)
        logits, self.caches = forward_jit(
            self.params,
            self.cfg,
            pad_rows(b.tokens, padded, 0),
            pad_rows(b.positions, padded, 0),
            slots,
            pad_rows(b.block_tables, padded, -1),
            self.caches,
            self.backend,
        )
        if self.host_caches:  # keep the host indexer caches identical: the bytes the device just wrote
            codes, scales = (np.asarray(a)[:, : b.num_rows] for a in new_index_rows(self.caches, slots))
            for i, host in enumerate(self.host_caches):
                if host is not None:
                    host.write_slots(b.slots, np.ascontiguousarray(codes[i]), np.ascontiguousarray(scales[i]))
        return StepLogits((logits,), (greedy_rows(logits),), (b.num_rows,))

    def _forward_host(self, b: Batch) -> StepLogits:
        logits, self.caches = forward_host_step(
            self.params, self.cfg, b.tokens, b.positions, b.slots, b.block_tables, self.caches, self.host_caches,
            b.row_requests, self.backend, self.host_threads, self.micro_batches,
        )  # fmt: skip
        return logits

    def sample(self, chunks: tuple[ScheduledChunk, ...], batch: Batch, logits: StepLogits) -> dict[int, int]:
        """The next token of each chunk that samples, from its last row. Greedy requests take the argmax
        computed on the device (one int32 per row crosses to the host); the others draw from their own
        generator, whose state is restored if this raises (so a retried step draws the same tokens)."""
        rows = batch.sample_rows
        if not rows.size:
            return {}
        greedy = logits.greedy()[rows]
        samplers = [c for c in chunks if c.samples]
        tokens = dict(zip([c.request_id for c in samplers], greedy.tolist(), strict=True))
        drawn = [i for i, c in enumerate(samplers) if not c.sampling.greedy]
        if drawn:
            draw_tokens([samplers[i] for i in drawn], logits.take(rows[drawn]), tokens)
        return tokens

    # ----- caches ----------------------------------------------------------------------------------
    def caches_lost(self) -> bool:
        """Whether the device caches were deleted (donated to a forward that then failed)."""
        return any(a.is_deleted() for a in jax.tree_util.tree_leaves(self.caches) if hasattr(a, "is_deleted"))

    def reset_caches(self) -> None:
        """Empty caches of the same shapes (every request must then be recomputed)."""
        self.caches = create_caches(
            self.cfg, self.num_pages, self.page_size, latent_kind=self.latent_kind, indexer=self.indexer
        )
        self.host_caches = self._new_host_caches()

    def cache_bytes(self) -> dict[str, int]:
        """Bytes of every cache (capacity), summed over layers."""
        latent = sum(sum(a.nbytes for a in _arrays(c.latent)) for c in self.caches)
        index = sum(sum(a.nbytes for a in _arrays(c.index)) for c in self.caches)
        host = sum(h.num_blocks * h.page_bytes for h in self.host_caches if h is not None)
        return {"latent": latent, "device_indexer": index, "host_indexer": host}


def _arrays(tree) -> list:
    return [a for a in jax.tree_util.tree_leaves(tree) if hasattr(a, "nbytes")]

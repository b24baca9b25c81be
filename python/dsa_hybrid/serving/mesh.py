"""The engine on a `("dp", "tp")` device mesh (`parallel.mesh`): one page pool per DP rank, requests placed
on ranks by load, every rank's rows in one sharded program per step.

- `MeshScheduler`: one `Scheduler` (and `KVManager`: its own `BlockPool` over that rank's pages, its own
  prefix index) per DP rank. A new request goes to the rank with the least load (the tokens of its
  waiting and running requests; ties: the lowest rank), or to a rank whose prefix index already holds at
  least a step's budget of its leading tokens; it stays there for its whole life (preemption and
  recompute happen inside its rank). Each rank schedules under its own token budget, by the one-device
  policy; a step's output is every rank's `SchedulerOutput` (`MeshSchedulerOutput`).
- `MeshRunner`: the sharded model (`parallel.forward`): every rank's rows padded to one row count (a power
  of two) and one table width, so one program shape serves all ranks (`place_rows`); the forward on the
  mesh with the indexer on the devices (`forward_sharded_jit`) or on the host (`forward_sharded_host`:
  each process keeps `IndexerKeyCache`s only for its own DP ranks and reads only its addressable
  shards); the argmax of every row and the logits rows of drawing requests replicated, so every process
  samples the same tokens from the same per-request generators as one device would.

Several processes (`jax.distributed`, `parallel.distributed.initialize`): every process runs the same
`Engine` driver with the same requests in the same order (SPMD, as JetStream and MaxText serve): the
scheduling is deterministic, so every process schedules the same rows, runs the same program and reads
the same replicated tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Iterable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsa_hybrid.host.cache import IndexerKeyCache
from dsa_hybrid.models.causal_lm import ModelParams, padded_rows
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.ops.sparse_mla import Backend
from dsa_hybrid.parallel.forward import (
    create_sharded_caches,
    forward_sharded_host,
    forward_sharded_jit,
    local_dp_ranks,
    place_rows,
    put,
    replicated_argmax,
    replicated_rows,
    shard_params,
)
from dsa_hybrid.parallel.mesh import mesh_shape
from dsa_hybrid.parallel.rules import check_model_divides
from dsa_hybrid.serving.kv_manager import KVManager
from dsa_hybrid.serving.runner import Batch, RunnerOutput, build_batch, table_width
from dsa_hybrid.serving.sampling import draw_tokens
from dsa_hybrid.serving.scheduler import Request, RequestOutput, Scheduler, SchedulerOutput, SchedulerState

MESH_PLACEMENTS = ("device", "host")


@dataclasses.dataclass(frozen=True)
class MeshSchedulerOutput(SchedulerOutput):
    """Every DP rank's `SchedulerOutput` (`per_rank[r]`), and their union (`chunks` rank by rank, the
    counts summed), so the engine reads it as one step."""

    per_rank: tuple[SchedulerOutput, ...] = ()

    @staticmethod
    def join(per_rank: Iterable[SchedulerOutput]) -> MeshSchedulerOutput:
        outs = tuple(per_rank)
        return MeshSchedulerOutput(
            chunks=tuple(ch for o in outs for ch in o.chunks),
            num_tokens=sum(o.num_tokens for o in outs),
            prompt_tokens=sum(o.prompt_tokens for o in outs),
            decode_only=all(o.decode_only for o in outs if o.chunks),
            preempted=tuple(i for o in outs for i in o.preempted),
            shared_tokens=sum(o.shared_tokens for o in outs),
            per_rank=outs,
        )


@dataclasses.dataclass(frozen=True)
class MeshSchedulerState:
    """Every rank's `SchedulerState` (what `MeshScheduler.restore` brings back)."""

    per_rank: tuple[SchedulerState, ...]


class MeshScheduler:
    """One `Scheduler` per DP rank over that rank's `KVManager` (`kvs[r]`), and the placement of new
    requests (the module docstring). The interface is the one-device `Scheduler`'s."""

    def __init__(self, kvs: list[KVManager], *, max_tokens_per_step: int, eos_token_ids: Iterable[int] = ()) -> None:
        if not kvs:
            raise ValueError("kvs: expected one KVManager per DP rank, got none")
        eos = tuple(eos_token_ids)
        self.kvs = kvs
        self.ranks = [Scheduler(kv, max_tokens_per_step=max_tokens_per_step, eos_token_ids=eos) for kv in kvs]
        self.budget = max_tokens_per_step

    # ----- views -----------------------------------------------------------------------------------
    @property
    def live(self) -> Mapping[int, Request]:
        """Waiting and running requests of every rank, by id (a live view)."""
        return collections.ChainMap(*(s.live for s in self.ranks))

    @property
    def waiting(self) -> list[Request]:
        return [r for s in self.ranks for r in s.waiting]

    @property
    def running(self) -> list[Request]:
        return [r for s in self.ranks for r in s.running]

    def rank_of(self, request_id: int) -> int:
        """The DP rank a waiting or running request lives on. KeyError if unknown."""
        for i, s in enumerate(self.ranks):
            if request_id in s.live:
                return i
        raise KeyError(f"request {request_id} is not waiting or running")

    def loads(self) -> list[int]:
        """Each rank's load: the tokens (prompt and output so far) of its waiting and running requests."""
        return [sum(len(r.tokens) for r in s.live.values()) for s in self.ranks]

    # ----- placement and requests ------------------------------------------------------------------
    def choose_rank(self, r: Request) -> int:
        """Where a new request goes: the rank whose prefix index holds the most of its leading tokens, if
        that is at least one step's budget (it saves more than a chunk of prefill); otherwise the rank
        with the least load (ties: the lowest rank)."""
        best, best_tokens = -1, 0
        for i, kv in enumerate(self.kvs):
            if kv.prefix is None:
                continue
            match = kv.prefix.longest_match(r)
            kv.prefix.forget(r)  # the lookup cached r's page hashes there; r is not (yet) indexed anywhere
            if match is not None and match[1] * kv.block_size > best_tokens:
                best, best_tokens = i, match[1] * kv.block_size
        if best >= 0 and best_tokens >= self.budget:
            return best
        loads = self.loads()
        return loads.index(min(loads))

    def add(self, r: Request) -> int:
        """Queue `r` on the rank `choose_rank` picks; returns the rank."""
        if r.id in self.live:
            raise ValueError(f"request {r.id} is already waiting or running")
        rank = self.choose_rank(r)
        self.ranks[rank].add(r)
        return rank

    def abort(self, request_id: int) -> Request:
        return self.ranks[self.rank_of(request_id)].abort(request_id)

    def fail(self, request_id: int, message: str) -> Request:
        return self.ranks[self.rank_of(request_id)].fail(request_id, message)

    def has_unfinished(self) -> bool:
        return any(s.has_unfinished() for s in self.ranks)

    def preempt_all(self) -> None:
        for s in self.ranks:
            s.preempt_all()

    # ----- transactions (per rank) -----------------------------------------------------------------
    def snapshot(self) -> MeshSchedulerState:
        return MeshSchedulerState(tuple(s.snapshot() for s in self.ranks))

    def restore(self, state: SchedulerState | MeshSchedulerState) -> None:
        if not isinstance(state, MeshSchedulerState) or len(state.per_rank) != len(self.ranks):
            raise TypeError("state: expected a MeshSchedulerState of this scheduler's ranks")
        for s, st in zip(self.ranks, state.per_rank, strict=True):
            s.restore(st)

    # ----- steps -----------------------------------------------------------------------------------
    def schedule(self) -> MeshSchedulerOutput:
        """Every rank's chunks of the next step, each rank under its own token budget."""
        return MeshSchedulerOutput.join(s.schedule() for s in self.ranks)

    def update_from_output(
        self, out: SchedulerOutput, sampled: dict[int, int]
    ) -> tuple[dict[int, list[int]], list[RequestOutput]]:
        """Commit a step on every rank (`Scheduler.update_from_output`)."""
        if not isinstance(out, MeshSchedulerOutput) or len(out.per_rank) != len(self.ranks):
            raise TypeError("out: expected a MeshSchedulerOutput of this scheduler's ranks")
        new: dict[int, list[int]] = {}
        done: list[RequestOutput] = []
        for s, o in zip(self.ranks, out.per_rank, strict=True):
            n, d = s.update_from_output(o, sampled)
            new.update(n)
            done.extend(d)
        return new, done


def _empty_batch(width: int) -> Batch:
    z = np.zeros(0, np.int32)
    return Batch(z, z, z, np.zeros((0, width), np.int32), np.zeros(0, np.int64), z)


class MeshRunner:
    """The sharded model, its caches (`pages_per_rank` pages on each DP rank) and the step executor.

    Args as in `Engine`; `placement` "device" or "host" ("auto" is refused on a mesh: its cost model is
    measured for one device). `params` are placed on the mesh here (`shard_params`)."""

    def __init__(
        self,
        params: ModelParams,
        cfg: DSAConfig,
        mesh: Mesh,
        *,
        pages_per_rank: int,
        page_size: int,
        max_model_len: int,
        latent_kind: str | None = None,
        indexer: str = "fp8",
        backend: Backend = "auto",
        placement: str = "device",
        host_threads: int | None = None,
    ) -> None:
        if placement not in MESH_PLACEMENTS:
            raise ValueError(
                f"placement: on a mesh expected one of {MESH_PLACEMENTS}, got {placement!r} (the 'auto' cost "
                "model is measured for one device)"
            )
        if placement == "host" and indexer != "fp8":
            raise ValueError("placement 'host' needs indexer='fp8' (the host cache holds FP8 keys)")
        if placement == "host" and page_size % 16:
            raise ValueError(f"placement 'host' needs a page_size that is a multiple of 16, got {page_size}")
        if pages_per_rank < 1:
            raise ValueError(f"num_pages must be >= 1, got {pages_per_rank}")
        dp, _ = mesh_shape(mesh)
        check_model_divides(cfg, mesh)
        self.mesh, self.dp, self.cfg, self.backend = mesh, dp, cfg, backend
        self.num_pages, self.page_size = pages_per_rank, page_size
        self.placement, self.host_threads = placement, host_threads
        self.max_pages_per_seq = -(-max_model_len // page_size)
        if latent_kind is None:
            latent_kind = "f32" if mesh.devices.flat[0].platform == "cpu" else "bf16"
        self.latent_kind, self.indexer = latent_kind, indexer
        self.local_ranks = local_dp_ranks(mesh)
        self.params = shard_params(params, mesh)
        self.caches = self._new_caches()
        self.host_caches_by_rank = self._new_host_caches()
        self.cost_model = None
        self.cost_model_source: str | None = None

    def _new_caches(self) -> tuple:
        return create_sharded_caches(
            self.cfg, self.mesh, self.num_pages, self.page_size, latent_kind=self.latent_kind, indexer=self.indexer
        )

    def _new_host_caches(self) -> dict[int, tuple[IndexerKeyCache | None, ...]]:
        """Under "host": one `IndexerKeyCache` per indexer layer for each DP rank of this process, as many
        pages as the rank's shard (no caches for another process's ranks)."""
        if self.placement != "host":
            return {}
        cfg = self.cfg
        return {
            r: tuple(
                None
                if cfg.layer_indexer_type(i) == "shared"
                else IndexerKeyCache(self.num_pages, self.page_size, cfg.index_head_dim)
                for i in range(cfg.num_hidden_layers)
            )
            for r in self.local_ranks
        }

    @property
    def host_caches(self) -> tuple[IndexerKeyCache | None, ...]:
        """The host caches of this process's lowest DP rank (`host_caches_by_rank` has every local rank's)."""
        return self.host_caches_by_rank[self.local_ranks[0]] if self.host_caches_by_rank else ()

    # ----- the step --------------------------------------------------------------------------------
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run every rank's chunks of `out` (a `MeshSchedulerOutput`) in one sharded step; returns the
        sampled tokens (the scheduler's state is not touched)."""
        if not isinstance(out, MeshSchedulerOutput) or len(out.per_rank) != self.dp:
            raise TypeError("out: expected a MeshSchedulerOutput with one output per DP rank")
        t0 = time.perf_counter()
        widest = max(len(c.block_table) for c in out.chunks)
        width = table_width(widest, self.max_pages_per_seq)
        batches = [
            build_batch(o.chunks, self.page_size, width) if o.chunks else _empty_batch(width) for o in out.per_rank
        ]
        n = padded_rows(max(b.num_rows for b in batches))
        rows = [
            {"tokens": b.tokens, "positions": b.positions, "slots": b.slots, "block_tables": b.block_tables}
            for b in batches
        ]
        arrays = place_rows(self.mesh, rows, rows=n, width=width)
        t1 = time.perf_counter()
        if self.placement == "host":
            logits, self.caches = forward_sharded_host(
                self.params, self.cfg, self.mesh, arrays, {r: rows[r] for r in self.local_ranks}, self.caches,
                self.host_caches_by_rank, self.backend, self.host_threads,
            )  # fmt: skip
        else:
            logits, self.caches = forward_sharded_jit(
                self.params, self.cfg, self.mesh, arrays["tokens"], arrays["positions"], arrays["slots"],
                arrays["block_tables"], self.caches, self.backend,
            )  # fmt: skip
        greedy_all = replicated_argmax(logits, self.mesh)
        greedy_all.block_until_ready()
        t2 = time.perf_counter()
        tokens = self.sample(out, batches, n, logits, np.asarray(greedy_all))
        t3 = time.perf_counter()
        return RunnerOutput(tokens, self.placement, {"prepare": t1 - t0, "forward": t2 - t1, "sample": t3 - t2})

    def sample(
        self, out: MeshSchedulerOutput, batches: list[Batch], n: int, logits: jax.Array, greedy_all: np.ndarray
    ) -> dict[int, int]:
        """The next token of each chunk that samples, from its last row (global row `r · n + i`): greedy
        requests take the replicated argmax, the others draw from their own generator over their
        replicated logits row (generator states restored if this raises), as on one device."""
        samplers, rows = [], []
        for r, (o, b) in enumerate(zip(out.per_rank, batches, strict=True)):
            samplers += [c for c in o.chunks if c.samples]
            rows += (r * n + b.sample_rows).tolist()
        tokens = {c.request_id: int(greedy_all[g]) for c, g in zip(samplers, rows, strict=True)}
        drawn = [i for i, c in enumerate(samplers) if not c.sampling.greedy]
        if not drawn:
            return tokens
        want = np.zeros(padded_rows(len(drawn)), np.int32)  # padded: few gather shapes compile
        want[: len(drawn)] = [rows[i] for i in drawn]
        full = np.asarray(replicated_rows(logits, put(want, NamedSharding(self.mesh, P())), self.mesh))
        draw_tokens([samplers[i] for i in drawn], full, tokens)
        return tokens

    # ----- caches ----------------------------------------------------------------------------------
    def caches_lost(self) -> bool:
        """Whether the device caches were deleted (donated to a forward that then failed)."""
        return any(a.is_deleted() for a in jax.tree_util.tree_leaves(self.caches) if hasattr(a, "is_deleted"))

    def reset_caches(self) -> None:
        """Empty caches of the same shapes, device and host (every request must then be recomputed)."""
        self.caches = self._new_caches()
        self.host_caches_by_rank = self._new_host_caches()

    def cache_bytes(self) -> dict[str, int]:
        """Bytes of every cache (capacity over all DP ranks; host caches: this process's ranks)."""
        leaves = [c for c in jax.tree_util.tree_leaves([c.latent for c in self.caches]) if hasattr(c, "nbytes")]
        index = [c for c in jax.tree_util.tree_leaves([c.index for c in self.caches]) if hasattr(c, "nbytes")]
        host = sum(h.num_blocks * h.page_bytes for hs in self.host_caches_by_rank.values() for h in hs if h is not None)
        return {"latent": sum(a.nbytes for a in leaves), "device_indexer": sum(a.nbytes for a in index),
                "host_indexer": host}  # fmt: skip

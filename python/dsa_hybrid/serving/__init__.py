"""Serving: `serving.engine.Engine` (the facade: add_request, step, generate, abort, stats, cache_bytes) and
the parts it is built from, each usable and tested alone:

- `serving.scheduler`: `Scheduler` decides each step (admission, token budget, chunked prefill, preemption,
  stop conditions) and returns a plain `SchedulerOutput`; `Request`, `RequestOutput`.
- `serving.kv_manager`: `KVManager` owns the pages and prefixes (the Rust `BlockPool`, one block table per
  request, `PrefixIndex`).
- `serving.runner`: `ModelRunner` executes a step on the device or with the indexer on the host (batch
  assembly, placement, forward, host caches, sampling).
- `serving.placement`: the placement cost model (`PlacementCosts`); `serving.sampling`: `SamplingParams`.
- `serving.mesh`: the engine on a device mesh (`Engine(..., mesh=...)`): `MeshScheduler` (a pool and a
  scheduler per DP rank, requests placed by load) and `MeshRunner` (every rank's rows in one sharded step).
"""

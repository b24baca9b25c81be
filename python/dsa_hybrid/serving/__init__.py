"""Serving: `serving.engine` (`Engine`), with the pieces it is built from — the scheduler that picks each
step's batch, the KV manager that owns pages and shared prefixes, the runner that executes a step on the
device or the host, the placement cost model (`PlacementCosts`) and sampling (`SamplingParams`)."""

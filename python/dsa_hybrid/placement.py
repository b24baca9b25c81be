"""Where a step's indexer runs: a cost model measured on the running machine at start-up.

The two placements differ only in the lightning indexer (scoring + top-k): on the device it scans the
whole block table of every (padded) row inside the one jitted forward; on the host the Rust cache scores
only each row's visible keys, but each layer pays a device → host → device round trip. Each is fitted as
`fixed + per_key · keys` per layer from a few timed calls at the model's own widths, with the same entry
points the engine uses; `choose` then compares the predictions for a step's actual rows.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from .cache import IndexerKeyCache
from .config import DSAConfig
from .device_indexer import IndexerPages, select_topk_device


@dataclasses.dataclass(frozen=True)
class PlacementCosts:
    """Seconds per layer of one step's selection: `fixed + per_key · keys`, where keys are the visible
    keys of all rows on the host, and rows × block-table keys on the device (it scans the table)."""

    host_fixed: float
    host_per_key: float
    device_fixed: float
    device_per_key: float

    def predict(self, visible_keys: int, device_rows: int, table_keys: int) -> dict[str, float]:
        return {
            "host": self.host_fixed + self.host_per_key * visible_keys,
            "device": self.device_fixed + self.device_per_key * device_rows * table_keys,
        }

    def choose(self, visible_keys: int, device_rows: int, table_keys: int) -> str:
        """ "host" or "device", whichever is predicted faster (ties: "device", which avoids round trips)."""
        p = self.predict(visible_keys, device_rows, table_keys)
        return "host" if p["host"] < p["device"] else "device"

    @staticmethod
    def measure(
        cfg: DSAConfig,
        page_size: int = 64,
        *,
        lengths: tuple[int, ...] = (2048, 16384),
        rows: tuple[int, ...] = (1, 8),
        threads: int | None = None,
        repeats: int = 3,
    ) -> PlacementCosts:
        """Time both placements' selection at every (rows, length) pair on random keys, best of `repeats`,
        and fit each line by least squares (intercept and slope clamped at ≥ 0)."""
        return _measure(cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk, page_size, lengths, rows, threads,
                        repeats)  # fmt: skip


def _best(fn, repeats: int) -> float:
    fn()  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _fit(work: list[float], secs: list[float]) -> tuple[float, float]:
    a = np.vstack([np.ones(len(work)), work]).T
    fixed, slope = np.linalg.lstsq(a, np.asarray(secs), rcond=None)[0]
    if slope < 0:  # noise on a flat curve: no measurable per-key cost
        fixed, slope = float(np.mean(secs)), 0.0
    return max(float(fixed), 0.0), float(slope)


@functools.cache
def _measure(H, D, K, S, lengths, rows, threads, repeats) -> PlacementCosts:  # noqa: N803 - spec names
    rng = np.random.default_rng(0)
    host_work, host_s, dev_work, dev_s = [], [], [], []
    sink = jax.jit(lambda t: t.sum())  # what the device does with the selection: consume it
    for L in lengths:
        n_pages = -(-L // S)
        keys = rng.standard_normal((n_pages * S, D)).astype(np.float32)
        pages = IndexerPages.create(n_pages, S, D).write(jnp.arange(n_pages * S), jnp.asarray(keys))
        host = IndexerKeyCache(n_pages, S, D)
        host.add_sequence(0)
        host.append(0, keys[:L])
        for T in rows:
            q = jnp.asarray(rng.standard_normal((T, H, D)), jnp.float32)
            w = jnp.asarray(np.abs(rng.standard_normal((T, H))), jnp.float32)
            pos = jnp.full((T,), L - 1, jnp.int32)
            tables = jnp.tile(jnp.arange(n_pages, dtype=jnp.int32), (T, 1))
            select = jax.jit(functools.partial(select_topk_device, k=K))

            def device(q=q, w=w, tables=tables, pos=pos, select=select, pages=pages) -> None:
                sink(select(q, w, pages, tables, pos)).block_until_ready()

            def on_host(q=q, w=w, pos=pos, host=host, T=T) -> None:
                sel = host.select(np.zeros(T, np.int64), np.asarray(q), np.asarray(w), np.asarray(pos), K,
                                  threads=threads)  # fmt: skip
                sink(jnp.asarray(sel)).block_until_ready()

            dev_work.append(T * n_pages * S)
            dev_s.append(_best(device, repeats))
            host_work.append(T * L)
            host_s.append(_best(on_host, repeats))
    return PlacementCosts(*_fit(host_work, host_s), *_fit(dev_work, dev_s))

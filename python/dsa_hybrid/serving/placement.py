"""Where a step's indexer runs: a cost model measured on the running machine at start-up.

The two placements differ in the lightning indexer (scoring + top-k) and in what surrounds it: on the
device it scans the whole block table of every (padded) row inside one jitted forward; on the host the
Rust cache scores only each row's visible keys, but each layer pays a device → host → device round trip
and is split into two jitted halves. So the model times what the engine runs: one layer of the model
itself (`dsa_attention` against the host path of `model.forward_host`, caches updated in place) at a
few context lengths and row counts, and fits each placement as `fixed + per_key · keys` per layer;
`choose` compares the two for a step's rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsa_hybrid._timing import best_time
from dsa_hybrid.host.cache import IndexerKeyCache
from dsa_hybrid.layers import dsa_attention as layer_mod
from dsa_hybrid.layers.dsa_attention import DSACaches, DSAParams, dsa_attention
from dsa_hybrid.models.causal_lm import padded_rows
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.ops.indexer import quantize_keys


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
        params: DSAParams,
        page_size: int = 64,
        *,
        lengths: tuple[int, ...] = (2048, 16384),
        rows: tuple[int, ...] = (1, 8),
        threads: int | None = None,
        repeats: int = 3,
        latent_kind: str = "bf16",
    ) -> PlacementCosts:
        """Time one layer (`params`, a layer of the served model) both ways at every (rows, length) pair,
        best of `repeats`, and fit each line by least squares (intercept and slope clamped at ≥ 0). The
        device runs its rows padded as the engine pads them (`model.padded_rows`); `latent_kind` is the
        engine's latent cache format."""
        host_work, host_s, dev_work, dev_s = [], [], [], []
        for L in lengths:
            for T in rows:
                dev_rows = padded_rows(T)
                host_s.append(time_layer(cfg, params, page_size, L, T, "host", threads, repeats, latent_kind))
                host_work.append(T * L)
                dev_s.append(time_layer(cfg, params, page_size, L, dev_rows, "device", threads, repeats, latent_kind))
                dev_work.append(dev_rows * -(-L // page_size) * page_size)
        return PlacementCosts(*_fit(host_work, host_s), *_fit(dev_work, dev_s))


def _fit(work: Sequence[float], secs: Sequence[float]) -> tuple[float, float]:
    a = np.vstack([np.ones(len(work)), work]).T
    fixed, slope = np.linalg.lstsq(a, np.asarray(secs), rcond=None)[0]
    if slope < 0:  # noise on a flat curve: no measurable per-key cost
        fixed, slope = float(np.mean(secs)), 0.0
    return max(float(fixed), 0.0), float(slope)


def time_layer(cfg, params, S, L, T, where, threads, repeats, latent_kind="bf16") -> float:  # noqa: N803
    """Seconds of one layer over `T` rows of one sequence at positions `L − T .. L − 1` (random cache
    contents for the `L − T` earlier tokens)."""
    rng = np.random.default_rng(L + T)
    n_pages = -(-L // S)
    before = L - T
    keys = rng.standard_normal((before, cfg.index_head_dim)).astype(np.float32)
    caches = DSACaches.create(cfg, n_pages, S, latent_kind=latent_kind)
    c_kv = jnp.asarray(rng.standard_normal((before, cfg.kv_lora_rank)), jnp.float32)
    k_pe = jnp.asarray(rng.standard_normal((before, cfg.qk_rope_head_dim)), jnp.float32)
    before_slots = jnp.arange(before)
    caches = DSACaches(
        caches.latent.write(before_slots, c_kv, k_pe), caches.index.write(before_slots, jnp.asarray(keys))
    )
    x = jnp.asarray(rng.standard_normal((T, cfg.hidden_size)), jnp.float32)
    pos = jnp.arange(before, L, dtype=jnp.int32)
    tables = jnp.tile(jnp.arange(n_pages, dtype=jnp.int32), (T, 1))
    # As the engine runs them: the caches donated and returned (updated in place), never discarded
    # (a discarded cache write is dead code to XLA and would not be timed).
    state = {"caches": caches}
    if where == "device":
        step = jax.jit(
            lambda x, c: dsa_attention(params, cfg, x, pos, pos, tables, c, backend="xla")[:2], donate_argnums=1
        )

        def on_device():
            out, state["caches"] = step(x, state["caches"])
            return out

        return best_time(on_device, repeats)
    # As the engine's host caches are: paged through the block tables, no sequences of their own.
    host = IndexerKeyCache(n_pages, S, cfg.index_head_dim)
    key_codes, key_scales = quantize_keys(jnp.asarray(keys))
    host.write_slots(np.arange(before, dtype=np.int32), np.asarray(key_codes).view(np.uint8), np.asarray(key_scales))
    pos_np, tables_np = np.asarray(pos), np.asarray(tables)

    def on_host():
        c = state["caches"]  # each call writes the same T rows again (the slots of positions before .. L-1)
        proj, codes, scales, index = layer_mod.project_write_keys_donated(params, cfg, x, pos, pos, c.index)
        topk = layer_mod.host_select_paged(
            host, tables_np, pos_np, codes, scales, proj, pos_np, cfg.index_topk, threads
        )
        out, latent = layer_mod.attend_donated(params, cfg, proj, pos, tables, c.latent, jnp.asarray(topk), "xla", pos)
        state["caches"] = DSACaches(latent, index)
        return out

    return best_time(on_host, repeats)

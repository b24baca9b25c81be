"""Where a step's indexer runs: a cost model measured on the running machine at start-up.

The two placements differ in the lightning indexer (scoring + top-k) and in what surrounds it: on the
device it scans the whole block table of every (padded) row inside one jitted forward; on the host the
Rust cache scores only each row's visible keys, but each layer pays a device → host → device round trip
and is split into two jitted halves. So the model times what the engine runs: one layer of the model
itself (`dsa_attention` against the host path of `model.forward_host`, caches updated in place) at a
few context lengths and row counts, and fits each placement as `fixed + per_key · keys` per layer;
`choose` compares the two for a step's rows.

Each point is the median of several calls (after a warm-up that compiles), in wall and in CPU time, so
that two start-ups on one machine fit similar lines. `PlacementCosts.cached` stores a fitted model as JSON
in the per-user cache directory (`compile_cache.cache_dir() / "placement"`), keyed by a hash of what the
costs depend on: the machine (CPU model, features, cores), the layer's widths, page size, cache formats,
the measurement's settings and the package, jax and jaxlib versions; the next start-up with the same key
loads it instead of measuring. `DSA_HYBRID_REMEASURE=1` (or `refresh=True`) measures and stores afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsa_hybrid import __version__, cpu_features
from dsa_hybrid._timing import best_time
from dsa_hybrid.host.cache import IndexerKeyCache
from dsa_hybrid.layers import dsa_attention as layer_mod
from dsa_hybrid.layers.dsa_attention import DSACaches, DSAParams, dsa_attention
from dsa_hybrid.models.causal_lm import padded_rows
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.ops.checks import check_choice, check_int
from dsa_hybrid.ops.indexer import quantize_keys
from dsa_hybrid.serving.compile_cache import cache_dir

logger = logging.getLogger(__name__)

ENV_REMEASURE = "DSA_HYBRID_REMEASURE"


def check_measure_args(page_size: Any, lengths: Any, rows: Any, threads: Any, repeats: Any, latent_kind: Any) -> None:
    """The settings of a cost-model measurement, before anything is timed: `page_size`, `repeats` and
    every entry of `lengths` / `rows` integers >= 1 (non-empty tuples), `threads` None or >= 1,
    `latent_kind` one of the latent cache formats (TypeError / ValueError naming the argument)."""
    check_int("page_size", page_size, 1)
    check_int("repeats", repeats, 1, 1000)
    if threads is not None:
        check_int("threads", threads, 1, 1024)
    for name, values in (("lengths", lengths), ("rows", rows)):
        if not isinstance(values, (tuple, list)) or not values:
            raise TypeError(f"{name}: expected a non-empty tuple of integers, got {values!r}")
        for v in values:
            check_int(name, v, 1)
    check_choice("latent_kind", latent_kind, ("bf16", "fp8", "f32"))


@dataclasses.dataclass(frozen=True)
class PlacementCosts:
    """Seconds per layer of one step's selection: `fixed + per_key · keys`, where keys are the visible
    keys of all rows on the host, and rows × block-table keys on the device (it scans the table).
    `spread`: how far apart the measurement's own repeats lay (a fraction of the point's median; 0 for a
    model not measured), the margin inside which `choose` keeps its default."""

    host_fixed: float
    host_per_key: float
    device_fixed: float
    device_per_key: float
    spread: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{f.name}: expected a finite number >= 0, got {v!r}")

    def predict(self, visible_keys: int, device_rows: int, table_keys: int) -> dict[str, float]:
        """Predicted seconds of one step on each side: `visible_keys` the host scans, `device_rows` ×
        `table_keys` the device scores (all integers >= 0; TypeError / ValueError naming them)."""
        visible_keys = check_int("visible_keys", visible_keys, 0, 2**62)
        device_rows = check_int("device_rows", device_rows, 0, 2**62)
        table_keys = check_int("table_keys", table_keys, 0, 2**62)
        return {
            "host": self.host_fixed + self.host_per_key * visible_keys,
            "device": self.device_fixed + self.device_per_key * device_rows * table_keys,
        }

    def choose(self, visible_keys: int, device_rows: int, table_keys: int, default: str = "device") -> str:
        """ "host" or "device", whichever is predicted faster, unless the two predictions lie within
        `spread` of each other: then `default` (the engine passes its platform's default placement), so
        that the measurement's noise cannot flip the choice from one start-up to the next."""
        check_choice("default", default, ("host", "device"))
        p = self.predict(visible_keys, device_rows, table_keys)
        fast, slow = sorted(p, key=p.__getitem__)
        return default if p[slow] <= p[fast] * (1.0 + self.spread) else fast

    @staticmethod
    def measure(
        cfg: DSAConfig,
        params: DSAParams,
        page_size: int = 64,
        *,
        lengths: tuple[int, ...] = (2048, 16384),
        rows: tuple[int, ...] = (1, 8),
        threads: int | None = None,
        repeats: int = 5,
        latent_kind: str = "bf16",
    ) -> PlacementCosts:
        """Time one layer (`params`, a layer of the served model) both ways at every (rows, length) pair
        (`median_times`: the median of `repeats` calls, host and device calls alternating, the smaller of
        wall and CPU time per point) and fit each line by least squares (intercept and slope clamped at
        ≥ 0); `spread` is the median over points of their calls' interquartile range / median. The device
        runs its rows padded as the engine pads them (`model.padded_rows`); `latent_kind` is the engine's
        latent cache format."""
        return PlacementCosts.measure_points(
            cfg, params, page_size, lengths=lengths, rows=rows, threads=threads, repeats=repeats,
            latent_kind=latent_kind,
        )[0]  # fmt: skip

    @staticmethod
    def measure_points(
        cfg: DSAConfig,
        params: DSAParams,
        page_size: int = 64,
        *,
        lengths: tuple[int, ...] = (2048, 16384),
        rows: tuple[int, ...] = (1, 8),
        threads: int | None = None,
        repeats: int = 5,
        latent_kind: str = "bf16",
    ) -> tuple[PlacementCosts, list[dict[str, Any]]]:
        """`measure`, and the points it fitted (where, rows, length, work, median wall and CPU seconds)."""
        check_measure_args(page_size, lengths, rows, threads, repeats, latent_kind)
        host_work: list[float] = []
        host_s: list[float] = []
        dev_work: list[float] = []
        dev_s: list[float] = []
        points: list[dict[str, Any]] = []
        for L in lengths:
            for T in rows:
                dev_rows = padded_rows(T)
                # Both placements' calls alternate, so a burst of load from other processes hits both.
                host_calls, dev_calls = interleaved_times(
                    [
                        _layer_call(cfg, params, page_size, L, T, "host", threads, latent_kind),
                        _layer_call(cfg, params, page_size, L, dev_rows, "device", threads, latent_kind),
                    ],
                    repeats,
                )
                for where, n, work, ws, ss, (walls, cpus) in (
                    ("host", T, T * L, host_work, host_s, host_calls),
                    ("device", dev_rows, dev_rows * -(-L // page_size) * page_size, dev_work, dev_s, dev_calls),
                ):
                    wall, cpu = statistics.median(walls), statistics.median(cpus)
                    # The smaller of the two medians (CPU time misses waits, wall time counts other load),
                    # and the spread of the calls that gave it.
                    used = walls if wall <= cpu else cpus
                    ws.append(work)
                    ss.append(min(wall, cpu))
                    points.append({"where": where, "rows": n, "length": L, "work": work, "wall_s": wall, "cpu_s": cpu,
                                   "spread": relative_spread(used)})  # fmt: skip
        # The margin is the median point's spread: one noisy point does not stop every decision.
        spread = statistics.median(p["spread"] for p in points)
        return PlacementCosts(*_fit(host_work, host_s), *_fit(dev_work, dev_s), spread=spread), points

    # ----- stored and reused -----------------------------------------------------------------------
    @staticmethod
    def cached(
        cfg: DSAConfig,
        params: DSAParams,
        page_size: int = 64,
        *,
        lengths: tuple[int, ...] = (2048, 16384),
        rows: tuple[int, ...] = (1, 8),
        threads: int | None = None,
        repeats: int = 5,
        latent_kind: str = "bf16",
        indexer: str = "fp8",
        refresh: bool | None = None,
        measure: Callable[..., PlacementCosts] | None = None,
    ) -> tuple[PlacementCosts, str]:
        """The cost model stored for this key (see `cache_key`), else `measure`d and stored. Returns the
        costs and "loaded" or "measured". `refresh` (default: `$DSA_HYBRID_REMEASURE` set to 1) measures
        even when a model is stored; with the cache directory off nothing is loaded or stored."""
        check_measure_args(page_size, lengths, rows, threads, repeats, latent_kind)
        check_choice("indexer", indexer, ("fp8", "exact"))
        if refresh is None:
            refresh = os.environ.get(ENV_REMEASURE, "").strip().lower() in {"1", "true", "yes", "on"}
        weights = sorted({str(a.dtype) for a in jax.tree.leaves(params) if hasattr(a, "dtype")})
        key = cache_key(cfg, page_size, lengths=lengths, rows=rows, threads=threads, repeats=repeats,
                        latent_kind=latent_kind, indexer=indexer, weights=",".join(weights))  # fmt: skip
        path = cost_model_path(key)
        if path is not None and not refresh:
            stored = load_costs(path, key)
            if stored is not None:
                return stored, "loaded"
        do_measure = measure or PlacementCosts.measure
        costs = do_measure(cfg, params, page_size, lengths=lengths, rows=rows, threads=threads, repeats=repeats,
                           latent_kind=latent_kind)  # fmt: skip
        logger.info("placement cost model measured: %s", costs)
        if path is not None:
            save_costs(path, key, costs)
        return costs, "measured"

    def to_json(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> PlacementCosts:
        """The inverse of `to_json` (a model stored without `spread` gets 0)."""
        values = {f.name: float(d[f.name]) for f in dataclasses.fields(PlacementCosts) if f.name != "spread"}
        return PlacementCosts(**values, spread=float(d.get("spread", 0.0)))


def machine_id() -> dict[str, Any]:
    """What identifies this machine for the cost model: CPU model, SIMD features, cores (all and usable)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "arch": platform.machine(), "features": cpu_features(), "cores": os.cpu_count(),
            "usable_cores": usable}  # fmt: skip


def cache_key(
    cfg: DSAConfig,
    page_size: int,
    *,
    lengths: Sequence[int],
    rows: Sequence[int],
    threads: int | None,
    repeats: int,
    latent_kind: str,
    indexer: str = "fp8",
    weights: str = "",
) -> dict[str, Any]:
    """Everything a stored cost model depends on (as JSON values; `key_hash` names its file). `weights`:
    the layer's parameter dtypes."""
    widths = ("hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
              "qk_rope_head_dim", "v_head_dim", "index_n_heads", "index_head_dim", "index_topk")  # fmt: skip
    import jaxlib

    return {
        "format": 3,  # 3: each side indexes and attends as the engine does (the Rust kernels on a CPU)
        "machine": machine_id(),
        "model_type": cfg.model_type,
        "widths": {w: int(getattr(cfg, w)) for w in widths},
        "weights": weights,
        "page_size": int(page_size),
        "latent_kind": latent_kind,
        "indexer": indexer,
        "lengths": [int(x) for x in lengths],
        "rows": [int(x) for x in rows],
        "threads": threads,
        "repeats": int(repeats),
        "versions": {"dsa_hybrid": __version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__},
        "backend": jax.default_backend(),
    }


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def cost_model_path(key: dict[str, Any]) -> str | None:
    """Where the cost model of `key` is stored, or None when the cache directory is off."""
    root = cache_dir()
    return None if root is None else str(root / "placement" / f"costs-{key_hash(key)}.json")


def save_costs(path: str, key: dict[str, Any], costs: PlacementCosts) -> None:
    """Write `costs` with its key (atomically: a temporary file renamed). A failure only logs a warning."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"key": key, "costs": costs.to_json(), "saved": time.time()}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("placement cost model not stored at %s: %s", path, e)


def load_costs(path: str, key: dict[str, Any]) -> PlacementCosts | None:
    """The costs stored at `path` if its key equals `key` (a hash collision or an edited file: None)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("key") != json.loads(json.dumps(key)):
            return None
        return PlacementCosts.from_json(data["costs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _fit(work: Sequence[float], secs: Sequence[float]) -> tuple[float, float]:
    a = np.vstack([np.ones(len(work)), work]).T
    fixed, slope = np.linalg.lstsq(a, np.asarray(secs), rcond=None)[0]
    if slope < 0:  # noise on a flat curve: no measurable per-key cost
        fixed, slope = float(np.mean(secs)), 0.0
    return max(float(fixed), 0.0), float(slope)


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 2) -> tuple[float, float]:
    """(wall, CPU) seconds of `fn`: the medians of `repeats` calls after `warmup` untimed ones (the first
    compiles; the next touches the memory the first allocated). CPU time is the process's
    (`time.process_time`, all its threads); JAX results are waited for."""
    return median_times([fn], repeats, warmup)[0]


def median_times(fns: Sequence[Callable[[], Any]], repeats: int = 5, warmup: int = 2) -> list[tuple[float, float]]:
    """`median_time` of each of `fns`, their calls interleaved (one of each per round)."""
    return [(statistics.median(w), statistics.median(c)) for w, c in interleaved_times(fns, repeats, warmup)]


def interleaved_times(
    fns: Sequence[Callable[[], Any]], repeats: int = 5, warmup: int = 2
) -> list[tuple[list[float], list[float]]]:
    """Every call's (wall, CPU) seconds for each of `fns`: `warmup` untimed calls each (at least one),
    then `repeats` rounds of one call of each (so a burst of load from other processes hits them all)."""
    for fn in fns:
        for _ in range(max(warmup, 1)):
            jax.block_until_ready(fn())
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(max(repeats, 1)):
        for i, fn in enumerate(fns):
            w0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            wall[i].append(time.perf_counter() - w0)
            cpu[i].append(time.process_time() - c0)
    return list(zip(wall, cpu, strict=True))


def relative_spread(secs: Sequence[float]) -> float:
    """How far apart repeated timings lie: (upper quartile − lower quartile) / median (0 for fewer than
    two, or a zero median)."""
    if len(secs) < 2:
        return 0.0
    q1, q2, q3 = statistics.quantiles(secs, n=4, method="inclusive")
    return float((q3 - q1) / q2) if q2 > 0 else 0.0


def time_layer(cfg, params, S, L, T, where, threads, repeats, latent_kind="bf16") -> float:  # noqa: N803
    """Seconds of one layer over `T` rows of one sequence at positions `L − T .. L − 1` (random cache
    contents for the `L − T` earlier tokens): the best wall time of `repeats` calls (the benchmarks' rule;
    the cost model takes medians of wall and CPU time, `median_times`)."""
    return best_time(_layer_call(cfg, params, S, L, T, where, threads, latent_kind), repeats)


def _layer_call(cfg, params, S, L, T, where, threads, latent_kind) -> Callable[[], Any]:  # noqa: N803
    """The call `time_layer` times (caches donated and carried from call to call)."""
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
            lambda x, c: dsa_attention(params, cfg, x, pos, pos, tables, c, backend="auto")[:2], donate_argnums=1
        )

        def on_device():
            out, state["caches"] = step(x, state["caches"])
            return out

        return on_device
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
        if layer_mod.use_host_attention(c.latent, "xla", None):  # as the engine's host steps attend
            out, latent = layer_mod.attend_host(params, cfg, proj, pos, tables_np, c.latent, topk, threads)
        else:
            out, latent = layer_mod.attend_donated(
                params, cfg, proj, pos, tables, c.latent, jnp.asarray(topk), "xla", pos
            )
        state["caches"] = DSACaches(latent, index)
        return out

    return on_host

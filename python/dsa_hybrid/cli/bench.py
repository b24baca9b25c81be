"""`dsa-hybrid bench`: the table of `docs/performance.md`, measured on this machine, and a PNG plot.

Every figure is a ratio against a baseline timed in the same process on the same data with the same
thread count (one), as docs/performance.md asks; absolute times are printed for context. Rows: host top-k, host
indexer score + top-k (with the machine's FMA peak), sparse vs dense MLA (the plot: cost per decode
token against context length), one DSA layer's decode step with the indexer on the host vs on the
device and what "auto" picks, and end to end against Hugging Face transformers when it is installed:
decode tokens/s, and prefill time of one prompt for each placement.

Run it as `dsa-hybrid bench` (which starts `python -m dsa_hybrid.cli.bench` with every library pinned to
one thread before numpy and JAX load). `--quick` runs every row at small sizes (a smoke test).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, TextIO

import numpy as np

from dsa_hybrid._timing import best_time, best_times

SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "BLIS_NUM_THREADS": "1",
    "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip(),
}


class Table:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def title(self, text: str) -> None:
        print(f"\n## {text}", file=self.out)

    def row(self, *cells: object) -> None:
        print("| " + " | ".join(str(c) for c in cells) + " |", file=self.out)
        self.out.flush()

    def header(self, *cells: str) -> None:
        self.row(*cells)
        self.row(*["---"] * len(cells))


def matmul_gflops() -> float:
    """One-thread f32 numpy matmul rate (2048²) in GFLOP/s (OpenBLAS may use narrower vectors than the
    core has: a yardstick printed next to the FMA peak, not the peak)."""
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    t = best_time(lambda: a @ a, 3)
    return 2 * 2048**3 / t / 1e9


def read_gbps(mib: int = 256) -> float:
    """One-thread streaming read bandwidth in GB/s: one `np.max` pass over `mib` MiB of float32, far
    more than the caches hold (the top-k row's read baseline is the same pass over its rows)."""
    x = np.ones(mib * 2**18, np.float32)
    t = best_time(functools.partial(np.max, x), 3)
    return x.nbytes / t / 1e9


def fma_peak_gflops() -> float:
    """The core's float32 FMA peak on the SIMD path in use (`host.fma_peak_gflops`: independent FMA
    chains, one thread), the "of FMA peak" columns' denominator."""
    from dsa_hybrid.host import fma_peak_gflops as core_peak

    return core_peak()


class CompileClock:
    """Process CPU seconds JAX spends tracing, lowering and compiling (or loading from the persistent
    cache) while active, from `jax.monitoring`'s compile events (outermost event only, so nested traces
    count once). Used to report the Engine's prefill without compilation from a single run."""

    EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0
        self._start = 0.0

    def _begin(self, event: str, value: float, **kw: str | int) -> None:
        if event in self.EVENTS:
            if self._depth == 0:
                self._start = time.process_time()
            self._depth += 1

    def _end(self, event: str, duration_secs: float, **kw: str | int) -> None:
        if event in self.EVENTS and self._depth > 0:
            self._depth -= 1
            if self._depth == 0:
                self.seconds += time.process_time() - self._start

    def __enter__(self) -> CompileClock:
        import jax.monitoring

        jax.monitoring.register_scalar_listener(self._begin)
        jax.monitoring.register_event_duration_secs_listener(self._end)
        return self

    def __exit__(self, *exc: object) -> None:
        import jax.monitoring

        jax.monitoring.unregister_scalar_listener(self._begin)
        jax.monitoring.unregister_event_duration_listener(self._end)


def bench_topk(t: Table, lengths: list[int]) -> None:
    import jax

    from dsa_hybrid import topk

    t.title("host top-k, k = 2048, 1 thread (ratio: the fastest baseline's time / ours)")
    t.header("L", "rows", "ours ms", "numpy ms", "jax ms", "torch ms", "faster than best", "× one np.max read")
    jax_topk = jax.jit(lambda x: jax.lax.top_k(x, 2048)[1])
    try:  # an optional baseline (imported by name: the type checker may or may not have torch)
        torch: Any = importlib.import_module("torch")
        torch.set_num_threads(1)
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    for L in lengths:
        rows = max(1, min(8, 2**20 // L))
        x = rng.standard_normal((rows, L)).astype(np.float32)
        ours = best_time(functools.partial(topk, x, 2048, threads=1))
        base = {
            "numpy": best_time(functools.partial(np.argpartition, -x, 2048, axis=1)),
            "jax": best_time(functools.partial(jax_topk, x)),
        }
        if torch is not None:
            xt = torch.from_numpy(x)
            base["torch"] = best_time(functools.partial(torch.topk, xt, 2048, dim=1))
        read = best_time(functools.partial(np.max, x, axis=1))
        best = min(base.values())
        ms = {name: f"{s * 1e3:.2f}" for name, s in base.items()}
        t.row(L, rows, f"{ours * 1e3:.2f}", ms["numpy"], ms["jax"], ms.get("torch", "—"), f"{best / ours:.1f}×",
              f"{ours / read:.1f}×")  # fmt: skip


def bench_indexer(t: Table, lengths: list[int], peak: float) -> None:
    from dsa_hybrid.host import cpu_features
    from dsa_hybrid.host.cache import IndexerKeyCache

    # The default query_dtype ("auto") scores FP8 queries in bf16 on some CPUs: say which, since a bf16
    # dot-product instruction can pass the float32 FMA peak.
    dtype = cpu_features()["indexer_query_dtype"]
    t.title(f"host indexer score + top-2048 from the FP8 cache, H = 64, D = 128, 4 query rows, 1 thread, "
            f"scored in {dtype} (query_dtype=\"auto\")")  # fmt: skip
    t.header("L", "ours ms", "numpy ms (f32 keys)", "faster", "scoring GFLOP/s", "of f32 FMA peak")
    rng = np.random.default_rng(1)
    T, H, D, K = 4, 64, 128, 2048
    for L in lengths:
        cache = IndexerKeyCache(L // 64, 64, D)
        cache.add_sequence(0)
        cache.append(0, rng.standard_normal((L, D)).astype(np.float32))
        q = rng.standard_normal((T, H, D)).astype(np.float32)
        w = np.abs(rng.standard_normal((T, H))).astype(np.float32)
        ids, pos = np.zeros(T, np.int64), np.full(T, L - 1)
        keys = cache.dequantize(0)  # the same FP8 keys, decoded once (the baseline's easier case)
        qf = q.reshape(T * H, D)

        def numpy_path(keys=keys, qf=qf, w=w) -> np.ndarray:
            s = np.maximum(qf @ keys.T, 0).reshape(T, H, -1)
            return np.argpartition(-np.einsum("th,thl->tl", w, s), K, axis=1)[:, :K]

        ours = best_time(functools.partial(cache.select, ids, q, w, pos, K, threads=1))
        scoring = best_time(functools.partial(cache.scores, ids, q, w, pos, threads=1))
        base = best_time(numpy_path)
        gflops = 2 * T * H * D * L / scoring / 1e9
        t.row(
            L, f"{ours * 1e3:.2f}", f"{base * 1e3:.2f}", f"{base / ours:.1f}×", f"{gflops:.0f}", f"{gflops / peak:.0%}"
        )


def bench_sparse_mla(t: Table, lengths: list[int]) -> list[tuple[int, float, float]]:
    import jax
    import jax.numpy as jnp

    from dsa_hybrid.ops.latent_cache import LatentCache
    from dsa_hybrid.ops.sparse_mla import dense_mla, sparse_mla

    t.title("MLA decode token, 128 heads, K = 2048, bf16 latent cache, XLA on CPU, 1 thread")
    t.header("L", "dense ms", "sparse ms", "sparse faster")
    rng = np.random.default_rng(2)
    scale = 0.1352338
    sparse = jax.jit(lambda q, c, s: sparse_mla(q, c, s, scale=scale, backend="xla"))
    dense = jax.jit(lambda q, c, p: dense_mla(q, c, p, scale=scale))
    points = []
    for L in lengths:
        cache = LatentCache.create(L // 64, 64, kind="bf16").write(
            jnp.arange(L), jnp.asarray(rng.standard_normal((L, 512)), jnp.float32),
            jnp.asarray(rng.standard_normal((L, 64)), jnp.float32),
        )  # fmt: skip
        q = jnp.asarray(rng.standard_normal((1, 128, 576)) / 24, jnp.bfloat16)
        slots = jnp.asarray(np.sort(rng.choice(L, min(2048, L), replace=False))[None, :], jnp.int32)
        t_dense = best_time(functools.partial(dense, q, cache, jnp.array([L - 1])))
        t_sparse = best_time(functools.partial(sparse, q, cache, slots))
        points.append((L, t_dense, t_sparse))
        t.row(L, f"{t_dense * 1e3:.2f}", f"{t_sparse * 1e3:.2f}", f"{t_dense / t_sparse:.1f}×")
    return points


def cpu_best_time(fn: Any, repeats: int = 3) -> float:
    """`best_time` in process CPU seconds (the process is pinned to one core: other load on the machine
    does not count), for rows judged against the FMA peak."""
    return best_time(fn, repeats, clock=time.process_time)


def bench_host_mla(t: Table, rows: list[int], length: int, peak: float) -> None:
    """The Rust core's fused sparse-MLA kernel (`host.sparse_mla_host`, what the host placement attends
    with) against the XLA gather + einsum path on the same bf16 values, DeepSeek-V3.2 widths."""
    import jax
    import jax.numpy as jnp
    import ml_dtypes

    from dsa_hybrid.host import sparse_mla_host
    from dsa_hybrid.ops.latent_cache import LatentCache
    from dsa_hybrid.ops.sparse_mla import sparse_mla

    t.title(f"sparse MLA on the CPU, Rust kernel vs XLA, h = 128, K = 2048 of L = {length} bf16 rows, 1 thread, "
            "CPU time")  # fmt: skip
    t.header("query rows", "XLA ms", "Rust kernel ms", "faster", "kernel GFLOP/s", "of FMA peak")
    rng = np.random.default_rng(3)
    scale = 0.1352338
    c_kv = rng.standard_normal((length, 512)).astype(np.float32)
    k_pe = rng.standard_normal((length, 64)).astype(np.float32)
    kv = np.concatenate([c_kv, k_pe], axis=1).astype(ml_dtypes.bfloat16)
    cache = LatentCache.create(length // 64, 64, kind="bf16").write(
        jnp.arange(length), jnp.asarray(c_kv), jnp.asarray(k_pe)
    )
    xla = jax.jit(lambda q, c, s: sparse_mla(q, c, s, scale=scale, backend="xla")[0])
    K = min(2048, length)
    for T in rows:
        q = (rng.standard_normal((T, 128, 576)) / 24).astype(np.float32)
        idx = np.sort(rng.choice(length, size=(T, K), replace=True), axis=1).astype(np.int32)
        t_xla = cpu_best_time(functools.partial(xla, jnp.asarray(q), cache, jnp.asarray(idx)), 2)
        t_host = cpu_best_time(functools.partial(sparse_mla_host, q, kv, idx, scale, 512, threads=1), 3)
        gflops = 2 * T * 128 * K * (576 + 512) / t_host / 1e9
        t.row(T, f"{t_xla * 1e3:.1f}", f"{t_host * 1e3:.1f}", f"{t_xla / t_host:.1f}×", f"{gflops:.0f}",
              f"{gflops / peak:.0%}")  # fmt: skip


def bench_layer_placement(t: Table, lengths: list[int], cfg_name: str) -> None:

    from dsa_hybrid.layers.dsa_attention import DSAParams
    from dsa_hybrid.models.config import DSAConfig
    from dsa_hybrid.serving.placement import PlacementCosts, time_layer

    cfg = DSAConfig.deepseek_v32() if cfg_name == "deepseek_v32" else DSAConfig.small()
    from dsa_hybrid.ops.target import target_device

    on_cpu = target_device().platform == "cpu"
    kind = "f32" if on_cpu else "bf16"  # the engine's default latent cache
    t.title(f"one DSA layer decode step ({cfg_name} widths, {kind} latent cache), indexer on the host vs the device")
    t.header("L", "device ms", "host ms", "host / device", "auto picks", "right?", "fitted: host / device")
    params = DSAParams.random(cfg, seed=0, std=0.01)
    # One-row decode is what this table checks: the model is fitted on one-row points alone (at the ends
    # of `lengths`, so the middle rows test its interpolation).
    costs = PlacementCosts.measure(
        cfg, params, 64, lengths=(min(lengths), max(lengths)), rows=(1,), threads=1, latent_kind=kind
    )
    # Within the fitted model's spread "auto" keeps the platform's default, as the engine's runner does.
    default = "host" if on_cpu else "device"
    for L in lengths:
        t_dev = time_layer(cfg, params, 64, L, 1, "device", 1, 3, kind)
        t_host = time_layer(cfg, params, 64, L, 1, "host", 1, 3, kind)
        pick = costs.choose(L, 1, -(-L // 64) * 64, default=default)
        fitted = costs.predict(L, 1, -(-L // 64) * 64)
        faster = "host" if t_host < t_dev else "device"
        # Measured within the margin either choice is right (the margin exists because such a
        # difference does not hold from one start-up to the next).
        close = max(t_host, t_dev) <= min(t_host, t_dev) * (1 + costs.spread)
        t.row(L, f"{t_dev * 1e3:.1f}", f"{t_host * 1e3:.1f}", f"{t_host / t_dev:.2f}", pick,
              "yes" if pick == faster else f"within the margin ({costs.spread:.0%})" if close else "no",
              f"{fitted['host'] / fitted['device']:.2f} (margin {costs.spread:.0%})")  # fmt: skip


def _steady_decode_seconds(engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    """Median seconds of the engine's decode-only steps after the first two (which compile), and the outputs."""
    _, steps, out = _prefill_and_decode(engine, prompts, new_tokens)
    return float(np.median(steps)), out


class _EngineRun:
    """`prompts` run to completion through `engine`, one engine step per `step()`: the prefill `curve`
    lists `(prompt tokens computed, CPU seconds so far)` after every prefill step (process CPU time, the
    process pinned to one core, less what JAX spent tracing and compiling meanwhile, `CompileClock`, so
    one run gives the prefill cost of every prompt length it passes); `decode` the wall seconds of every
    decode-only step."""

    def __init__(self, engine: Any, prompts: list[list[int]], new_tokens: int) -> None:
        self.engine = engine
        self.ids = [engine.add_request(p, new_tokens) for p in prompts]
        self.total = sum(len(p) for p in prompts)
        self.curve: list[tuple[int, float]] = []
        self.decode: list[float] = []
        self.prefill = 0.0

    @property
    def done(self) -> bool:
        return not self.engine.has_unfinished()

    @property
    def prefilling(self) -> bool:
        engine = self.engine
        return bool(engine.waiting) or any(r.computed < r.num_prompt for r in engine.running)

    def step(self) -> None:
        engine, decoding = self.engine, not self.prefilling
        t0, c0 = time.perf_counter(), time.process_time()
        with CompileClock() as clock:
            engine.step()
        if decoding:
            self.decode.append(time.perf_counter() - t0)
        else:
            self.prefill += time.process_time() - c0 - clock.seconds
            left = sum(r.num_prompt - min(r.computed, r.num_prompt) for r in [*engine.running, *engine.waiting])
            self.curve.append((self.total - left, self.prefill))

    def outputs(self) -> list[list[int]]:
        return [self.engine.finished[i].output for i in self.ids]


class _HFRun:
    """transformers' greedy generation of `new_tokens` after `prompt`, one step per `step()`: the prompt
    in chunks of `chunk` tokens into its cache (the whole prompt at once would hold `heads × L × L`
    attention scores: 32 GiB at 32K), the prefill `curve` as `(tokens computed, CPU seconds so far)`;
    the first token from the prefill's logits, then one decode step per token, `decode` their wall
    seconds; `tokens` the greedy tokens."""

    def __init__(self, torch: Any, model: Any, prompt: list[int], new_tokens: int, chunk: int = 1024) -> None:
        # `past_key_values` works in every 5.x release; the newer spelling `cache` does not.
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        self.torch, self.model, self.chunk, self.new_tokens = torch, model, chunk, new_tokens
        self.ids = torch.tensor([prompt])
        self.computed = 0
        self.past: Any = None
        self.curve: list[tuple[int, float]] = []
        self.decode: list[float] = []
        self.tokens: list[int] = []
        self.prefill = 0.0

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.new_tokens

    @property
    def prefilling(self) -> bool:
        return self.computed < self.ids.shape[1]

    def step(self) -> None:
        n = self.ids.shape[1]
        with self.torch.no_grad():
            if self.computed < n:
                c0 = time.process_time()
                chunk = self.ids[:, self.computed : self.computed + self.chunk]
                out = self.model(input_ids=chunk, past_key_values=self.past, use_cache=True)
                self.prefill += time.process_time() - c0
                self.past, self.computed = out.past_key_values, min(self.computed + self.chunk, n)
                self.curve.append((self.computed, self.prefill))
                if self.computed == n:
                    self.tokens.append(int(out.logits[:, -1:].argmax(-1)))
                return
            t0 = time.perf_counter()
            out = self.model(
                input_ids=self.torch.tensor([[self.tokens[-1]]]), past_key_values=self.past, use_cache=True
            )
            self.past = out.past_key_values
            self.tokens.append(int(out.logits[:, -1:].argmax(-1)))
            self.decode.append(time.perf_counter() - t0)


def _round_robin(runs: list[Any]) -> None:
    """One `step()` of every unfinished run per round until all are `done`. Each side's steps are timed
    in the same stretch of time as the others', so a drift in the machine's speed (the shared
    development machines move by up to 1.5× within minutes) hits every side alike instead of whichever
    ran during it."""
    while live := [r for r in runs if not r.done]:
        for r in live:
            r.step()


def _prefill_then_round_robin(runs: list[Any]) -> None:
    """Each run's prefill alone, one run after the other, then their decode steps in turn
    (`_round_robin`). Prefill chunks are not interleaved, and the callers run transformers' prefill
    before they create the engines: with the engines' steps between its chunks, and again with the
    engines merely made beforehand, transformers' 32K prefill took 1.9× the CPU time it took when it
    ran first and alone (1206 against 627 s; the Engine's did not grow), a bias in the Engine's favour
    whose cause is not pinned down."""
    for r in runs:
        while r.prefilling:
            r.step()
    _round_robin(runs)


def _prefill_and_decode(
    engine, prompts: list[list[int]], new_tokens: int
) -> tuple[list[tuple[int, float]], list[float], list[list[int]]]:
    """Run `prompts` to completion alone (`_EngineRun`): `(prefill curve, wall seconds of each decode-only
    step after the first two (which may compile), the outputs)`."""
    run = _EngineRun(engine, prompts, new_tokens)
    _round_robin([run])
    return run.curve, run.decode[2:] or run.decode or [0.0], run.outputs()


def _at(curve: list[tuple[int, float]], tokens: int) -> float:
    """The curve's CPU seconds once `tokens` prompt tokens were computed (the first step reaching them)."""
    return next(s for n, s in curve if n >= tokens)


def bench_overlap(t: Table, context: int, requests: int = 4) -> None:
    """Host placement with the rows in one group against two pipelined micro-batches."""
    from dsa_hybrid.models.causal_lm import ModelParams
    from dsa_hybrid.models.config import DSAConfig
    from dsa_hybrid.serving.engine import Engine

    cfg = DSAConfig.small()
    params = ModelParams.random(cfg, seed=0)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, cfg.vocab_size, context).tolist() for _ in range(requests)]
    t.title(f"host/device overlap: {requests} requests decoding at {context} tokens, host placement, "
            "DSAConfig.small(), 1 host thread")  # fmt: skip
    t.header("micro-batches", "ms / decode step", "tokens/s", "gain")
    base = None
    for mb in (1, 2):
        engine = Engine(params, cfg, num_pages=requests * (-(-(context + 8) // 64)) + 1, page_size=64,
                        max_tokens_per_step=1024, max_model_len=context + 8, placement="host",
                        micro_batches=mb, host_threads=1, backend="auto")  # fmt: skip
        s, _ = _steady_decode_seconds(engine, prompts, 8)
        base = base or s
        t.row(mb, f"{s * 1e3:.1f}", f"{requests / s:.1f}", f"{base / s:.2f}×")


def bench_staircase(
    t: Table, pairs: list[int], repeats: int = 15, rows: int = 1, power_of_two: bool = False
) -> dict[tuple[int, str], float]:
    """Decode-step cost at neighbouring context lengths (`pairs`: L, L' pairs), the staircase check: one
    decode step of `rows` rows through the whole model (`DSAConfig.small()`, `forward_jit`, the device
    placement, whose indexer scans the block table) with the table as wide as the engine pads it
    (`serving.runner.table_width`) and, with `power_of_two`, also padded to a power of two of pages (the
    rule before). The caches stay empty: the step's cost does not depend on the key values. Every point
    is compiled first, then timed in `repeats` rounds that call each point once in turn (so a slow spell
    of the machine hits every point alike); each point's figure is its fastest round, process CPU time.
    Returns `{(L, rule): seconds}`."""
    import jax.numpy as jnp

    from dsa_hybrid.models.causal_lm import ModelParams, create_caches, forward_jit
    from dsa_hybrid.models.config import DSAConfig
    from dsa_hybrid.serving.runner import table_width

    page = 64
    cfg = DSAConfig.small()
    params = ModelParams.random(cfg, seed=0)
    caches = create_caches(cfg, -(-max(pairs) // page) + 2, page, latent_kind="f32")
    rules = ("table_width", "power of two") if power_of_two else ("table_width",)
    carried = {"caches": caches}  # donated by each call, carried to the next

    def step(call: tuple) -> Callable[[], Any]:
        def run() -> Any:
            logits, carried["caches"] = forward_jit(*call, carried["caches"], "auto")
            return logits

        return run

    keys: list[tuple[int, str]] = []
    steps: list[Callable[[], Any]] = []
    for L in pairs:
        need = -(-L // page)
        for rule in rules:
            width = table_width(need, 1 << 30) if rule == "table_width" else 1 << (need - 1).bit_length()
            tab = np.full((rows, width), -1, np.int32)
            tab[:, :need] = np.arange(need)
            pos = jnp.full((rows,), L - 1, jnp.int32)
            keys.append((L, rule))
            steps.append(step((params, cfg, jnp.zeros((rows,), jnp.int32), pos, pos, jnp.asarray(tab))))
    cost = dict(zip(keys, best_times(steps, repeats, clock=time.process_time), strict=True))
    t.title(f"decode-step staircase: one step of {rows} row(s), device placement, DSAConfig.small(), "
            f"empty caches, block table as the engine pads it, fastest of {repeats} interleaved rounds "
            "(target: no jump > 15% between neighbours)")  # fmt: skip
    t.header("L → L'", *[f"ms ({r})" for r in rules], *[f"ratio ({r})" for r in rules])
    for a, b in zip(pairs[::2], pairs[1::2], strict=True):
        t.row(f"{a} → {b}", *[f"{cost[(a, r)] * 1e3:.2f} → {cost[(b, r)] * 1e3:.2f}" for r in rules],
              *[f"{cost[(b, r)] / cost[(a, r)]:.2f}×" for r in rules])  # fmt: skip
    return cost


def _hf_model(cfg):
    """transformers' DeepseekV32ForCausalLM (eager: dense attention + top-k mask) with random weights, and
    the same weights as `ModelParams` (through a safetensors checkpoint). None without torch/transformers."""
    try:
        torch: Any = importlib.import_module("torch")
        v32: Any = importlib.import_module("transformers.models.deepseek_v32.modeling_deepseek_v32")
    except ImportError:
        return None
    import json
    import tempfile

    from dsa_hybrid.models.causal_lm import ModelParams
    from dsa_hybrid.models.checkpoint import write_safetensors

    torch.set_num_threads(1)
    hf = cfg.to_hf_config()
    hf.pop("model_type")
    hf_cfg = v32.DeepseekV32Config(**hf)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = v32.DeepseekV32ForCausalLM(hf_cfg).float().eval()
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            f.write(json.dumps(hf_cfg.to_dict() | {"model_type": "deepseek_v32"}, default=str))
        weights = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
        write_safetensors(os.path.join(d, "model.safetensors"), weights)
        params = ModelParams.from_checkpoint(d, cfg)
    return torch, model, params


def _engine(params, cfg, context: int, new_tokens: int, placement: str, indexer: str = "fp8"):
    from dsa_hybrid.serving.engine import Engine

    return Engine(params, cfg, num_pages=-(-(context + new_tokens) // 64) + 1, page_size=64, max_tokens_per_step=1024,
                  max_model_len=context + new_tokens, placement=placement, latent_kind="f32", indexer=indexer,
                  host_threads=1, backend="auto")  # fmt: skip


def _first_difference(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def bench_end_to_end(
    t: Table, context: int, new_tokens: int, prefill_lengths: tuple[int, ...] = (), check_context: int = 4096
) -> None:
    """Against transformers' DeepseekV32ForCausalLM on the same weights: decode tokens/s at `context`, and
    prefill time (chunks of 1024 tokens both sides) at each of `prefill_lengths` and at `context`, read off
    the one `context`-token prefill each side runs (the time once that many prompt tokens were computed;
    a chunked prefill of a shorter prompt runs the same chunks). The Engine runs both placements with the
    FP8 indexer as deployed ("host" is its default on a CPU). Each side prefills alone, then the three
    decode in turn, one step each per round (`_prefill_then_round_robin`).
    Then the correctness check: at `check_context` tokens the Engine with the exact indexer
    (transformers' own computation) must give transformers' greedy tokens."""
    from dsa_hybrid.models.config import DSAConfig

    t.title(f"end to end: decode at {context} tokens of context, DSAConfig.small() weights, 1 thread, the three "
            "sides' decode steps in turn")  # fmt: skip
    cfg = DSAConfig.small()
    hf = _hf_model(cfg)
    if hf is None:
        t.row("skipped: needs torch and transformers (pip install torch transformers)")
        return
    torch, model, params = hf
    prompt = np.random.default_rng(4).integers(0, cfg.vocab_size, context).tolist()
    ref = _HFRun(torch, model, prompt, new_tokens)
    _prefill_then_round_robin([ref])  # before the engines exist (see `_prefill_then_round_robin`)
    runs = {p: _EngineRun(_engine(params, cfg, context, new_tokens, p, "fp8"), [prompt], new_tokens)
            for p in ("device", "host")}  # fmt: skip
    _prefill_then_round_robin([ref, *runs.values()])
    # The engines' first two decode steps may compile: those rounds are left out on every side. Each side's
    # fastest step (the rule of docs/performance.md), its median beside it, and the median over rounds of
    # the two steps taken in the same round (the ratio least moved by drift in the machine's speed).
    hf_steps = ref.decode[2:] or ref.decode
    hf_best, hf_median = min(hf_steps), float(np.median(hf_steps))
    t.header("", "ms / token (fastest step)", "median ms", "tokens/s", "× transformers", "× (medians)",
             "× (same-round steps, median)", "tokens equal to transformers'")  # fmt: skip
    t.row("transformers (dense + mask, exact indexer)", f"{hf_best * 1e3:.1f}", f"{hf_median * 1e3:.1f}",
          f"{1 / hf_best:.1f}", "1.0×", "1.0×", "1.0×", "—")  # fmt: skip
    for placement, run in runs.items():
        steps = run.decode[2:] or run.decode
        best, median = min(steps), float(np.median(steps))
        paired = float(np.median([h / o for h, o in zip(hf_steps, steps, strict=False)]))
        name = f"dsa_hybrid Engine, {placement}{' (the CPU default)' if placement == 'host' else ''}, FP8 indexer"
        t.row(name, f"{best * 1e3:.2f}", f"{median * 1e3:.2f}", f"{1 / best:.1f}", f"{hf_best / best:.1f}×",
              f"{hf_median / median:.1f}×", f"{paired:.1f}×",
              f"first {_first_difference(run.outputs()[0], ref.tokens)} of {new_tokens}")  # fmt: skip

    t.title(
        "end to end: prefill of one prompt, DSAConfig.small() weights, FP8 indexer, 1 thread, chunks of "
        f"1024 tokens (CPU seconds until L prompt tokens are computed, in one {context}-token prefill each; "
        "the Engine's less JAX's tracing and compilation)"
    )
    _prefill_rows(t, ref.curve, {p: r.curve for p, r in runs.items()}, prefill_lengths, context)
    del ref, runs

    # transformers runs the exact indexer (float32 keys): the Engine's exact indexer is the same
    # computation, so its greedy tokens must agree (the FP8 indexer may select differently near the top-k
    # boundary, and with random weights the top logits lie close together).
    short = prompt[: min(check_context, context)]
    t.title(f"end to end: greedy tokens against transformers at {len(short)} tokens of context, exact indexer")
    ref = _HFRun(torch, model, short, new_tokens)
    exact = _EngineRun(_engine(params, cfg, len(short), new_tokens, "device", "exact"), [short], new_tokens)
    _round_robin([ref, exact])
    t.header("", "tokens equal to transformers'")
    t.row("dsa_hybrid Engine, device placement, exact indexer",
          f"first {_first_difference(exact.outputs()[0], ref.tokens)} of {new_tokens}")  # fmt: skip


def _prefill_rows(
    t: Table, hf_curve: list[tuple[int, float]], curves: dict[str, list[tuple[int, float]]],
    lengths: tuple[int, ...], context: int,
) -> None:  # fmt: skip
    """The prefill table: at each of `lengths` (up to `context`) and at `context`, transformers' CPU
    seconds, each placement's, and the ratios."""
    names = list(curves)
    t.header("L", "transformers s", *[f"Engine {p} s" for p in names], *[f"{p} × transformers" for p in names])
    for L in sorted({*lengths, context}):
        if L <= context:
            hf_pre, ours = _at(hf_curve, L), {p: _at(curves[p], L) for p in names}
            t.row(L, f"{hf_pre:.1f}", *[f"{ours[p]:.1f}" for p in names],
                  *[f"{hf_pre / max(ours[p], 1e-9):.1f}×" for p in names])  # fmt: skip


def bench_prefill(
    t: Table, context: int, lengths: tuple[int, ...] = (), placements: tuple[str, ...] = ("device", "host")
) -> None:
    """The end-to-end prefill table alone (no decode rows): one `context`-token prefill per side, the
    Engine's `placements` against transformers, each side's alone, rows at each of `lengths` and at
    `context` (as in `bench_end_to_end`). `bench/bench_prefill.py` runs it."""
    from dsa_hybrid.models.config import DSAConfig

    cfg = DSAConfig.small()
    hf = _hf_model(cfg)
    t.title(f"end to end: prefill of one {context}-token prompt, DSAConfig.small() weights, FP8 indexer, 1 thread, "
            "chunks of 1024 (CPU seconds; the Engine's less JAX's tracing and compilation)")  # fmt: skip
    if hf is None:
        t.row("skipped: needs torch and transformers (pip install torch transformers)")
        return
    torch, model, params = hf
    prompt = np.random.default_rng(4).integers(0, cfg.vocab_size, context).tolist()
    ref = _HFRun(torch, model, prompt, 1)
    _prefill_then_round_robin([ref])  # before the engines exist (see `_prefill_then_round_robin`)
    runs = {p: _EngineRun(_engine(params, cfg, context, 1, p), [prompt], 1) for p in placements}
    _prefill_then_round_robin(list(runs.values()))
    _prefill_rows(t, ref.curve, {p: r.curve for p, r in runs.items()}, lengths, context)


def plot(points: list[tuple[int, float, float]], path: str, out: TextIO) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\n(plot skipped: needs matplotlib, pip install 'dsa_hybrid[bench]'; wanted {path})", file=out)
        return
    L = [p[0] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(L, [p[1] * 1e3 for p in points], "o-", label="dense MLA (all L tokens)")
    ax.plot(L, [p[2] * 1e3 for p in points], "s-", label="sparse MLA (top-2048)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length L (tokens)")
    ax.set_ylabel("ms per decode token (128 heads, 1 thread)")
    ax.set_title("DSA: attention cost per token, sparse vs dense")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"\nplot written to {path}", file=out)


def run_bench(quick: bool = False, plot_path: str | None = "dsa_bench.png", out: TextIO = sys.stdout) -> None:
    """Print the docs/performance.md table (markdown) and write the plot. `quick`: small sizes, a smoke run."""
    import jax

    from dsa_hybrid import cpu_features

    t = Table(out)
    peak = fma_peak_gflops()
    read = read_gbps(64 if quick else 256)
    print(f"# dsa_hybrid bench ({'quick' if quick else 'full'}): SIMD path {cpu_features()['simd_path']}, "
          f"JAX {jax.default_backend()}, FMA peak {peak:.0f} GFLOP/s (1 thread, the core's FMA chains; "
          f"numpy f32 matmul {matmul_gflops():.0f} GFLOP/s), read bandwidth {read:.1f} GB/s (1 thread)",
          file=out)  # fmt: skip
    started = time.perf_counter()
    bench_topk(t, [32_768] if quick else [32_768, 131_072, 1_048_576])
    bench_indexer(t, [8192] if quick else [8192, 32_768, 131_072], peak)
    points = bench_sparse_mla(t, [2048, 4096] if quick else [4096, 8192, 16_384, 32_768, 65_536])
    bench_host_mla(t, [1, 4] if quick else [1, 16], 4096 if quick else 32_768, peak)
    bench_layer_placement(t, [2048, 4096] if quick else [4096, 16_384, 65_536], "small" if quick else "deepseek_v32")
    bench_overlap(t, 1024 if quick else 8192)
    bench_staircase(t, [2048, 2112] if quick else [16_384, 16_960, 32_768, 33_792, 65_536, 67_584])
    bench_end_to_end(
        t, 1024 if quick else 32_768, 6 if quick else 24, (512,) if quick else (4096, 16_384), 512 if quick else 4096
    )
    print(f"\n(bench took {time.perf_counter() - started:.0f} s)", file=out)
    if plot_path:
        plot(points, plot_path, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dsa-hybrid bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--plot", default="dsa_bench.png")
    args = ap.parse_args(argv)
    # XLA on CPU has no flag that bounds all its threads: pin the process to one core (before JAX starts
    # its thread pool), so that every row is one core's time.
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    run_bench(args.quick, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

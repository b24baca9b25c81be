"""The main job (`dsa-hybrid demo`): serve requests through the `Engine`.

By default (`run_recall_demo`) it serves the recall model trained here (`dsa_hybrid.train`, shipped
weights): key-value recall prompts, each answer checked, accuracy under DSA against dense attention next
to the attention mass the indexer keeps. With `--random-weights` (`run_demo`):

Builds a small DSA model (random weights at `DSAConfig.small()` widths, or a Hugging Face
`DeepseekV32ForCausalLM` checkpoint), sends it long prompts (half of them sharing a long prefix, as
requests with a common system prompt do), serves them with continuous batching, chunked prefill,
prefix sharing and the indexer placed per step, and reports: per-stage times, tokens/s, cache memory,
and how the deployed FP8 selection compares with the float64 oracle of the spec.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import TextIO

import jax
import jax.numpy as jnp
import numpy as np

from dsa_hybrid import reference
from dsa_hybrid.host.cache import IndexerKeyCache
from dsa_hybrid.layers.dsa_attention import project
from dsa_hybrid.models.causal_lm import ModelParams, embed, pre_norm
from dsa_hybrid.models.config import DSAConfig
from dsa_hybrid.serving.compile_cache import enable_compilation_cache
from dsa_hybrid.serving.engine import Engine, EngineStats


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What `run_demo` measured. Recall and mass are means over the oracle rows (see `oracle_check`)."""

    outputs: list[list[int]]
    seconds: float
    stats: EngineStats
    recall_vs_exact: float  # deployed FP8 selection against the exact float64 indexer's top-k
    equal_to_fp8_oracle: float  # share of rows whose selected set equals the float64 FP8-spec oracle's
    attention_mass_kept: float  # share of dense attention's softmax mass inside the selected set
    cache_bytes: dict[str, int]
    compile_seconds: float = 0.0  # tracing, lowering and XLA compilation (or cache reads) during the demo
    cost_model_source: str | None = None  # "measured" or "loaded" under placement "auto"


class CompileTimer:
    """Seconds JAX spends turning functions into programs while active (its monitoring events: tracing,
    lowering to MLIR, and the XLA compilation — or, with the persistent cache, reading it back)."""

    EVENTS = {
        "/jax/core/compile/jaxpr_trace_duration": "trace",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
        "/jax/core/compile/backend_compile_duration": "compile",
    }

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.EVENTS.values(), 0.0)
        self.programs = 0

    def _listen(self, event: str, duration_secs: float, **kwargs: str | int) -> None:
        stage = self.EVENTS.get(event)
        if stage is not None:
            self.seconds[stage] += duration_secs
            self.programs += stage == "compile"

    def __enter__(self) -> CompileTimer:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *_: object) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


class Progress:
    """A dependency-free progress bar: redrawn in place on a terminal, a line per quarter otherwise."""

    def __init__(self, total: int, stream: TextIO, label: str = "tokens") -> None:
        self.total, self.stream, self.label, self.done = total, stream, label, 0
        self.t0 = time.perf_counter()
        self.tty = stream.isatty()
        self._quarter = 0

    def update(self, n: int) -> None:
        self.done += n
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
        width = 30
        fill = width * self.done // self.total
        line = f"[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {self.label}, {rate:6.1f}/s"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if self.done >= self.total else ""))
            self.stream.flush()
        elif 4 * self.done // self.total > self._quarter:
            self._quarter = 4 * self.done // self.total
            self.stream.write(line + "\n")


def make_prompts(cfg: DSAConfig, n: int, length: int, seed: int) -> list[list[int]]:
    """`n` prompts of about `length` tokens; every second one starts with the same `length // 2` tokens
    (a shared system prompt), so the engine can share those pages."""
    rng = np.random.default_rng(seed)
    system = rng.integers(0, cfg.vocab_size, length // 2).tolist()
    prompts = []
    for i in range(n):
        n_i = length - (i % 3) * (length // 16)  # lengths vary a little
        own = rng.integers(0, cfg.vocab_size, n_i).tolist()
        prompts.append(system + own[: n_i - len(system)] if i % 2 else own)
    return prompts


def oracle_check(params: ModelParams, cfg: DSAConfig, tokens: list[int], rows: int = 16) -> tuple[float, float, float]:
    """Layer 0 of the model on `tokens`: the last `rows` query positions' selection by the deployed path
    (FP8 keys in the Rust cache, FP8 queries, SIMD select: the bytes and code the engine uses) against
    the float64 oracle of `reference`. Returns (recall against the exact indexer's top-k, share of rows
    whose set equals the FP8-spec oracle's, mean attention mass of dense MLA kept by the selected set)."""
    L, K = len(tokens), cfg.index_topk
    blk = params.blocks[0]
    pos = jnp.arange(L, dtype=jnp.int32)
    proj = jax.jit(project, static_argnums=1)(
        blk.attn, cfg, pre_norm(blk, cfg, embed(params, jnp.asarray(tokens))), pos
    )
    q, w, k = (np.asarray(a, np.float64) for a in (proj.q_idx, proj.w_idx, proj.k_idx))
    q_rows = np.arange(L - rows, L)
    host = IndexerKeyCache(-(-L // 64), 64, cfg.index_head_dim)
    host.add_sequence(0)
    host.append(0, k.astype(np.float32))
    deployed = host.select(np.zeros(rows, np.int64), q[q_rows].astype(np.float32), w[q_rows].astype(np.float32),
                           q_rows, K)  # fmt: skip
    exact = reference.select_topk(reference.indexer_scores(q[q_rows], w[q_rows], k), q_rows, K)
    codes, scales = reference.quantize_indexer_keys(k)
    fp8 = reference.select_topk(reference.indexer_scores_fp8(q[q_rows], w[q_rows], codes, scales), q_rows, K)
    recall = float(np.mean([np.isin(d[d >= 0], e[e >= 0]).mean() for d, e in zip(deployed, exact, strict=True)]))
    same = float(np.mean([set(d.tolist()) == set(f.tolist()) for d, f in zip(deployed, fp8, strict=True)]))
    kv = np.concatenate([np.asarray(proj.c_kv, np.float64), np.asarray(proj.k_pe, np.float64)], axis=1)
    q_abs = np.asarray(proj.q_abs, np.float64)[q_rows]
    _, lse_sparse = reference.sparse_mla(q_abs, kv, deployed, cfg.softmax_scale, d_v=cfg.kv_lora_rank)
    _, lse_dense = reference.dense_mla(q_abs, kv, q_rows, cfg.softmax_scale, d_v=cfg.kv_lora_rank)
    return recall, same, float(np.exp(lse_sparse - lse_dense).mean())  # exp(Δlse) = the mass kept


def run_demo(
    *,
    checkpoint: str | None = None,
    model_type: str = "deepseek_v32",
    requests: int = 4,
    prompt_len: int = 3072,
    new_tokens: int = 32,
    placement: str = "auto",
    seed: int = 0,
    out: TextIO | None = None,
) -> DemoResult:
    """Serve `requests` prompts of about `prompt_len` tokens for `new_tokens` tokens each and report."""
    with CompileTimer() as timer:
        return _run_demo(checkpoint, model_type, requests, prompt_len, new_tokens, placement, seed, out, timer)


def _run_demo(
    checkpoint: str | None,
    model_type: str,
    requests: int,
    prompt_len: int,
    new_tokens: int,
    placement: str,
    seed: int,
    out: TextIO | None,
    timer: CompileTimer,
) -> DemoResult:
    say = (lambda *a: print(*a, file=out)) if out is not None else (lambda *a: None)
    t_load = time.perf_counter()
    jax_cache = enable_compilation_cache()
    if checkpoint:
        cfg = DSAConfig.from_hf_config(checkpoint)
        params = ModelParams.from_checkpoint(checkpoint, cfg)
        source = f"checkpoint {checkpoint}"
    else:
        cfg = DSAConfig.small(model_type)
        params = ModelParams.random(cfg, seed=seed)
        source = "random weights"
    prompts = make_prompts(cfg, requests, prompt_len, seed)
    longest = max(map(len, prompts)) + new_tokens
    page_size = 64
    pages = sum(-(-(len(p) + new_tokens) // page_size) for p in prompts) + 4
    say(f"dsa_hybrid demo: {cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} MLA heads, indexer {cfg.index_n_heads}×{cfg.index_head_dim}, "
        f"index_topk {cfg.index_topk} ({source})")  # fmt: skip
    say(f"  {requests} requests, prompts of {min(map(len, prompts))}–{max(map(len, prompts))} tokens "
        f"(every second one shares a {prompt_len // 2}-token prefix), {new_tokens} new tokens each")  # fmt: skip
    t_engine = time.perf_counter()
    engine = Engine(params, cfg, num_pages=pages, page_size=page_size, max_tokens_per_step=512,
                    max_model_len=longest, placement=placement, backend="auto")  # fmt: skip
    t_ready = time.perf_counter()
    if engine.cost_model is not None:
        c = engine.cost_model
        say(f"  placement 'auto': cost model {engine.cost_model_source} at start-up in {t_ready - t_engine:.1f} s"
            f" — per layer, "
            f"host {c.host_fixed * 1e6:.0f} µs + {c.host_per_key * 1e9:.2f} ns/key, "
            f"device {c.device_fixed * 1e6:.0f} µs + {c.device_per_key * 1e9:.2f} ns/key")  # fmt: skip
    say(f"  JAX backend {jax.default_backend()}; model ready in {t_engine - t_load:.1f} s")
    say("")
    bar = Progress(requests * new_tokens, out or sys.stderr) if out is not None else None
    t0 = time.perf_counter()
    ids = [engine.add_request(p, new_tokens) for p in prompts]
    while engine.has_unfinished():
        new = engine.step()
        if bar is not None and new:
            bar.update(sum(map(len, new.values())))
    seconds = time.perf_counter() - t0
    outputs = [engine.finished[i].output for i in ids]
    st = engine.stats
    memory = engine.cache_bytes()
    # The oracle looks at the last request that shared the prefix: its final tokens, as the last step saw them.
    check = engine.finished[ids[min(1, requests - 1)]]
    seen = check.prompt + check.output[:-1]
    recall, same, mass = oracle_check(params, cfg, seen)
    uniform = cfg.index_topk / (len(seen) - 8)  # what K positions hold if attention were flat

    computed = st.prompt_tokens_computed + st.decode_tokens
    say("")
    say(f"  served {requests} requests in {seconds:.2f} s: {st.steps} steps, {computed / seconds:.0f} tokens/s "
        f"through the model, {st.decode_tokens / seconds:.1f} new tokens/s")  # fmt: skip
    if st.decode_steps:
        # The median step: the first step of each new batch shape also compiles it.
        secs, toks = (float(np.median([s[i] for s in st.decode_step_log])) for i in (0, 1))
        say(f"  decode-only steps: {st.decode_steps}, median {secs * 1e3:.0f} ms for {toks:.0f} tokens: "
            f"{toks / secs:.1f} tokens/s (all decode steps, compilation included: "
            f"{st.decode_step_tokens / st.decode_step_seconds:.1f} tokens/s)")  # fmt: skip
    say(f"  prompt tokens computed {st.prompt_tokens_computed}, shared through prefix pages {st.shared_tokens}, "
        f"preemptions {st.preemptions}")  # fmt: skip
    say(f"  steps by indexer placement: device {st.steps_by_placement['device']}, host {st.steps_by_placement['host']}")
    say("  stage times (first steps include compilation):")
    for stage, s in st.seconds.items():
        say(f"    {stage:<9} {s:8.2f} s")
    say(f"  cache memory: latent {memory['latent'] / 2**20:.1f} MiB, device indexer "
        f"{memory['device_indexer'] / 2**20:.1f} MiB, host indexer {memory['host_indexer'] / 2**20:.1f} MiB "
        f"({engine.num_pages} pages of {page_size} tokens)")  # fmt: skip
    say(f"  selection vs the float64 oracle (layer 0, last 16 positions of request {check.id}, "
        f"{len(check.prompt) + len(check.output) - 1} tokens):")  # fmt: skip
    say(f"    recall of the exact indexer's top-{cfg.index_topk}: {recall:.3f}")
    say(f"    rows whose set equals the FP8-spec oracle's: {same:.3f}")
    say(f"    attention mass of dense MLA kept by the selected set: {mass:.4f} (any {cfg.index_topk} positions of a "
        f"flat attention: {uniform:.4f})")  # fmt: skip
    if not checkpoint:
        say("    (random weights: the indexer is untrained, so it cannot know where the attention looks;")
        say("     a trained indexer is trained to keep that mass, dsa.md §7. The recall is what this code decides.)")
    say(f"  first tokens of each output: {[o[:6] for o in outputs]}")
    where = f"persistent cache {jax_cache}" if jax_cache is not None else "no persistent cache"
    say(f"  JAX compilation: {timer.programs} programs, {timer.total:.1f} s (tracing {timer.seconds['trace']:.1f}, "
        f"lowering {timer.seconds['lower']:.1f}, XLA or cache {timer.seconds['compile']:.1f}; {where}); "
        f"demo total {time.perf_counter() - t_load:.1f} s")  # fmt: skip
    return DemoResult(outputs, seconds, st, recall, same, mass, memory, timer.total, engine.cost_model_source)


@dataclasses.dataclass(frozen=True)
class RecallDemoResult:
    """What `run_recall_demo` measured: accuracy of the served answers under DSA (`k` of `context`
    positions) and under dense attention, the attention mass the indexer's top-`k` keeps (the layer that
    keeps the least, at the ask rows), and the serving throughput of each run."""

    context: int
    k: int
    answers: int
    dsa_accuracy: float
    dense_accuracy: float
    mass_kept: float
    dsa_tokens_per_s: float
    dense_tokens_per_s: float
    seconds: float


def run_recall_demo(
    *,
    weights: str | None = None,
    requests: int = 16,
    prompt_len: int = 256,
    fraction: int = 16,
    placement: str = "auto",
    seed: int = 0,
    out: TextIO | None = None,
) -> RecallDemoResult:
    """Serve the trained recall model (`train.recipes.load_model`: the shipped weights, or `weights`)
    through the `Engine`: `requests` key-value recall prompts of `prompt_len` tokens, each asking one
    question (one new token), once with DSA at `k = prompt_len / fraction` and once dense (`k` ≥ the
    context); check every answer and report both accuracies, the attention mass kept and the speed."""
    from dsa_hybrid.train.forward import forward_train
    from dsa_hybrid.train.recipes import load_model

    say = (lambda *a: print(*a, file=out)) if out is not None else (lambda *a: None)
    t_start = time.perf_counter()
    params, cfg, task = load_model(weights)
    prompts, answers = task.prompts(np.random.default_rng(seed), requests, prompt_len)
    k = max(1, prompt_len // fraction)
    say(f"dsa_hybrid demo: the recall model trained here ({cfg.num_hidden_layers} layers, hidden "
        f"{cfg.hidden_size}, indexer {cfg.index_n_heads}×{cfg.index_head_dim}; "
        "`dsa-hybrid train --recipe recall` reproduces it)")  # fmt: skip
    say(f"  {requests} key-value recall prompts of {prompt_len} tokens: 8 facts hidden among filler, one question "
        f"each; DSA keeps k = {k} of {prompt_len} positions (L/{fraction})")  # fmt: skip
    page_size = 64
    pages = requests * (-(-(prompt_len + 1) // page_size)) + 4
    results = {}
    for name, topk in (("DSA", k), ("dense", prompt_len + page_size)):
        engine = Engine(params, cfg.replace(index_topk=topk), num_pages=pages, page_size=page_size,
                        max_tokens_per_step=512, max_model_len=prompt_len + 1, placement=placement,
                        backend="auto")  # fmt: skip
        t0 = time.perf_counter()
        outputs = engine.generate(prompts, max_new_tokens=1)
        secs = time.perf_counter() - t0
        right = [o[:1] == [a] for o, a in zip(outputs, answers, strict=True)]
        results[name] = (float(np.mean(right)), engine.stats.prompt_tokens_computed / secs)
        say(f"  {name:<5} (index_topk {topk}): {sum(right)}/{requests} answers right, "
            f"{results[name][1]:.0f} prompt tokens/s ({secs:.1f} s, compilation included)")  # fmt: skip
    # Mass kept: dense attention's distribution at the question, inside the indexer's top-k (float32).
    rows = jnp.asarray([prompt_len - 1], jnp.int32)
    tokens = jnp.asarray(np.asarray(prompts[: min(4, requests)], np.int32))
    dense_fwd = jax.jit(lambda p, t: forward_train(p, cfg, t, mode="dense", aux_rows=rows, query_block=256))
    _, aux = dense_fwd(params, tokens)
    masses = []
    for a in aux:
        if a.scores is not None:
            top = np.argsort(-np.asarray(a.scores), axis=-1, kind="stable")[..., :k]
            masses.append(float(np.take_along_axis(np.asarray(a.target), top, -1).sum(-1).mean()))
    mass = min(masses) if masses else float("nan")
    per_layer = ", ".join(f"layer {i} {m:.3f}" for i, m in enumerate(masses))
    say(f"  attention mass of dense attention kept by the indexer's top-{k} at the question: {per_layer} "
        f"(any {k} positions of a flat attention: {k / prompt_len:.3f})")  # fmt: skip
    seconds = time.perf_counter() - t_start
    say(f"  accuracy: DSA {results['DSA'][0]:.3f} vs dense {results['dense'][0]:.3f}; demo total {seconds:.1f} s")
    say("  (`dsa-hybrid demo --random-weights` runs the long-prompt serving demo on a random model)")
    return RecallDemoResult(
        prompt_len, k, requests, results["DSA"][0], results["dense"][0], mass, results["DSA"][1],
        results["dense"][1], seconds,
    )  # fmt: skip


def shipped_recall_weights() -> bool:
    """Whether the package ships the trained recall model (`python/dsa_hybrid/train/weights/recall`)."""
    from dsa_hybrid.train.recipes import WEIGHTS_DIR

    return (WEIGHTS_DIR / "recall" / "model.safetensors").is_file()

"""Compile every Pallas kernel ahead of time for TPU targets, on any host (no TPU needed).

    python tpu/compile.py                  # the CI set: every kernel × v5e, v6e, v5p, TPU7x, representative shapes
    python tpu/compile.py --all            # every listed shape (DeepSeek-V3.2 and GLM-5, full heads and TP splits)
    python tpu/compile.py --chips v6e --kernels sparse_mla --memory

It runs the real TPU compiler (libtpu: `pip install "dsa_hybrid[tpu-compile]"`, the version jax's own
`tpu` extra pins) against TPU topologies from `jax.experimental.topologies`, compiling each kernel
through the public API exactly as a user would: `sparse_mla(..., backend="auto")`,
`prefix_mla(..., backend="auto")`, `select_topk_device(..., backend="auto")` (its chunk scan runs the
`topk_select` kernel too) and the top-k select on its own, `ops.tpu.topk.topk_select(...)` (whose
default `interpret=None` follows the target the same way), under `jax.default_device(<TPU device>)`,
with `jax.ShapeDtypeStruct` arguments on that device. "auto" must choose the Pallas kernels for the TPU
target (a compiled program without a Mosaic kernel is a failure).

For each kernel × chip × shape the table prints whether it compiled (or the error's first line),
the VMEM the kernel computes for its blocks and scratch (and the limit it asks for), the compiled
program's HBM arguments and temporaries (`memory_analysis()`), its `cost_analysis()` FLOPs and bytes
accessed (a Mosaic kernel contributes the `CostEstimate` it declares; XLA ops around it are the
compiler's own count) and, next to them, the roofline lower bound of docs/performance.md: the
format's bytes over the chip's HBM bandwidth and the model FLOPs over its bf16 peak, whichever is
larger. **Compiled here is not timed on a chip**: `tpu/validate.py` on a TPU VM does that.

`--memory` adds the bytes per token each cache format really allocates in a compiled kernel program
(the growth of `memory_analysis()` argument bytes between two cache sizes, divided by the tokens
added), next to the format's own size. Exit status 1 when anything fails to compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from typing import Any

# Several processes on one host may load libtpu at once (other users, pytest workers); without this,
# libtpu's lockfile makes every process but the first fail to create a topology.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

CHIPS = {"v5e": "v5e:2x2", "v6e": "v6e:2x2", "v5p": "v5p:2x2x1", "tpu7x": "tpu7x:2x2x1"}
# HBM bandwidth (bytes/s) and dense bf16 peak (FLOP/s) per chip: docs/performance.md.
ROOFLINE = {"v5e": (0.82e12, 197e12), "v5p": (2.77e12, 459e12), "v6e": (1.64e12, 918e12), "tpu7x": (7.38e12, 2307e12)}
FORMAT_BYTES = {"bf16": 1152, "fp8": 656}  # per latent row, dsa.md §6
INDEXER_BYTES = 132  # per indexer key, dsa.md §6
K = 2048  # index_topk of both models
PAGE = 64
CONTEXT_PAGES = 512  # cache pages (32K tokens) in the compiled programs
MODELS = {  # name: (MLA heads, indexer heads)
    "V3.2": (128, 64),
    "GLM-5": (64, 32),
}


@dataclasses.dataclass(frozen=True)
class Case:
    kernel: str  # "sparse_mla", "prefix_mla", "query_blocks", "indexer", "topk"
    model: str
    heads: int  # MLA heads (sparse/prefix) or indexer heads (0 for topk)
    tokens: int
    kind: str = ""  # latent cache format (sparse/prefix)
    columns: int = 0  # scores per row (topk)

    @property
    def shape(self) -> str:
        if self.kernel == "topk":
            return f"k={K} T={self.tokens} L={self.columns}"
        what = f"h={self.heads}" if self.kernel != "indexer" else f"H_I={self.heads}"
        kind = f" {self.kind}" if self.kind else ""
        return f"{self.model} {what} T={self.tokens}{kind}"


def all_cases() -> list[Case]:
    """Every listed shape: both models, full heads and an 8-way tensor-parallel split, decode (1 token)
    and prefill chunks of 13 and 100 tokens, bf16 and FP8 latent caches."""
    out = []
    for model, (h, hi) in MODELS.items():
        for heads in (h, h // 8):
            for T in (1, 13, 100):
                for kind in ("bf16", "fp8"):
                    out.append(Case("sparse_mla", model, heads, T, kind))
                    out.append(Case("prefix_mla", model, heads, T, kind))
        for T in (1, 13, 100):
            out.append(Case("indexer", model, hi, T))
        for heads in (h, h // 8):  # query-block prefill: chunks of 13 and 100 rows
            for T in (13, 100):
                for kind in ("bf16", "fp8"):
                    out.append(Case("query_blocks", model, heads, T, kind))
    for T in (1, 13, 64):  # the top-k select on its own: decode, a prefill chunk, a batch; contexts to 128K
        for L in (4096, 32768, 131072):
            out.append(_topk_case(T, L))
    return out


def _topk_case(tokens: int, columns: int) -> Case:
    return Case("topk", "", 0, tokens, columns=columns)


def ci_cases() -> list[Case]:
    """The representative subset CI compiles for every chip (about a minute in all)."""
    return [
        Case("sparse_mla", "V3.2", 128, 1, "bf16"),
        Case("sparse_mla", "V3.2", 128, 1, "fp8"),
        Case("sparse_mla", "V3.2", 16, 13, "fp8"),
        Case("sparse_mla", "GLM-5", 64, 100, "bf16"),
        Case("sparse_mla", "GLM-5", 8, 1, "fp8"),
        Case("prefix_mla", "V3.2", 128, 1, "fp8"),
        Case("prefix_mla", "GLM-5", 8, 100, "bf16"),
        Case("query_blocks", "V3.2", 16, 13, "fp8"),
        Case("indexer", "V3.2", 64, 1),
        Case("indexer", "GLM-5", 32, 13),
        _topk_case(1, 4096),
        _topk_case(13, 32768),
        _topk_case(64, 131072),
    ]


_TOPOLOGIES: dict[str, Any] = {}


def have_libtpu() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def device(chip: str) -> Any:
    """The first device of a small topology of `chip` (created once per process)."""
    if chip not in _TOPOLOGIES:
        from jax.experimental import topologies

        _TOPOLOGIES[chip] = topologies.get_topology_desc(topology_name=CHIPS[chip], platform="tpu").devices[0]
    return _TOPOLOGIES[chip]


def _spec(dev: Any, shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.SingleDeviceSharding(dev))


def _on(dev: Any, tree: Any) -> Any:
    return jax.tree.map(lambda a: _spec(dev, a.shape, a.dtype), tree)


def build(case: Case, dev: Any, pages: int = CONTEXT_PAGES) -> tuple[Any, tuple[Any, ...]]:
    """The function a user would jit for `case` and its abstract arguments on `dev`."""
    from dsa_hybrid.ops.indexer import IndexerPages, select_topk_device
    from dsa_hybrid.ops.latent_cache import LatentCache
    from dsa_hybrid.ops.sparse_mla import prefix_mla, sparse_mla
    from dsa_hybrid.ops.tpu.query_blocks import sparse_mla_blocks_tpu
    from dsa_hybrid.ops.tpu.topk import topk_select

    T, h = case.tokens, case.heads
    if case.kernel == "topk":  # interpret=None: the compiled kernel for the TPU target in context
        fn = lambda s, n: topk_select(s, n, K, with_nan_flag=True)  # noqa: E731
        return fn, (_spec(dev, (T, case.columns), jnp.float32), _spec(dev, (T,), jnp.int32))
    scale = 0.1352338
    if case.kernel == "indexer":
        index = _on(dev, jax.eval_shape(lambda: IndexerPages.create(pages, PAGE, 128)))
        args = (
            _spec(dev, (T, h, 128), jnp.float32),
            _spec(dev, (T, h), jnp.float32),
            index,
            _spec(dev, (T, pages), jnp.int32),
            _spec(dev, (T,), jnp.int32),
        )
        return (lambda q, w, p, b, pos: select_topk_device(q, w, p, b, pos, K, backend="auto")), args
    cache = _on(dev, jax.eval_shape(lambda: LatentCache.create(pages, PAGE, kind=case.kind)))
    q = _spec(dev, (T, h, 576), jnp.bfloat16)
    if case.kernel == "sparse_mla":
        fn = lambda q, c, s: sparse_mla(q, c, s, scale=scale, d_v=512, backend="auto")  # noqa: E731
        return fn, (q, cache, _spec(dev, (T, K), jnp.int32))
    if case.kernel == "query_blocks":  # the kernel itself, for the TPU target in context
        fn = lambda q, c, s: sparse_mla_blocks_tpu(q, c, s, None, scale=scale, d_v=512)  # noqa: E731
        return fn, (q, cache, _spec(dev, (T, K), jnp.int32))
    fn = lambda q, c, b, n: prefix_mla(q, c, b, n, scale=scale, d_v=512, backend="auto")  # noqa: E731
    return fn, (q, cache, _spec(dev, (T, K // PAGE), jnp.int32), _spec(dev, (T,), jnp.int32))


@dataclasses.dataclass
class Result:
    case: Case
    chip: str
    ok: bool
    error: str = ""
    seconds: float = 0.0
    vmem: int = 0
    vmem_limit: int | None = None
    blocks: str = ""
    args_bytes: int = 0
    out_bytes: int = 0
    temp_bytes: int = 0
    flops: float = 0.0
    bytes_accessed: float = 0.0
    kernels: tuple[str, ...] = ()


def roofline(case: Case, chip: str) -> tuple[float, float, float]:
    """`(model bytes, model FLOPs, lower bound in seconds)` per docs/dsa.md §8 for the whole call."""
    bw, peak = ROOFLINE[chip]
    T = case.tokens
    if case.kernel == "indexer":
        L = CONTEXT_PAGES * PAGE
        nbytes, flops = T * L * INDEXER_BYTES, 2 * T * case.heads * 128 * L
    elif case.kernel == "topk":  # one read of the float32 scores (no MXU work to speak of)
        nbytes, flops = T * case.columns * 4, 0
    else:  # K rows per token (a prefix path row at full length reads K positions too)
        nbytes, flops = T * K * FORMAT_BYTES[case.kind], 2 * T * case.heads * K * (576 + 512)
    return nbytes, flops, max(nbytes / bw, flops / peak)


def compile_case(case: Case, chip: str) -> Result:
    from dsa_hybrid.ops.tpu import block_sizes

    t0 = time.perf_counter()
    try:
        dev = device(chip)
        fn, args = build(case, dev)
        block_sizes.LAUNCHES.clear()
        with jax.default_device(dev):
            compiled = jax.jit(fn).lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - a compile failure is a row of the table
        return Result(case, chip, False, _first_line(e), time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    text = compiled.as_text()
    kernels = mosaic_kernels(text)
    n_mosaic = len(kernels)
    launches = [launch for launch in block_sizes.LAUNCHES]
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    r = Result(
        case,
        chip,
        n_mosaic > 0,
        "" if n_mosaic else "compiled without a Mosaic kernel: 'auto' did not pick Pallas",
        seconds,
        vmem=max((x["vmem_need"] for x in launches), default=0),
        vmem_limit=max((x["vmem_limit"] or 0 for x in launches), default=0) or None,
        blocks="; ".join(_blocks(x) for x in {x["name"]: x for x in launches}.values()),
        args_bytes=int(mem.argument_size_in_bytes),
        out_bytes=int(mem.output_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        kernels=kernels,
    )
    return r


def mosaic_kernels(hlo_text: str) -> tuple[str, ...]:
    """Names of the Mosaic (Pallas TPU) kernels in a compiled program's HLO."""
    names = re.findall(r"%([A-Za-z_][\w]*?)(?:\.\d+)? = [^\n]*custom_call_target=\"tpu_custom_call\"", hlo_text)
    return tuple(sorted(set(names)))


def layer_kernels(chip: str, tokens: int = 1) -> tuple[str, ...]:
    """Compile one `dsa_attention` layer (backend "auto") for `chip` at small model widths but the
    kernels' real widths (latent 512 + 64, indexer heads of 128, K = 2048) and return the Mosaic
    kernels in it: the layer path picks Pallas for a TPU target iff they are there."""
    from dsa_hybrid.layers.dsa_attention import DSACaches, DSAParams, dsa_attention, param_shapes
    from dsa_hybrid.models.config import DSAConfig

    dev = device(chip)
    cfg = DSAConfig.deepseek_v32().replace(hidden_size=512, num_attention_heads=16, q_lora_rank=256, index_n_heads=16)
    params = DSAParams(**{k: _spec(dev, v, jnp.float32) for k, v in param_shapes(cfg).items()})
    pages = 64
    caches = _on(dev, jax.eval_shape(lambda: DSACaches.create(cfg, pages, PAGE, latent_kind="fp8")))
    args = (
        _spec(dev, (tokens, cfg.hidden_size), jnp.float32),
        _spec(dev, (tokens,), jnp.int32),
        _spec(dev, (tokens,), jnp.int32),
        _spec(dev, (tokens, pages), jnp.int32),
    )
    fn = lambda p, x, pos, s, b, c: dsa_attention(p, cfg, x, pos, s, b, c, backend="auto")  # noqa: E731
    with jax.default_device(dev):
        compiled = jax.jit(fn).lower(params, *args, caches).compile()
    return mosaic_kernels(compiled.as_text())


def _blocks(launch: dict) -> str:
    sizes = ",".join(f"{k}={v}" for k, v in launch.items() if k not in {"name", "chip", "vmem_need", "vmem_limit"})
    return f"{launch['name']}({sizes})"


def _first_line(e: BaseException) -> str:
    msg = str(e)
    i = msg.find("Mosaic failed to compile TPU kernel:")
    if i >= 0:
        msg = msg[i:]
    line = next((x for x in msg.splitlines() if x.strip()), type(e).__name__)
    return f"{type(e).__name__}: {line.strip()}"[:300]


def _mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


def format_rows(results: list[Result]) -> list[str]:
    head = (
        "| kernel | chip | shape | result | VMEM MiB (limit) | HBM args / temp MiB | cost GFLOP | cost MB accessed "
        "| roofline MB / GFLOP | roofline µs | cost-analysis µs | compile s |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in results:
        nbytes, flops, bound = roofline(r.case, r.chip)
        bw, peak = ROOFLINE[r.chip]
        if r.ok:
            limit = f" ({_mib(r.vmem_limit)})" if r.vmem_limit else ""
            compiled_us = max(r.bytes_accessed / bw, r.flops / peak) * 1e6
            cells = [
                "ok",
                f"{_mib(r.vmem)}{limit}",
                f"{_mib(r.args_bytes)} / {_mib(r.temp_bytes)}",
                f"{r.flops / 1e9:.2f}",
                f"{r.bytes_accessed / 1e6:.2f}",
                f"{nbytes / 1e6:.2f} / {flops / 1e9:.2f}",
                f"{bound * 1e6:.2f}",
                f"{compiled_us:.2f}",
            ]
        else:
            model = f"{nbytes / 1e6:.2f} / {flops / 1e9:.2f}"
            cells = [f"FAILED: {r.error}", "", "", "", "", model, f"{bound * 1e6:.2f}", ""]
        lines.append(f"| {r.case.kernel} | {r.chip} | {r.case.shape} | " + " | ".join(cells) + f" | {r.seconds:.1f} |")
    return lines


def bytes_per_token(chip: str) -> list[tuple[str, float, float, int]]:
    """`(format, allocated bytes per token, temporaries per token, format size)` in compiled kernel
    programs: the growth of argument (and temp) bytes from 256 to 512 cache pages over the tokens added."""
    rows = []
    dev = device(chip)
    for label, case, size in (
        ("latent bf16", Case("sparse_mla", "V3.2", 16, 1, "bf16"), FORMAT_BYTES["bf16"]),
        ("latent fp8", Case("sparse_mla", "V3.2", 16, 1, "fp8"), FORMAT_BYTES["fp8"]),
        ("indexer fp8", Case("indexer", "V3.2", 64, 1), INDEXER_BYTES),
    ):
        mems = []
        for pages in (256, 512):
            fn, args = build(case, dev, pages)
            if case.kernel == "indexer":  # the same block table width, so only the cache grows
                args = (*args[:3], _spec(dev, (1, 256), jnp.int32), args[4])
            with jax.default_device(dev):
                mems.append(jax.jit(fn).lower(*args).compile().memory_analysis())
        tokens = 256 * PAGE
        arg = (mems[1].argument_size_in_bytes - mems[0].argument_size_in_bytes) / tokens
        tmp = (mems[1].temp_size_in_bytes - mems[0].temp_size_in_bytes) / tokens
        rows.append((label, arg, tmp, size))
    return rows


def probe_scoped_vmem(chip: str) -> tuple[float, float]:
    """`(MiB of double-buffered BlockSpec blocks, MiB of scratch)` a kernel may use on `chip` without
    `vmem_limit_bytes`, by bisection over trivial kernels (the first is the default scoped VMEM limit;
    scratch is checked against the physical VMEM only). Feeds `block_sizes.SCOPED_VMEM_DEFAULT`."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    dev = device(chip)

    def compiles(mib: float, scratch: bool) -> bool:
        rows = max(8, int(mib * 2**20) // (128 * 4) // (1 if scratch else 2) // 8 * 8)

        def kernel(x_ref, o_ref, *s_ref):
            o_ref[...] = x_ref[0:8, :] * 2 if not scratch else s_ref[0][0:8, :] + x_ref[...]

        if scratch:
            call = pl.pallas_call(
                kernel, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                scratch_shapes=[pltpu.VMEM((rows, 128), jnp.float32)],
            )  # fmt: skip
            arg = _spec(dev, (8, 128), jnp.float32)
        else:
            call = pl.pallas_call(
                kernel, grid=(2,), in_specs=[pl.BlockSpec((rows, 128), lambda i: (i, 0))],
                out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
                out_shape=jax.ShapeDtypeStruct((16, 128), jnp.float32),
            )  # fmt: skip
            arg = _spec(dev, (2 * rows, 128), jnp.float32)
        try:
            with jax.default_device(dev):
                jax.jit(call).lower(arg).compile()
        except Exception:  # noqa: BLE001 - does not fit
            return False
        return True

    out = []
    for scratch in (False, True):
        lo, hi = 1.0, 256.0
        while hi - lo > 0.5:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if compiles(mid, scratch) else (lo, mid)
        out.append(lo)
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chips", nargs="+", default=list(CHIPS), choices=list(CHIPS))
    ap.add_argument("--kernels", nargs="+", default=["sparse_mla", "prefix_mla", "query_blocks", "indexer", "topk"])
    ap.add_argument("--all", action="store_true", help="every listed shape, not only the CI set")
    ap.add_argument("--memory", action="store_true", help="also the allocated bytes per token of each cache format")
    ap.add_argument("--layer", action="store_true", help="also which kernels a compiled dsa_attention layer uses")
    ap.add_argument("--probe-vmem", action="store_true", help="also measure each chip's default scoped VMEM limit")
    args = ap.parse_args(argv)
    if not have_libtpu():
        print('libtpu is not installed: pip install "dsa_hybrid[tpu-compile]" (or "jax[tpu]")')
        return 2
    import libtpu

    cases = [c for c in (all_cases() if args.all else ci_cases()) if c.kernel in args.kernels]
    version = getattr(libtpu, "__version__", "?")
    print(f"jax {jax.__version__}, libtpu {version}; {len(cases)} shapes × {len(args.chips)} chips")
    results = []
    t0 = time.perf_counter()
    for chip in args.chips:
        for case in cases:
            results.append(compile_case(case, chip))
    print("\n".join(format_rows(results)))
    failed = [r for r in results if not r.ok]
    if args.memory:
        print("\n| chip | cache | allocated B/token | temporaries B/token | format B/token |\n|---|---|---|---|---|")
        for chip in args.chips:
            for label, arg, tmp, size in bytes_per_token(chip):
                print(f"| {chip} | {label} | {arg:.1f} | {tmp:.1f} | {size} |")
    if args.probe_vmem:
        for chip in args.chips:
            blocks, scratch = probe_scoped_vmem(chip)
            print(f"{chip}: without vmem_limit_bytes ≈{blocks:.0f} MiB of pipelined blocks, ≈{scratch:.0f} MiB scratch")
    if args.layer:
        for chip in args.chips:
            print(f"dsa_attention layer on {chip} (backend 'auto'): Mosaic kernels {', '.join(layer_kernels(chip))}")
    print(f"\n{len(results) - len(failed)}/{len(results)} compiled in {time.perf_counter() - t0:.0f} s")
    for r in failed:
        print(f"FAILED {r.case.kernel} {r.chip} {r.case.shape}: {r.error}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

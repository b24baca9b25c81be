"""The main job (`dsa-hybrid demo`), `bench --quick`, `oracle` and `info`."""

import io

import pytest

from dsa_hybrid import DSAConfig, cli
from dsa_hybrid.cli.demo import make_prompts, run_demo
from dsa_hybrid.cli.oracle_demo import run_oracle_demo


def test_demo_serves_every_request_and_shares_the_common_prefix():
    out = io.StringIO()
    r = run_demo(requests=4, prompt_len=640, new_tokens=3, placement="host", out=out)
    text = out.getvalue()
    assert [len(o) for o in r.outputs] == [3] * 4
    assert r.stats.shared_tokens == 320  # request 3 adopts the 5 pages of 64 of the prefix it shares with request 1
    assert r.stats.steps_by_placement["host"] == r.stats.steps
    assert r.recall_vs_exact > 0.9 and r.equal_to_fp8_oracle >= 0.9  # 640 > index_topk 256: selection drops keys
    assert 0 < r.attention_mass_kept <= 1.0
    assert r.cache_bytes["host_indexer"] > 0 and r.cache_bytes["latent"] > 0
    for needle in ("tokens/s", "cache memory", "stage times", "recall of the exact indexer", "[####"):
        assert needle in text


def test_demo_prompts_share_a_prefix():
    prompts = make_prompts(DSAConfig.small(), 4, 512, seed=0)
    assert prompts[1][:256] == prompts[3][:256] and prompts[0][:256] != prompts[1][:256]
    assert all(len(p) >= 448 for p in prompts)


def test_oracle_demo_drops_tokens_and_keeps_the_attention_mass():
    r = run_oracle_demo(DSAConfig.deepseek_v32(), seq_len=2600, query_tokens=2, echo=False)
    assert r.topk == 2048 and r.seq_len == 2600  # 2600 > 2048: selection really drops keys
    assert r.fp8_recall > 0.95
    assert 0.9 < r.attention_mass_kept <= 1.0
    assert r.max_rel_err_sparse_vs_dense < 0.2


def test_oracle_short_sequence_selects_everything_and_equals_dense():
    r = run_oracle_demo(DSAConfig.tiny(), seq_len=12, query_tokens=3, echo=False)  # 12 ≤ index_topk 16
    assert r.fp8_recall == 1.0
    assert r.attention_mass_kept == pytest.approx(1.0, abs=1e-12)
    assert r.max_rel_err_sparse_vs_dense < 1e-12


def test_cli_oracle_and_info_print_their_reports(capsys):
    assert cli.main(["oracle", "--seq-len", "300", "--tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "top-k recall" in out and "attention mass" in out and "sparse MLA" in out
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "SIMD path" in out and "JAX" in out


def test_bench_quick_prints_every_perf_row_and_the_plot(tmp_path, monkeypatch):
    """Every row and the plot of `bench --quick`. A smoke test of the code paths, not of the figures: each
    timing runs once after its warm-up call (`--quick` times 3), and the overlap row decodes 2 requests at
    256 tokens (`--quick`: 4 at 1024), which keeps its two engines (1 and 2 micro-batches) and their steps."""
    from dsa_hybrid import _timing
    from dsa_hybrid.cli import bench
    from dsa_hybrid.cli.bench import run_bench

    monkeypatch.setattr(bench, "best_time", lambda fn, repeats=3, **clock: _timing.best_time(fn, 1, **clock))
    monkeypatch.setattr(bench, "cpu_best_time", lambda fn, repeats=3, f=bench.cpu_best_time: f(fn, 1))
    monkeypatch.setattr(
        bench, "bench_overlap", lambda t, context, requests=4, f=bench.bench_overlap: f(t, 256, requests=2)
    )
    out = io.StringIO()
    png = tmp_path / "bench.png"
    run_bench(quick=True, plot_path=str(png), out=out)
    text = out.getvalue()
    for title in ("host top-k", "host indexer score", "MLA decode token", "one DSA layer decode step", "end to end"):
        assert f"## {title}" in text
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_round_robin_steps_every_unfinished_run_once_per_round():
    """The end-to-end rows time their sides in turn (a drift in the machine's speed hits them alike)."""
    from dsa_hybrid.cli.bench import _round_robin

    log: list[str] = []

    class Run:
        def __init__(self, name: str, steps: int) -> None:
            self.name, self.left = name, steps

        @property
        def done(self) -> bool:
            return self.left == 0

        def step(self) -> None:
            assert not self.done
            self.left -= 1
            log.append(self.name)

    _round_robin([Run("a", 3), Run("b", 1), Run("c", 2), Run("d", 0)])
    assert "".join(log) == "abcaca"


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        cli.main(["oracle", "--tokens", "0"])
    with pytest.raises(SystemExit):
        cli.main(["oracle", "--seq-len", "4", "--tokens", "5"])
    with pytest.raises(SystemExit):
        cli.main(["demo", "--requests", "0"])
    with pytest.raises(SystemExit):
        cli.main(["demo", "--placement", "gpu"])


def test_demo_serves_a_hugging_face_checkpoint():
    """`--checkpoint`: the tiny all-dense DeepseekV32ForCausalLM of the parity tests (index_topk 16)."""
    from pathlib import Path

    ckpt = Path(__file__).parents[1] / "golden" / "deepseek_v32_lm"
    out = io.StringIO()
    r = run_demo(checkpoint=str(ckpt), requests=2, prompt_len=48, new_tokens=2, placement="device", out=out)
    assert [len(o) for o in r.outputs] == [2, 2]
    assert f"checkpoint {ckpt}" in out.getvalue() and "random weights" not in out.getvalue()
    assert r.recall_vs_exact > 0.8

"""The main job (`dsa-hybrid demo`) and `dsa-hybrid info`."""

import pytest

from dsa_hybrid import DSAConfig, cli
from dsa_hybrid.demo import run_demo


def test_demo_drops_tokens_and_keeps_the_attention_mass():
    r = run_demo(DSAConfig.deepseek_v32(), seq_len=2600, query_tokens=2, echo=False)
    assert r.topk == 2048 and r.seq_len == 2600  # 2600 > 2048: selection really drops keys
    assert r.fp8_recall > 0.95
    assert 0.9 < r.attention_mass_kept <= 1.0
    assert r.max_rel_err_sparse_vs_dense < 0.2


def test_short_sequence_selects_everything_and_equals_dense():
    r = run_demo(DSAConfig.tiny(), seq_len=12, query_tokens=3, echo=False)  # 12 ≤ index_topk 16
    assert r.fp8_recall == 1.0
    assert r.attention_mass_kept == pytest.approx(1.0, abs=1e-12)
    assert r.max_rel_err_sparse_vs_dense < 1e-12


def test_cli_demo_and_info_print_their_reports(capsys):
    assert cli.main(["demo", "--seq-len", "300", "--tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "top-k recall" in out and "attention mass" in out and "sparse MLA" in out
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "SIMD path" in out and "JAX" in out


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        cli.main(["demo", "--tokens", "0"])
    with pytest.raises(SystemExit):
        cli.main(["demo", "--seq-len", "4", "--tokens", "5"])

"""The command line's errors: absurd or malformed flags are usage errors (one line on stderr, exit status
2) refused before anything runs; an error while a command runs is one line and exit status 1, without a
traceback unless `--debug` / `DSA_HYBRID_DEBUG=1`; Ctrl-C exits with 130 quietly. Every case runs
in-process (`cli.main`), and two through a real `python -m dsa_hybrid` to check what a shell sees."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsa_hybrid import cli
from dsa_hybrid.cli import demo as demo_mod
from dsa_hybrid.cli import oracle_demo as oracle_mod

GOLDEN = str(Path(__file__).parents[1] / "golden" / "deepseek_v32_lm")  # a real checkpoint directory
# (argv, fragment of the one-line message)
USAGE_ERRORS: list[tuple[list[str], str]] = [
    ([], "required: command"),
    (["frobnicate"], "invalid choice"),
    (["demo", "--requests", "0"], "--requests: must lie in [1, 1024], got 0"),
    (["demo", "--requests", "-3"], "--requests"),
    (["demo", "--requests", "1e9"], "expected an integer"),
    (["demo", "--requests", "100000"], "--requests: must lie in"),
    (["demo", "--prompt-len", "0"], "--prompt-len"),
    (["demo", "--prompt-len", "99999999999"], "--prompt-len: must lie in"),
    (["demo", "--new-tokens", "0"], "--new-tokens"),
    (["demo", "--new-tokens", "abc"], "expected an integer, got 'abc'"),
    (["demo", "--seed", "-1"], "--seed"),
    (["demo", "--seed", "1.5"], "--seed"),
    (["demo", "--placement", "gpu"], "--placement: invalid choice: 'gpu'"),
    (["demo", "--model", "llama"], "--model: invalid choice"),
    (["demo", "--checkpoint", "/no/such/dir"], "no such directory: '/no/such/dir'"),
    (["demo", "--requests", "1024", "--prompt-len", "1048576"], "must stay <= 4194304 tokens"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    (["oracle", "--tokens", "0"], "--tokens"),
    (["oracle", "--seq-len", "4", "--tokens", "5"], "--tokens cannot exceed --seq-len"),
    (["oracle", "--seq-len", "100000000"], "--seq-len: must lie in"),
    (["oracle", "--model", "gpt"], "--model: invalid choice"),
    (["bench", "--plot", "/no/such/dir/x.png"], "no such directory"),
    (["info", "--extra"], "unrecognized arguments"),
    (["generate", "--checkpoint", "/no/such/dir", "--prompt", "hi"], "no such directory"),
    (["generate", "--checkpoint", GOLDEN, "--prompt", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "--checkpoint", GOLDEN, "--prompt", "hi", "--top-p", "0"], "--top-p: must lie in (0.0, 1.0]"),
    (["generate", "--checkpoint", GOLDEN, "--prompt", "hi", "--top-p", "nan"], "--top-p"),
    (["generate", "--checkpoint", GOLDEN, "--prompt", "hi", "--seed", "-2"], "--seed"),
]


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


@pytest.mark.parametrize(("argv", "match"), USAGE_ERRORS, ids=[" ".join(a) or "(none)" for a, _ in USAGE_ERRORS])
def test_a_usage_error_is_one_line_and_exit_status_2(
    argv: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert line.startswith("dsa-hybrid") and "error:" in line and match in line, line
    assert captured.out == ""


def test_a_checkpoint_dir_without_config_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--checkpoint", str(tmp_path)])
    assert info.value.code == 2 and "holds no config.json" in one_line(capsys.readouterr().err)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        cli.main(["demo", "--checkpoint", str(tmp_path / "file")])
    assert "no such directory" in one_line(capsys.readouterr().err)


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["demo", "--help"], ["--version"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 0
    assert "dsa_hybrid" in capsys.readouterr().out


def _raiser(exc: BaseException):  # noqa: ANN202
    def f(*args: object, **kw: object) -> object:
        raise exc

    return f


@pytest.mark.parametrize("debug", ["none", "flag-before", "flag-after", "env"])
def test_an_error_while_running_is_one_line_and_exit_status_1(
    debug: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(oracle_mod, "run_oracle_demo", _raiser(ValueError("seq_len: too\nlong")))
    monkeypatch.delenv("DSA_HYBRID_DEBUG", raising=False)
    argv = ["oracle", "--seq-len", "8", "--tokens", "2"]
    if debug == "flag-before":
        argv = ["--debug", *argv]
    elif debug == "flag-after":
        argv = [*argv, "--debug"]
    elif debug == "env":
        monkeypatch.setenv("DSA_HYBRID_DEBUG", "1")
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    if debug == "none":
        assert one_line(err) == "dsa-hybrid: error: ValueError: seq_len: too long (--debug shows the traceback)"
    else:
        assert "Traceback" in err and err.strip().splitlines()[-1] == "dsa-hybrid: error: ValueError: seq_len: too long"


def test_ctrl_c_exits_130_quietly(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(demo_mod, "run_demo", _raiser(KeyboardInterrupt()))
    monkeypatch.delenv("DSA_HYBRID_DEBUG", raising=False)
    argv = ["demo", "--random-weights", "--requests", "1", "--prompt-len", "8", "--new-tokens", "1"]
    assert cli.main(argv) == 130
    assert one_line(capsys.readouterr().err) == "dsa-hybrid: interrupted"


def test_every_command_goes_through_the_error_handling(capsys: pytest.CaptureFixture[str]) -> None:
    """A subcommand added later needs nothing of its own: `run_command` is what `main` calls for all."""
    ns = argparse.Namespace(command="new", func=_raiser(OSError(28, "No space left on device")), debug=False)
    assert cli.run_command(ns) == 1
    assert "OSError: [Errno 28] No space left on device" in one_line(capsys.readouterr().err)
    assert cli.run_command(argparse.Namespace(command="new", func=lambda a: 3, debug=False)) == 3


def test_a_real_shell_sees_one_line_and_the_status() -> None:
    """Through `python -m dsa_hybrid`: a usage error (2) and a runtime error (1: the cache directory is a file)."""
    env = {**os.environ, "DSA_HYBRID_DEBUG": "0"}
    p = subprocess.run([sys.executable, "-m", "dsa_hybrid", "demo", "--requests", "0"],
                       capture_output=True, text=True, env=env, timeout=120, check=False)  # fmt: skip
    assert p.returncode == 2 and one_line(p.stderr).startswith("dsa-hybrid demo: error: argument --requests")
    code = "import sys; from dsa_hybrid import cli; sys.exit(cli.run_command(__import__('argparse').Namespace(command='x', debug=False, func=lambda a: 1 / 0)))"  # noqa: E501
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert p.returncode == 1 and one_line(p.stderr).startswith("dsa-hybrid: error: ZeroDivisionError")

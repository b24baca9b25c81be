"""`dsa-hybrid train`: the subcommand is registered and refuses bad arguments by name (usage errors: one
line on stderr, exit status 2; the full table is tests/train/test_train_bad_input.py)."""

from __future__ import annotations

import pytest

from dsa_hybrid import cli


def test_train_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, fragment in (
        (["train", "--dense-steps", "-1", "--no-eval"], "--dense-steps"),
        (["train", "--eval-lengths", "a,b"], "--eval-lengths"),
        (["train", "--recipe", "nope"], "--recipe"),
    ):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
        assert fragment in capsys.readouterr().err

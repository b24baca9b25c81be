"""`dsa-hybrid train`: the subcommand is registered and refuses bad arguments by name."""

from __future__ import annotations

import pytest

from dsa_hybrid import cli


def test_train_refuses_bad_arguments() -> None:
    with pytest.raises(SystemExit, match="--dense-steps"):
        cli.main(["train", "--dense-steps", "-1", "--no-eval"])
    with pytest.raises(SystemExit, match="--eval-lengths"):
        cli.main(["train", "--eval-lengths", "a,b"])
    with pytest.raises(SystemExit):
        cli.main(["train", "--recipe", "nope"])

"""The TPU kit's script runs end to end (in TPU interpret mode on CPU, tiny shapes)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_validate_script_smoke() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "tpu" / "validate.py"), "--interpret"],
        capture_output=True,
        text=True,
        timeout=600,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout
    assert r.stdout.count(" ok ") == 4  # sparse MLA on bf16 and fp8 caches, the indexer at T = 1 and 8

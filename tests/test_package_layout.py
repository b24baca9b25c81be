"""The package's shape (docs/architecture.md): subpackages where the page says they are, no module reaching
into another's private names, old 0.1 module paths still importable, `python -m dsa_hybrid`, and every
"dsa.md §N" the code cites pointing at a section of docs/dsa.md that ships."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import dsa_hybrid
from dsa_hybrid import _aliases

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "python" / "dsa_hybrid"


def _modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    """Whether `name` (dotted, under dsa_hybrid) is a module or package of the source tree (or `_core`)."""
    rel = Path(*name.split(".")[1:])
    return name == "dsa_hybrid._core" or (PKG / rel).with_suffix(".py").exists() or (PKG / rel).is_dir()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_name_uses(path: Path) -> list[str]:
    """`from dsa_hybrid.x import _name` and `module._name` where `_name` is not itself a module: a private
    name of another module used from this one."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module_name(path)
    found, module_aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dsa_hybrid":
            for a in node.names:
                target = f"{node.module}.{a.name}"
                if _is_module(target):
                    module_aliases.add(a.asname or a.name)
                elif _private(a.name) and node.module != here:
                    found.append(f"{path.name}:{node.lineno}: from {node.module} import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append(f"{path.name}:{node.lineno}: relative import (use absolute dsa_hybrid.* imports)")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("dsa_hybrid.") and a.asname:
                    module_aliases.add(a.asname)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in module_aliases
            and _private(node.attr)
            and not _is_module(f"dsa_hybrid.{node.attr}")
        ):
            found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    offenders = [hit for p in _modules() for hit in private_name_uses(p)]
    assert offenders == []


def test_the_private_name_check_catches_what_it_should(tmp_path: Path) -> None:
    bad = PKG / "serving" / "_layout_probe.py"  # inside the package so that module names resolve
    bad.write_text(
        "from dsa_hybrid.layers.dsa_attention import _check_rows_of_call\n"
        "from dsa_hybrid.layers import dsa_attention as L\n"
        "from dsa_hybrid import _core\n"
        "x = L._check_rows_of_call\n"
        "y = L.project_jit\n"
        "from . import engine\n"
    )
    try:
        hits = private_name_uses(bad)
    finally:
        bad.unlink()
    assert len(hits) == 3, hits
    assert "import _check_rows_of_call" in hits[0] and "relative import" in hits[1] and "L._check" in hits[2]


# Where docs/architecture.md says each part lives.
LAYOUT = {
    "host": ["cache.py", "selection.py"],
    "ops": ["latent_cache.py", "sparse_mla.py", "indexer.py"],
    "ops/tpu": ["sparse_mla.py", "indexer.py"],
    "layers": ["dsa_attention.py"],
    "models": ["config.py", "checkpoint.py", "causal_lm.py"],
    "serving": ["engine.py", "kv_manager.py", "placement.py", "sampling.py"],
    "cli": ["__init__.py", "demo.py", "oracle_demo.py", "bench.py"],
}


def test_the_layout_is_where_the_architecture_page_says() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    for sub, files in LAYOUT.items():
        assert f"{sub.split('/')[-1]}/" in page
        for f in files:
            assert (PKG / sub / f).is_file(), f"{sub}/{f}"
    top = {p.name for p in PKG.glob("*.py")}
    assert top == {"__init__.py", "__main__.py", "_aliases.py", "_timing.py", "reference.py", "testing.py"}


def test_tests_mirror_the_package() -> None:
    for sub in ["reference", "host", "ops", "ops/tpu", "layers", "models", "serving", "cli"]:
        assert list((ROOT / "tests" / sub).glob("test_*.py")), sub
    for p in (ROOT / "tests" / "ops").rglob("test_*.py"):  # device code: the name says which implementation
        assert re.match(r"test_(xla|pallas)_", p.name), p.name
    for p in (ROOT / "tests" / "reference").glob("test_*.py"):
        assert p.name.startswith("test_oracle_"), p.name


@pytest.mark.parametrize("old", sorted(_aliases.MOVED))
def test_old_module_paths_still_import(old: str) -> None:
    if "tpu" in old or old.endswith(("layer", "model", "engine", "placement", "demo", "bench", "checkpoint")):
        pytest.importorskip("jax")
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        mod = importlib.import_module(old)
    assert mod is importlib.import_module(_aliases.MOVED[old])
    assert any(issubclass(x.category, DeprecationWarning) and _aliases.MOVED[old] in str(x.message) for x in w)


def test_public_names_resolve() -> None:
    for name in dsa_hybrid.__all__:
        assert getattr(dsa_hybrid, name) is not None, name


def test_python_dash_m_runs_the_cli() -> None:
    r = subprocess.run([sys.executable, "-m", "dsa_hybrid", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"dsa_hybrid {dsa_hybrid.__version__}"


def test_version_is_single_sourced() -> None:
    cargo = (ROOT / "rust" / "Cargo.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', cargo, re.M).group(1) == dsa_hybrid.__version__
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {dsa_hybrid.__version__}" in changelog


def test_every_cited_section_of_the_spec_ships() -> None:
    sections = set(re.findall(r"^## §(\w+)\.", (ROOT / "docs" / "dsa.md").read_text(), re.M))
    cited = set()
    for path in [*PKG.rglob("*.py"), *PKG.rglob("*.pyi"), *(ROOT / "rust" / "src").rglob("*.rs")]:
        cited |= set(re.findall(r"dsa\.md §(\d+[a-z]?)", path.read_text()))
    assert cited, "the code cites no section: the pattern is wrong"
    assert cited <= sections, cited - sections
    text = "\n".join(p.read_text() for p in [*PKG.rglob("*.py"), *(ROOT / "rust" / "src").rglob("*.rs")])
    assert "spec §" not in text and "PERF.md" not in text

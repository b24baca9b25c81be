"""Every public entry point has bad-input cases (issue 16): a new public function, class or method
without a case in some catalogue fails here.

The public entry points: every name in the `__all__` of `dsa_hybrid` and of each of its modules that
declares one (found by reading the sources, so a new module's `__all__` counts at once), the sharded
model's functions of `parallel.forward` (the module has no `__all__`), and the public methods of every
exported class. The catalogues: `tests/**/*bad_input*.py`, `*_errors.py`, `*_fuzz.py`. A function is
covered when some catalogue calls it (`name(`); a class when some catalogue names it, and each of its
methods when a catalogue that names the class calls it (`.method(`).

Not needing cases (`EXEMPT`, reasons below and automatically): exception classes (raised, not called),
callables that take no argument (nothing to validate), pure result records, the hypothesis kit. The
known gaps (`PENDING`) are entry points whose bad input is not yet refused by name: each names what is
wrong; the test also fails when a pending entry gets covered, so the list only shrinks."""

# ruff: noqa: E501 - one entry point per line

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "python" / "dsa_hybrid"
CATALOGUES = sorted(
    {*ROOT.glob("tests/**/*bad_input*.py"), *ROOT.glob("tests/**/*_errors.py"), *ROOT.glob("tests/**/*_fuzz.py")}
)
# Public entry points of modules without an `__all__`, by name.
EXTRA = {
    "dsa_hybrid.parallel.forward": (
        "forward_sharded",
        "generate_greedy_sharded",
        "place_rows",
        "shard_params",
        "create_sharded_caches",
    ),
}

# Entry points that need no bad-input case, and why.
EXEMPT: dict[str, str] = {
    "dsa_hybrid.ops.target_device": "takes any pytrees by design: only concrete jax.Array leaves are read, anything else is ignored",
    "dsa_hybrid.ops.target_device_kind": "as target_device",
    "dsa_hybrid.ops.target_is_tpu": "as target_device",
    "dsa_hybrid.ops.tpu_chip": "as target_device",
    "dsa_hybrid.testing": "the hypothesis kit: strategies and assertions for test code (tests/test_testing_kit.py)",
    "dsa_hybrid.train.LayerAux": "a result record of forward_train (three arrays, no behaviour)",
    "dsa_hybrid.parallel.plan.Chip": "a constant record of CHIPS (public TPU figures)",
    "dsa_hybrid.parallel.plan.Plan": "the result record of plan()",
    "dsa_hybrid.parallel.plan.StepPlan": "a result record inside Plan",
    "dsa_hybrid.serving.engine.EngineStats": "Engine.stats: counters the engine writes",
    "dsa_hybrid.serving.engine.RequestOutput": "a result record the engine hands out",
    "dsa_hybrid.serving.engine.Request": "the engine's own record of a request (made by Engine.add_request, which is catalogued)",
    "dsa_hybrid.serving.engine.FinishedRequests": "the engine's bounded record of finished requests (filled by the engine)",
}

# Known gaps: entry points whose bad input does not yet raise an exception naming the argument (what
# happens now, and the file that needs the check). Remove an entry when its case is added.
PENDING: dict[str, str] = {}


def exempt(qual: str) -> bool:
    """Named in EXEMPT, or a method of an exempt class."""
    return any(qual == e or qual.startswith(e + ".") for e in EXEMPT)


def modules_with_all() -> list[str]:
    """Every module of the package whose source assigns `__all__` (read with ast: nothing imported)."""
    out = []
    for f in sorted(PKG.rglob("*.py")):
        for node in ast.parse(f.read_text(encoding="utf-8")).body:
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                parts = f.relative_to(PKG.parent).with_suffix("").parts
                out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def takes_arguments(f: Any, method: bool) -> bool:
    try:
        params = list(inspect.signature(f).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature (a Rust method): assume it does
        return True
    return len(params) > (1 if method and params and params[0].name in ("self", "cls") else 0)


def entry_points() -> dict[str, tuple[str, Any, Any]]:
    """`{qualified name: (kind, object, owning class or None)}`; kind "function", "class" or "method"."""
    out: dict[str, tuple[str, Any, Any]] = {}
    seen: set[int] = set()
    names = [(m, n) for m in modules_with_all() for n in importlib.import_module(m).__all__]
    names += [(m, n) for m, ns in EXTRA.items() for n in ns]
    for mod_name, name in names:
        qual = f"{mod_name}.{name}"
        if mod_name == "dsa_hybrid.testing":  # EXEMPT
            continue
        obj = getattr(importlib.import_module(mod_name), name)
        if inspect.ismodule(obj) or not callable(obj) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if inspect.isclass(obj):
            if issubclass(obj, BaseException):
                continue
            out[qual] = ("class", obj, None)
            for meth, v in vars(obj).items():
                if meth.startswith("_") or isinstance(v, property):
                    continue
                f = v.__func__ if isinstance(v, (staticmethod, classmethod)) else v
                if callable(f) and takes_arguments(f, not isinstance(v, staticmethod)):
                    out[f"{qual}.{meth}"] = ("method", f, obj)
        elif takes_arguments(obj, False):
            out[qual] = ("function", obj, None)
    return out


def uncovered() -> set[str]:
    sources = [c.read_text(encoding="utf-8") for c in CATALOGUES]
    missing = set()
    for qual, (kind, _obj, owner) in entry_points().items():
        name = qual.rsplit(".", 1)[1]
        if kind == "function":
            ok = any(re.search(rf"\b{re.escape(name)}\(", s) for s in sources)
        elif kind == "class":
            ok = any(re.search(rf"\b{re.escape(name)}\b", s) for s in sources)
        else:
            files = [s for s in sources if re.search(rf"\b{re.escape(owner.__name__)}\b", s)]
            ok = any(re.search(rf"\.{re.escape(name)}\(", s) for s in files)
        if not ok:
            missing.add(qual)
    return missing


@pytest.fixture(scope="module")
def missing() -> set[str]:
    return uncovered()


def test_the_catalogues_are_found() -> None:
    names = {c.name for c in CATALOGUES}
    assert {"test_host_bad_input.py", "test_train_bad_input.py", "test_parallel_bad_input.py",
            "test_text_bad_input.py", "test_cli_errors.py", "test_engine_fuzz.py"} <= names  # fmt: skip
    assert len(entry_points()) > 150  # the enumeration sees the whole API


def test_every_public_entry_point_has_bad_input_cases(missing: set[str]) -> None:
    unexplained = sorted(n for n in missing - set(PENDING) if not exempt(n))
    assert not unexplained, (
        "public entry points without a bad-input case in any catalogue (add cases, or an EXEMPT entry with "
        f"its reason): {unexplained}"
    )


def test_the_exemption_lists_are_current(missing: set[str]) -> None:
    eps = set(entry_points()) | set(EXEMPT)
    stale = sorted(n for n in (*EXEMPT, *PENDING) if n not in eps and not n.startswith("dsa_hybrid.testing"))
    assert not stale, f"EXEMPT / PENDING name entry points that no longer exist: {stale}"
    done = sorted(n for n in PENDING if n not in missing)
    assert not done, f"these PENDING entry points are catalogued now: remove them from PENDING: {done}"

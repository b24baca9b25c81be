import atexit
import gc
import os
import shutil
import sys
import tempfile

# Pin JAX to the CPU in tests (TPU interpret mode and the XLA path run there).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Never write to the real per-user cache (JAX's compilation cache, stored cost models) from tests; the
# tests of that cache point DSA_HYBRID_CACHE_DIR at their own tmp directories.
os.environ.setdefault("DSA_HYBRID_CACHE_DIR", "off")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


_CACHE_PREFIX = "dsa_hybrid_test_jax_cache_"


def _remove_stale_caches() -> None:
    """Remove the caches of test processes that died without running their exit hooks (killed): those
    whose process id (in the name) no longer runs. A live process's cache is never touched."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        if not name.startswith(_CACHE_PREFIX):
            continue
        pid = name[len(_CACHE_PREFIX) :].split("_", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        except OSError:  # it runs (under another user): leave it
            pass


def _session_compilation_cache() -> str | None:
    """JAX's persistent compilation cache for this test process only: a fresh temporary directory (one per
    pytest-xdist worker: JAX writes its entries non-atomically, so no two processes share one), removed at
    exit, every program stored. Programs compiled again in the same process (after
    `_release_compiled_programs` dropped them at the end of a module, or by a new `jit` of the same
    computation) then load from disk instead of compiling. Set through `jax.config`, not the
    environment, so child interpreters (the mesh workers, the tests of the package's own cache) start
    without it. `DSA_HYBRID_TEST_JAX_CACHE=off`
    turns it off; a directory the developer configured already (`JAX_COMPILATION_CACHE_DIR`) is kept."""
    if os.environ.get("DSA_HYBRID_TEST_JAX_CACHE", "").strip().lower() in {"off", "0", "no", "false"}:
        return None
    if jax.config.jax_compilation_cache_dir:  # type: ignore[attr-defined]
        return None
    _remove_stale_caches()
    path = tempfile.mkdtemp(prefix=f"{_CACHE_PREFIX}{os.getpid()}_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: every size
    from jax.experimental.compilation_cache import compilation_cache as cc

    cc.reset_cache()  # JAX decides at the first compilation whether the cache is in use
    return path


SESSION_JAX_CACHE = _session_compilation_cache()


# The files that took longest (summed test durations of a 2-worker run, slowest first): with pytest-xdist's
# `--dist loadfile --no-loadscope-reorder` (pyproject.toml) files are handed to the workers in collection
# order, so these go first and the short files fill in around them (longest first: the run ends when the
# last worker does). A file missing here runs after them, in the usual order.
SLOW_FIRST = (
    "tests/serving/test_engine.py",
    "tests/parallel/test_engine_mesh.py",
    "tests/parallel/test_sharded_xla.py",
    "tests/cli/test_cli.py",
    "tests/tpu/test_aot_compile.py",
    "tests/layers/test_dsa_attention.py",
    "tests/ops/test_xla_indexer.py",
    "tests/ops/tpu/test_pallas_sparse_mla.py",
    "tests/ops/tpu/test_pallas_indexer.py",
    "tests/ops/tpu/test_pallas_topk.py",
    "tests/models/test_moe.py",
    "tests/serving/test_engine_fuzz.py",
    "tests/models/test_resident_weights.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The files of `SLOW_FIRST` first, in its order; within a file, and among the rest, the collection's
    order (a stable sort, the same on every worker, as xdist requires)."""
    rank = {path: i for i, path in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    """Without pytest-xdist (`-p no:xdist`, or not installed) accept and ignore the parallel options that
    pyproject.toml's addopts passes, so the suite still runs, in one process."""
    if pluginmanager.has_plugin("xdist"):
        return
    group = parser.getgroup("xdist-absent", "pytest-xdist absent: its options are accepted and ignored")
    # `_addoption`: pytest keeps lowercase short options to itself and its plugins (xdist declares `-n` so)
    group._addoption("-n", "--numprocesses", dest="numprocesses", default=None, help="ignored without xdist")
    group.addoption("--maxprocesses", dest="maxprocesses", default=None, help="ignored without xdist")
    group.addoption("--dist", dest="dist", default="no", help="ignored without xdist")
    group.addoption("--no-loadscope-reorder", dest="loadscopereorder", action="store_false", help="ignored")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. XLA on CPU maps the JIT code of every
    executable it keeps; over the whole suite (thousands of programs) one process otherwise reaches the
    kernel's limit on memory mappings (vm.max_map_count, 65530 by default) and the next compilation
    aborts inside LLVM. (A program compiled again later loads from the session's compilation cache.)"""
    yield
    jax = sys.modules.get("jax")
    if jax is not None:
        jax.clear_caches()
        gc.collect()

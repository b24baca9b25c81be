import gc
import os
import sys

# Pin JAX to the CPU in tests (TPU interpret mode and the XLA path run there).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Never write to the real per-user cache (JAX's compilation cache, stored cost models) from tests; the
# tests of that cache point DSA_HYBRID_CACHE_DIR at their own tmp directories.
os.environ.setdefault("DSA_HYBRID_CACHE_DIR", "off")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. XLA on CPU maps the JIT code of every
    executable it keeps; over the whole suite (thousands of programs) one process otherwise reaches the
    kernel's limit on memory mappings (vm.max_map_count, 65530 by default) and the next compilation
    aborts inside LLVM."""
    yield
    jax = sys.modules.get("jax")
    if jax is not None:
        jax.clear_caches()
        gc.collect()

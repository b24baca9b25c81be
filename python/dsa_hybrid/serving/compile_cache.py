"""The per-user cache directory: JAX's persistent compilation cache and the stored placement cost models.

Where (`cache_dir`): `$DSA_HYBRID_CACHE_DIR` if set (`off`, `0`, `none`, `false` or empty: no cache at
all), else `$XDG_CACHE_HOME/dsa_hybrid`, else `~/.cache/dsa_hybrid`. JAX's compiled programs go to its
`jax/` folder, the start-up cost models (`placement.PlacementCosts`) to `placement/`.

`enable_compilation_cache` is called by the `Engine` and the `dsa-hybrid` command line, never at
`import dsa_hybrid`. It leaves a compilation-cache directory the user configured in JAX
(`JAX_COMPILATION_CACHE_DIR`, `jax.config.update`) as it is, and then changes nothing else either.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

ENV_DIR = "DSA_HYBRID_CACHE_DIR"
_OFF = {"", "off", "0", "none", "false", "no"}


def cache_dir() -> Path | None:
    """The per-user cache directory (not created here), or None when `$DSA_HYBRID_CACHE_DIR` turns it off."""
    value = os.environ.get(ENV_DIR)
    if value is not None:
        value = value.strip()
        return None if value.lower() in _OFF else Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg and Path(xdg).expanduser().is_absolute() else Path.home() / ".cache"
    return base / "dsa_hybrid"


def enable_compilation_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache in `cache_dir() / "jax"`, with thresholds low enough that
    this package's small programs are stored too. Returns the directory JAX caches in (the user's own if
    one was configured already), or None when off or the directory cannot be created. Idempotent."""
    import jax

    configured = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]
    if configured:  # the user's (or an earlier call's) choice: leave it and its thresholds alone
        return Path(configured)
    root = cache_dir()
    if root is None:
        return None
    path = root / "jax"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        logger.warning("JAX compilation cache not enabled: cannot create %s (%s)", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: every size, not overridden
    # JAX decides once per process whether the cache is in use (at the first compilation): programs
    # compiled before this call (the model's weights, say) made it decide "no". No cache existed then,
    # so resetting loses nothing.
    from jax.experimental.compilation_cache import compilation_cache as cc

    cc.reset_cache()
    logger.info("JAX persistent compilation cache: %s", path)
    return path

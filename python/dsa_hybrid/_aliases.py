"""Old module paths of the flat 0.1 layout, kept importable for one release.

`import dsa_hybrid.layer` (say) still works: it warns once with a `DeprecationWarning` naming the new
path and returns that module itself, so the old and the new name are the same object.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

# old module (0.1) -> its home since 0.2
MOVED = {
    "dsa_hybrid.cache": "dsa_hybrid.host.cache",
    "dsa_hybrid.selection": "dsa_hybrid.host.selection",
    "dsa_hybrid.latent_cache": "dsa_hybrid.ops.latent_cache",
    "dsa_hybrid.sparse_attention": "dsa_hybrid.ops.sparse_mla",
    "dsa_hybrid.device_indexer": "dsa_hybrid.ops.indexer",
    "dsa_hybrid.sparse_attention_tpu": "dsa_hybrid.ops.tpu.sparse_mla",
    "dsa_hybrid.device_indexer_tpu": "dsa_hybrid.ops.tpu.indexer",
    "dsa_hybrid.layer": "dsa_hybrid.layers.dsa_attention",
    "dsa_hybrid.config": "dsa_hybrid.models.config",
    "dsa_hybrid.checkpoint": "dsa_hybrid.models.checkpoint",
    "dsa_hybrid.model": "dsa_hybrid.models.causal_lm",
    "dsa_hybrid.engine": "dsa_hybrid.serving.engine",
    "dsa_hybrid.paging": "dsa_hybrid.serving.kv_manager",
    "dsa_hybrid.placement": "dsa_hybrid.serving.placement",
    "dsa_hybrid.sampling": "dsa_hybrid.serving.sampling",
    "dsa_hybrid.demo": "dsa_hybrid.cli.demo",
    "dsa_hybrid.oracle_demo": "dsa_hybrid.cli.oracle_demo",
    "dsa_hybrid.bench": "dsa_hybrid.cli.bench",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.new}; the old path goes away in 0.3", DeprecationWarning, stacklevel=2
        )
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        pass  # the target module is already executed


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None):  # noqa: ANN201
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())

"""Smoke test of the aarch64 wheel under qemu-user (run by .ci/wheels with an arm64 CPython): the Rust core
dispatches to NEON, and `topk` / `IndexerKeyCache.select` agree with the oracle and with the scalar twin."""

import numpy as np
import dsa_hybrid as dh
from dsa_hybrid import reference as ref
f = dh.cpu_features()
print(f)
assert f["neon"] and f["simd_path"] == "neon", f
rng = np.random.default_rng(0)
s = rng.standard_normal((3, 5000)).astype(np.float32)
got = dh.topk(s, 64)
want = ref.select_topk(s.astype(np.float64), np.full(3, 4999), 64)
np.testing.assert_array_equal(got, want)
c = dh.IndexerKeyCache(num_blocks=64, block_size=64, head_dim=128)
c.add_sequence(0); c.append(0, rng.standard_normal((900, 128)).astype(np.float32))
q = rng.standard_normal((2, 8, 128)).astype(np.float32); w = rng.standard_normal((2, 8)).astype(np.float32)
for path in ["neon", "scalar"]:
    dh.set_simd_path(path)
    sel = c.select([0, 0], q, w, [899, 500], 128)
    if path == "neon": first = sel
np.testing.assert_array_equal(first, sel)
print("aarch64 wheel smoke test: topk and IndexerKeyCache.select agree with the oracle / the scalar twin")

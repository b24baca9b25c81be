"""Several JAX processes as one mesh: `jax.distributed` with the settings this package needs.

On a multi-host TPU slice `jax.distributed.initialize()` needs no arguments (the TPU runtime names the
coordinator and the process ids); on CPU hosts (and in the tests: several processes on one machine,
loopback) pass the coordinator address, the process count and this process's id, and the CPU
collectives run over gloo. After it, `jax.devices()` lists every process's devices, and
`parallel.mesh.make_mesh` builds one mesh over all of them; each process then feeds only its own
devices' shards (`parallel.forward.put`).
"""

from __future__ import annotations

import jax

from dsa_hybrid.ops.checks import check_int

__all__ = ["initialize"]


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int = 120,
) -> None:
    """Join the distributed runtime. Before the first JAX computation of the process. On CPU the
    cross-process collectives are set to gloo (`jax_cpu_collectives_implementation`). With no arguments
    the runtime finds the cluster itself (a TPU slice, SLURM, …). `initialization_timeout` seconds
    bound the wait for the other processes.

    Checked before anything changes: `TypeError` for a non-string `coordinator_address`, a bool / float /
    string count, id or timeout; `ValueError` for an address without `host:port`, `num_processes` < 1,
    a `process_id` < 0 or outside `[0, num_processes)`, `initialization_timeout` < 1."""
    if coordinator_address is not None:
        if not isinstance(coordinator_address, str):
            raise TypeError(f"coordinator_address: expected 'host:port', got {type(coordinator_address).__name__}")
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"coordinator_address: expected 'host:port', got {coordinator_address!r}")
    if num_processes is not None:
        num_processes = check_int("num_processes", num_processes, -(2**31))
        if num_processes < 1:
            raise ValueError(f"num_processes: expected >= 1, got {num_processes}")
    if process_id is not None:
        process_id = check_int("process_id", process_id, -(2**31))
        if process_id < 0:
            raise ValueError(f"process_id: expected >= 0, got {process_id}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id: expected 0..{num_processes - 1}, got {process_id}")
    initialization_timeout = check_int("initialization_timeout", initialization_timeout, 1)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout,
    )

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
    bound the wait for the other processes."""
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes: expected >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id: expected 0..{num_processes - 1}, got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout,
    )

"""The model on a JAX device mesh: data-parallel attention, tensor parallelism, expert parallelism
(`docs/parallel.md`). `mesh` builds the `("dp", "tp")` mesh, `rules` the `PartitionSpec` of every
parameter and cache array, `forward` the sharded forward and greedy generation, `distributed` the
several-process start-up, `plan` the ahead-of-time TPU memory plan."""

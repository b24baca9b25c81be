//! `BlockPool`: THE block allocator (free list + reference counts) as a Python class, the one the
//! serving engine and every paged cache share. A mutex inside makes it safe to call from several
//! Python threads; every call checks everything first and changes nothing on error.

use std::sync::{Mutex, MutexGuard};

use numpy::{IntoPyArray, PyArray1};
use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;

use super::args::{self, Int};
use super::errors::{cache_full_with, pool_err};
use super::guard;
use crate::pool::{self, BlockPool, PoolError};

/// A pool of `num_blocks` blocks (see `dsa_hybrid.host.BlockPool` for the documented API).
#[pyclass(name = "BlockPool", module = "dsa_hybrid._core", frozen)]
pub struct PyBlockPool {
    inner: Mutex<BlockPool>,
}

impl PyBlockPool {
    fn pool(&self) -> MutexGuard<'_, BlockPool> {
        // A panic cannot leave the pool half-changed (every call checks first), so a poisoned
        // lock still guards a consistent pool.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `raw` as block ids of `pool`, IndexError for the first out of range.
fn ids(pool: &BlockPool, raw: &[i64]) -> PyResult<Vec<u32>> {
    pool.check_ids(raw).map_err(|e| pool_err("blocks", e))
}

fn int32_array(py: Python<'_>, v: impl Iterator<Item = u32>) -> Bound<'_, PyArray1<i32>> {
    // Ids and counts are at most i32::MAX (`pool::MAX_BLOCKS`, `pool::MAX_REFCOUNT`).
    v.map(|b| b as i32).collect::<Vec<i32>>().into_pyarray(py)
}

#[pymethods]
impl PyBlockPool {
    #[new]
    fn new(num_blocks: &Bound<'_, PyAny>) -> PyResult<Self> {
        guard("BlockPool", || {
            let range = || {
                PyValueError::new_err(format!(
                    "num_blocks: must be in [1, {}], got {num_blocks}",
                    pool::MAX_BLOCKS
                ))
            };
            let n = match args::int("num_blocks", num_blocks)? {
                Int::Small(n) if n >= 1 => usize::try_from(n).map_err(|_| range())?,
                _ => return Err(range()),
            };
            let inner = BlockPool::new(n).map_err(|e| match e {
                PoolError::TooManyBlocks { .. } => range(),
                e => pool_err("num_blocks", e),
            })?;
            Ok(PyBlockPool {
                inner: Mutex::new(inner),
            })
        })
    }

    /// Blocks in the pool.
    #[getter]
    fn num_blocks(&self) -> PyResult<usize> {
        guard("BlockPool.num_blocks", || Ok(self.pool().num_blocks()))
    }

    /// Blocks no one holds.
    #[getter]
    fn num_free(&self) -> PyResult<usize> {
        guard("BlockPool.num_free", || Ok(self.pool().num_free()))
    }

    /// `n` free blocks, each now held once, lowest ids of a fresh pool first: int32 `[n]`.
    /// All or nothing: CacheFullError (with `wanted` and `free`) if fewer than `n` are free.
    fn allocate<'py>(
        &self,
        py: Python<'py>,
        n: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<i32>>> {
        guard("BlockPool.allocate", || {
            let n = match args::int("n", n)? {
                Int::Small(v) if v < 0 => {
                    return Err(PyValueError::new_err(format!("n: must be >= 0, got {v}")))
                }
                Int::Big { negative: true } => {
                    return Err(PyValueError::new_err(format!("n: must be >= 0, got {n}")))
                }
                Int::Small(v) => usize::try_from(v).unwrap_or(usize::MAX),
                Int::Big { negative: false } => {
                    // More than any pool has: refused as any allocation that does not fit.
                    let free = self.pool().num_free();
                    return Err(cache_full_with(
                        py,
                        format!("n: {n} blocks wanted, {free} free"),
                        n,
                        free,
                    ));
                }
            };
            let blocks = self.pool().alloc(n).map_err(|e| pool_err("n", e))?;
            Ok(int32_array(py, blocks.into_iter()))
        })
    }

    /// One more holder of each of `blocks` (all held already).
    fn retain(&self, blocks: &Bound<'_, PyAny>) -> PyResult<()> {
        guard("BlockPool.retain", || {
            // Converted before the lock: converting may run Python code (which might call back in).
            let raw = args::int_list("blocks", blocks)?;
            let mut pool = self.pool();
            let ids = ids(&pool, &raw)?;
            pool.retain(&ids).map_err(|e| pool_err("blocks", e))
        })
    }

    /// One holder fewer for each of `blocks`, taken in reverse order; blocks reaching zero
    /// return to the free list.
    fn release(&self, blocks: &Bound<'_, PyAny>) -> PyResult<()> {
        guard("BlockPool.release", || {
            // Converted before the lock: converting may run Python code (which might call back in).
            let raw = args::int_list("blocks", blocks)?;
            let mut pool = self.pool();
            let ids = ids(&pool, &raw)?;
            pool.release(&ids).map_err(|e| pool_err("blocks", e))
        })
    }

    /// Holders of `block` (0: free); IndexError out of range.
    fn refcount(&self, block: &Bound<'_, PyAny>) -> PyResult<u32> {
        guard("BlockPool.refcount", || {
            let b = args::int("block", block)?;
            let pool = self.pool();
            pool.refcount(b.saturating()).map_err(|_| {
                PyIndexError::new_err(format!(
                    "block: {block} is outside [0, {})",
                    pool.num_blocks()
                ))
            })
        })
    }

    /// Holders of every block, int32 `[num_blocks]`.
    fn refcounts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<i32>>> {
        guard("BlockPool.refcounts", || {
            let counts = self.pool().refcounts().to_vec();
            Ok(int32_array(py, counts.into_iter()))
        })
    }

    /// The free blocks in the order `allocate` hands them out, int32.
    fn free_blocks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<i32>>> {
        guard("BlockPool.free_blocks", || {
            let free: Vec<u32> = self.pool().free_blocks().collect();
            Ok(int32_array(py, free.into_iter()))
        })
    }

    fn __repr__(&self) -> PyResult<String> {
        guard("BlockPool.__repr__", || {
            let p = self.pool();
            Ok(format!(
                "BlockPool(num_blocks={}, num_free={})",
                p.num_blocks(),
                p.num_free()
            ))
        })
    }
}

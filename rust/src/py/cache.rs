//! `IndexerKeyCache`: the paged FP8 indexer-key cache as a Python class. The page bytes are one
//! numpy array, handed to Python as a read-only zero-copy view and written only by the cache.
//!
//! Locking: a read-write lock per cache guards the bookkeeping and the pages. Scoring and reads
//! (`select`, `scores`, their paged twins, `gather`, `slots`, `dequantize`) share it; writes
//! (`append*`, `write_slots`, `copy_block`, `fork`, ...) hold it alone. The GIL is released for
//! everything that touches the pages, and no code holding the lock ever waits for the GIL.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2,
    PyReadonlyArray3, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::cache_err;
use super::select::{self, RowsArg};
use super::{array2, contiguous};
use crate::indexer_cache::{CacheError, IndexerKeyCache};

/// The page buffer: a numpy array allocated once and never resized, written only under the
/// cache's write lock. Kept as a raw pointer so the work can run with the GIL released.
struct PageBuffer {
    ptr: *mut u8,
    len: usize,
}
// SAFETY: the pointer is only dereferenced while `PyIndexerKeyCache::core` is locked (shared for
// reads, exclusive for writes), and the array it points into is owned by the same object
// (`pages`), so it outlives every use.
unsafe impl Send for PageBuffer {}
unsafe impl Sync for PageBuffer {}

/// Paged FP8 indexer-key cache (see `dsa_hybrid.IndexerKeyCache` for the documented API).
#[pyclass(name = "IndexerKeyCache", module = "dsa_hybrid._core", frozen)]
pub struct PyIndexerKeyCache {
    core: RwLock<IndexerKeyCache>,
    pages: Py<PyArray2<u8>>,
    buffer: PageBuffer,
}

impl PyIndexerKeyCache {
    fn read(&self) -> RwLockReadGuard<'_, IndexerKeyCache> {
        // Every call checks before it changes anything, so a poisoned lock guards a consistent cache.
        self.core.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, IndexerKeyCache> {
        self.core.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f` on the bookkeeping and the page bytes (shared), with the GIL released.
    pub(super) fn with_pages<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&IndexerKeyCache, &[u8]) -> R + Send,
    ) -> R {
        py.detach(|| {
            let core = self.read();
            let pages: &[u8] = if self.buffer.len == 0 {
                &[]
            } else {
                // SAFETY: see `PageBuffer`; the read lock keeps writers out.
                unsafe { std::slice::from_raw_parts(self.buffer.ptr, self.buffer.len) }
            };
            f(&core, pages)
        })
    }

    /// Run `f` on the locked bookkeeping and the page bytes (exclusive), with the GIL released.
    fn with_pages_mut<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut IndexerKeyCache, &mut [u8]) -> R + Send,
    ) -> R {
        py.detach(|| {
            let mut core = self.write();
            let pages: &mut [u8] = if self.buffer.len == 0 {
                &mut []
            } else {
                // SAFETY: see `PageBuffer`; the write lock serialises every access.
                unsafe { std::slice::from_raw_parts_mut(self.buffer.ptr, self.buffer.len) }
            };
            f(&mut core, pages)
        })
    }

    /// The cache's key width.
    fn head_dim_now(&self) -> usize {
        self.read().head_dim()
    }
}

#[pymethods]
impl PyIndexerKeyCache {
    #[new]
    #[pyo3(signature = (num_blocks, block_size = 64, head_dim = 128))]
    fn new(
        py: Python<'_>,
        num_blocks: usize,
        block_size: usize,
        head_dim: usize,
    ) -> PyResult<Self> {
        let core = IndexerKeyCache::new(num_blocks, block_size, head_dim)
            .map_err(|e| cache_err("IndexerKeyCache", e))?;
        // numpy allocates (zeroed, C-contiguous): a buffer too large for memory is a MemoryError.
        let arr = py
            .import("numpy")?
            .call_method1("zeros", ((num_blocks, core.page_bytes()), "uint8"))?
            .cast_into::<PyArray2<u8>>()?;
        let buffer = PageBuffer {
            ptr: arr.data(),
            len: core.buffer_bytes(),
        };
        // The view handed to Python is read-only: only the cache writes pages.
        let kwargs = PyDict::new(py);
        kwargs.set_item("write", false)?;
        arr.call_method("setflags", (), Some(&kwargs))?;
        Ok(PyIndexerKeyCache {
            core: RwLock::new(core),
            pages: arr.unbind(),
            buffer,
        })
    }

    #[getter]
    fn num_blocks(&self) -> usize {
        self.read().num_blocks()
    }
    #[getter]
    fn block_size(&self) -> usize {
        self.read().block_size()
    }
    #[getter]
    fn head_dim(&self) -> usize {
        self.read().head_dim()
    }
    #[getter]
    fn page_bytes(&self) -> usize {
        self.read().page_bytes()
    }
    #[getter]
    fn num_free_blocks(&self) -> usize {
        self.read().num_free_blocks()
    }
    #[getter]
    fn bytes_used(&self) -> usize {
        self.read().bytes_used()
    }
    fn sequence_ids(&self) -> Vec<i64> {
        self.read().sequence_ids()
    }
    fn block_refcount(&self, block: i64) -> PyResult<u32> {
        self.read()
            .block_refcount(block)
            .map_err(|e| cache_err("block", e))
    }
    fn add_sequence(&self, seq_id: i64) -> PyResult<()> {
        self.write()
            .add_sequence(seq_id)
            .map_err(|e| cache_err("seq_id", e))
    }
    fn length(&self, seq_id: i64) -> PyResult<usize> {
        self.read()
            .length(seq_id)
            .map_err(|e| cache_err("seq_id", e))
    }
    fn block_table<'py>(
        &self,
        py: Python<'py>,
        seq_id: i64,
    ) -> PyResult<Bound<'py, PyArray1<i32>>> {
        let table: Vec<i32> = self
            .read()
            .block_table(seq_id)
            .map_err(|e| cache_err("seq_id", e))?
            .iter()
            .map(|b| *b as i32)
            .collect();
        Ok(table.into_pyarray(py))
    }
    fn can_append(&self, seq_id: i64, n: usize) -> PyResult<bool> {
        self.read()
            .can_append(seq_id, n)
            .map_err(|e| cache_err("seq_id", e))
    }
    fn fork(&self, parent: i64, child: i64) -> PyResult<()> {
        self.write().fork(parent, child).map_err(|e| match e {
            CacheError::UnknownSequence(_) => cache_err("parent", e),
            _ => cache_err("child", e),
        })
    }
    fn truncate(&self, seq_id: i64, n: usize) -> PyResult<()> {
        self.write().truncate(seq_id, n).map_err(|e| match e {
            CacheError::UnknownSequence(_) => cache_err("seq_id", e),
            _ => cache_err("n", e),
        })
    }
    fn free(&self, seq_id: i64) -> PyResult<()> {
        self.write()
            .free(seq_id)
            .map_err(|e| cache_err("seq_id", e))
    }

    fn append(&self, py: Python<'_>, seq_id: i64, keys: PyReadonlyArray2<'_, f32>) -> PyResult<()> {
        let d = self.head_dim_now();
        if keys.shape()[1] != d {
            return Err(PyValueError::new_err(format!(
                "keys: expected [n, {d}], got {:?}",
                keys.shape()
            )));
        }
        let keys = contiguous("keys", keys.as_slice())?;
        self.with_pages_mut(py, |c, pages| c.append(pages, seq_id, keys))
            .map_err(|e| match e {
                CacheError::UnknownSequence(_) => cache_err("seq_id", e),
                _ => cache_err("keys", e),
            })
    }

    fn append_quantized(
        &self,
        py: Python<'_>,
        seq_id: i64,
        fp8: PyReadonlyArray2<'_, u8>,
        scales: PyReadonlyArray1<'_, f32>,
    ) -> PyResult<()> {
        let d = self.head_dim_now();
        if fp8.shape()[1] != d || fp8.shape()[0] != scales.len() {
            return Err(PyValueError::new_err(format!(
                "fp8: expected [n, {d}] with scales [n], got {:?} and {:?}",
                fp8.shape(),
                scales.shape()
            )));
        }
        let codes = contiguous("fp8", fp8.as_slice())?;
        let s = contiguous("scales", scales.as_slice())?;
        self.with_pages_mut(py, |c, pages| c.append_quantized(pages, seq_id, codes, s))
            .map_err(|e| match e {
                CacheError::UnknownSequence(_) => cache_err("seq_id", e),
                CacheError::NonFiniteScale { .. } => cache_err("scales", e),
                _ => cache_err("fp8", e),
            })
    }

    /// Write pre-quantized keys at external slots (`block · block_size + offset`; −1 skips a row).
    fn write_slots(
        &self,
        py: Python<'_>,
        slots: PyReadonlyArray1<'_, i32>,
        fp8: PyReadonlyArray2<'_, u8>,
        scales: PyReadonlyArray1<'_, f32>,
    ) -> PyResult<()> {
        let d = self.head_dim_now();
        let n = slots.len();
        if fp8.shape() != [n, d] || scales.len() != n {
            return Err(PyValueError::new_err(format!(
                "fp8: expected [{n}, {d}] with scales [{n}] for {n} slots, got {:?} and {:?}",
                fp8.shape(),
                scales.shape()
            )));
        }
        let slots = contiguous("slots", slots.as_slice())?;
        let codes = contiguous("fp8", fp8.as_slice())?;
        let s = contiguous("scales", scales.as_slice())?;
        self.with_pages_mut(py, |c, pages| c.write_slots(pages, slots, codes, s))
            .map_err(|e| match e {
                CacheError::Slot { .. } => cache_err("slots", e),
                CacheError::NonFiniteScale { .. } => cache_err("scales", e),
                _ => cache_err("fp8", e),
            })
    }

    /// Copy page `src` over page `dst` (codes and scales).
    fn copy_block(&self, py: Python<'_>, src: i64, dst: i64) -> PyResult<()> {
        let (s, d) = {
            let c = self.read();
            (
                c.check_block(src).map_err(|e| cache_err("src", e))?,
                c.check_block(dst).map_err(|e| cache_err("dst", e))?,
            )
        };
        self.with_pages_mut(py, |c, pages| c.copy_block(pages, s, d))
            .map_err(|e| cache_err("copy_block", e))
    }

    #[allow(clippy::type_complexity)]
    fn gather<'py>(
        &self,
        py: Python<'py>,
        seq_id: i64,
        positions: PyReadonlyArray1<'_, i64>,
    ) -> PyResult<(Bound<'py, PyArray2<u8>>, Bound<'py, PyArray1<f32>>)> {
        let pos = contiguous("positions", positions.as_slice())?;
        let d = self.head_dim_now();
        let (codes, scales) = self
            .with_pages(py, |c, pages| {
                let mut codes = vec![0u8; pos.len() * d];
                let mut scales = vec![0f32; pos.len()];
                c.gather(pages, seq_id, pos, &mut codes, &mut scales)
                    .map(|_| (codes, scales))
            })
            .map_err(|e| match e {
                CacheError::UnknownSequence(_) => cache_err("seq_id", e),
                _ => cache_err("positions", e),
            })?;
        Ok((array2(py, pos.len(), d, codes)?, scales.into_pyarray(py)))
    }

    fn dequantize<'py>(&self, py: Python<'py>, seq_id: i64) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let d = self.head_dim_now();
        let v = self
            .with_pages(py, |c, pages| c.dequantize(pages, seq_id))
            .map_err(|e| cache_err("seq_id", e))?;
        array2(py, v.len() / d, d, v)
    }

    fn slots<'py>(
        &self,
        py: Python<'py>,
        seq_ids: PyReadonlyArray1<'_, i64>,
        positions: PyReadonlyArray2<'_, i64>,
    ) -> PyResult<Bound<'py, PyArray2<i32>>> {
        let (t, k) = (positions.shape()[0], positions.shape()[1]);
        if seq_ids.len() != t {
            return Err(PyValueError::new_err(format!(
                "seq_ids: {} ids for {t} rows of positions",
                seq_ids.len()
            )));
        }
        let ids = contiguous("seq_ids", seq_ids.as_slice())?;
        let pos = contiguous("positions", positions.as_slice())?;
        let out = self
            .with_pages(py, |c, _| {
                let mut out = vec![0i32; t * k];
                for ((id, row), o) in ids
                    .iter()
                    .zip(pos.chunks_exact(k.max(1)))
                    .zip(out.chunks_exact_mut(k.max(1)))
                {
                    c.slots_into(*id, row, o)?;
                }
                Ok(out)
            })
            .map_err(|e| match e {
                CacheError::UnknownSequence(_) => cache_err("seq_ids", e),
                _ => cache_err("positions", e),
            })?;
        array2(py, t, k, out)
    }

    /// Top-k keys per query row, scored from the FP8 pages (see `dsa_hybrid.IndexerKeyCache.select`).
    #[pyo3(signature = (seq_ids, q, weights, positions, k, *, as_slots = false, quantize_queries = true, sorted = false, threads = None))]
    #[allow(clippy::too_many_arguments)]
    fn select<'py>(
        &self,
        py: Python<'py>,
        seq_ids: PyReadonlyArray1<'py, i64>,
        q: PyReadonlyArray3<'py, f32>,
        weights: PyReadonlyArray2<'py, f32>,
        positions: PyReadonlyArray1<'py, i64>,
        k: usize,
        as_slots: bool,
        quantize_queries: bool,
        sorted: bool,
        threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray2<i32>>> {
        let rows = RowsArg::sequences(&seq_ids, &positions);
        let opts = select::Opts::new(k, as_slots, quantize_queries, sorted, threads)?;
        select::select(self, py, rows, &q, &weights, opts)
    }

    /// All visible scores per query row, −inf past each row's own length (see the wrapper).
    #[pyo3(signature = (seq_ids, q, weights, positions, *, quantize_queries = true, threads = None))]
    #[allow(clippy::too_many_arguments)]
    fn scores<'py>(
        &self,
        py: Python<'py>,
        seq_ids: PyReadonlyArray1<'py, i64>,
        q: PyReadonlyArray3<'py, f32>,
        weights: PyReadonlyArray2<'py, f32>,
        positions: PyReadonlyArray1<'py, i64>,
        quantize_queries: bool,
        threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let rows = RowsArg::sequences(&seq_ids, &positions);
        let opts = select::Opts::new(1, false, quantize_queries, false, threads)?;
        select::scores(self, py, rows, &q, &weights, opts)
    }

    /// `select` through external block tables (`[T, W]` int32, −1 padded).
    #[pyo3(signature = (block_tables, positions, q, weights, k, *, as_slots = false, quantize_queries = true, sorted = false, threads = None))]
    #[allow(clippy::too_many_arguments)]
    fn select_paged<'py>(
        &self,
        py: Python<'py>,
        block_tables: PyReadonlyArray2<'py, i32>,
        positions: PyReadonlyArray1<'py, i64>,
        q: PyReadonlyArray3<'py, f32>,
        weights: PyReadonlyArray2<'py, f32>,
        k: usize,
        as_slots: bool,
        quantize_queries: bool,
        sorted: bool,
        threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray2<i32>>> {
        let rows = RowsArg::paged(&block_tables, &positions);
        let opts = select::Opts::new(k, as_slots, quantize_queries, sorted, threads)?;
        select::select(self, py, rows, &q, &weights, opts)
    }

    /// `scores` through external block tables.
    #[pyo3(signature = (block_tables, positions, q, weights, *, quantize_queries = true, threads = None))]
    #[allow(clippy::too_many_arguments)]
    fn scores_paged<'py>(
        &self,
        py: Python<'py>,
        block_tables: PyReadonlyArray2<'py, i32>,
        positions: PyReadonlyArray1<'py, i64>,
        q: PyReadonlyArray3<'py, f32>,
        weights: PyReadonlyArray2<'py, f32>,
        quantize_queries: bool,
        threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let rows = RowsArg::paged(&block_tables, &positions);
        let opts = select::Opts::new(1, false, quantize_queries, false, threads)?;
        select::scores(self, py, rows, &q, &weights, opts)
    }

    /// The page buffer itself: a read-only, zero-copy `uint8 [num_blocks, page_bytes]` view.
    fn pages<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<u8>> {
        self.pages.bind(py).clone()
    }

    fn __repr__(&self) -> String {
        let c = self.read();
        format!(
            "IndexerKeyCache(num_blocks={}, block_size={}, head_dim={}, sequences={}, free_blocks={})",
            c.num_blocks(),
            c.block_size(),
            c.head_dim(),
            c.num_sequences(),
            c.num_free_blocks()
        )
    }
}

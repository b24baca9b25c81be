//! `IndexerKeyCache`: the paged FP8 indexer-key cache as a Python class.
//!
//! The page bytes live in a Rust allocation (`PageBuffer`, allocated once, never moved or
//! resized) written only by the cache. `pages()` hands Python a zero-copy, read-only numpy view
//! of it whose base is the `PageBuffer` object: it keeps the bytes alive however long the view
//! lives, and it cannot be used to break the cache — numpy refuses to make the view writeable
//! (`flags.writeable = True` raises: its base exposes no writable buffer) or to resize it (it
//! does not own its data), and the `PageBuffer` has no methods at all.
//!
//! Locking: a read-write lock per cache guards the bookkeeping and the pages. Scoring and reads
//! (`select`, `scores`, their paged twins, `gather`, `slots`, `dequantize`) share it; writes
//! (`append*`, `write_slots`, `copy_block`, `fork`, ...) hold it alone. The GIL is released for
//! everything that touches the pages, and no code holding the lock ever waits for the GIL.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use numpy::npyffi::{self, npy_intp, NpyTypes, PY_ARRAY_API};
use numpy::{Element, IntoPyArray, PyArray1, PyArray2, PyArrayDescrMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyIndexError, PyKeyError, PyMemoryError, PyValueError};
use pyo3::prelude::*;

use super::args::{self, Int};
use super::errors::cache_err;
use super::select::{self, RowsArg};
use super::{array2, guard};
use crate::indexer_cache::{CacheError, IndexerKeyCache};
use crate::mem::{self, ZeroedBytes};

/// The page bytes of one cache: the base object of every `pages()` view (no methods, not
/// constructible from Python). Dropped when the cache and every view of it are gone.
#[pyclass(name = "PageBuffer", module = "dsa_hybrid._core", frozen)]
pub struct PageBuffer {
    bytes: ZeroedBytes,
}

#[pymethods]
impl PageBuffer {
    fn __repr__(&self) -> PyResult<String> {
        guard("PageBuffer.__repr__", || {
            Ok(format!(
                "<dsa_hybrid._core.PageBuffer of {} bytes>",
                self.bytes.len()
            ))
        })
    }
}

/// Paged FP8 indexer-key cache (see `dsa_hybrid.IndexerKeyCache` for the documented API).
#[pyclass(name = "IndexerKeyCache", module = "dsa_hybrid._core", frozen)]
pub struct PyIndexerKeyCache {
    core: RwLock<IndexerKeyCache>,
    /// Owns the bytes (and keeps them alive for views); accessed only under `core`'s lock.
    buffer: Py<PageBuffer>,
    /// `buffer`'s bytes, reachable without the GIL.
    ptr: RawPages,
}

/// The page buffer's address and length, for use with the GIL released.
struct RawPages {
    ptr: *mut u8,
    len: usize,
}
// SAFETY: the pointer is only dereferenced while `PyIndexerKeyCache::core` is locked (shared for
// reads, exclusive for writes), and the allocation it points into is owned by `buffer`, which
// the cache holds, so it outlives every use.
unsafe impl Send for RawPages {}
// SAFETY: as above.
unsafe impl Sync for RawPages {}

/// A sequence id to look up: an id outside int64 names no sequence (KeyError).
fn lookup_id(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<i64> {
    match args::int(name, obj)? {
        Int::Small(v) => Ok(v),
        Int::Big { .. } => Err(PyKeyError::new_err(format!(
            "{name}: unknown sequence id {obj}"
        ))),
    }
}

/// A sequence id to create: it must fit in int64 (ValueError).
fn new_id(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<i64> {
    match args::int(name, obj)? {
        Int::Small(v) => Ok(v),
        Int::Big { .. } => Err(PyValueError::new_err(format!(
            "{name}: sequence ids must fit in int64, got {obj}"
        ))),
    }
}

/// A block id (converted before any lock is taken: `__index__` may run Python code that calls
/// back into the cache), then checked against the cache: IndexError naming `name`, with the value
/// as given.
fn block_arg(cache: &PyIndexerKeyCache, name: &str, obj: &Bound<'_, PyAny>) -> PyResult<usize> {
    let value = args::int(name, obj)?;
    let c = cache.read();
    let out_of_range = || {
        PyIndexError::new_err(format!(
            "{name}: block {obj} is outside [0, {})",
            c.num_blocks()
        ))
    };
    match value {
        Int::Small(v) => c.check_block(v).map_err(|_| out_of_range()),
        Int::Big { .. } => Err(out_of_range()),
    }
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
            let pages: &[u8] = if self.ptr.len == 0 {
                &[]
            } else {
                // SAFETY: see `RawPages`; the read lock keeps writers out.
                unsafe { std::slice::from_raw_parts(self.ptr.ptr, self.ptr.len) }
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
            let pages: &mut [u8] = if self.ptr.len == 0 {
                &mut []
            } else {
                // SAFETY: see `RawPages`; the write lock serialises every access of the cache.
                // (Python may read the bytes through a `pages()` view meanwhile: plain bytes,
                // documented as live.)
                unsafe { std::slice::from_raw_parts_mut(self.ptr.ptr, self.ptr.len) }
            };
            f(&mut core, pages)
        })
    }

    /// The cache's key width.
    fn head_dim_now(&self) -> usize {
        self.read().head_dim()
    }

    /// A read-only `uint8 [num_blocks, page_bytes]` numpy array over the page bytes, based on
    /// the `PageBuffer` (flags: not writeable, not owning its data).
    fn view<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<u8>>> {
        let (nb, pb) = {
            let c = self.read();
            (c.num_blocks(), c.page_bytes())
        };
        let too_big = || PyValueError::new_err("pages: the buffer's shape does not fit npy_intp");
        let mut dims = [
            npy_intp::try_from(nb).map_err(|_| too_big())?,
            npy_intp::try_from(pb).map_err(|_| too_big())?,
        ];
        let owner = self.buffer.clone_ref(py);
        // SAFETY: `ptr` is valid for `nb · pb` bytes for as long as `owner` lives, and the array
        // holds `owner` as its base; `flags = 0` makes it read-only; `strides = NULL` is C order.
        unsafe {
            let descr = u8::get_dtype(py).into_dtype_ptr();
            let arr = PY_ARRAY_API.PyArray_NewFromDescr(
                py,
                npyffi::get_type_object(py, NpyTypes::PyArray_Type),
                descr,
                2,
                dims.as_mut_ptr(),
                std::ptr::null_mut(),
                self.ptr.ptr.cast(),
                0,
                std::ptr::null_mut(),
            );
            if arr.is_null() {
                return Err(PyErr::fetch(py));
            }
            let arr = Bound::from_owned_ptr(py, arr);
            // Steals the reference to `owner` (also on failure).
            if PY_ARRAY_API.PyArray_SetBaseObject(py, arr.as_ptr().cast(), owner.into_ptr()) < 0 {
                return Err(PyErr::fetch(py));
            }
            Ok(arr.cast_into_unchecked())
        }
    }
}

#[pymethods]
impl PyIndexerKeyCache {
    #[new]
    #[pyo3(signature = (num_blocks, block_size = None, head_dim = None))]
    fn new(
        py: Python<'_>,
        num_blocks: &Bound<'_, PyAny>,
        block_size: Option<&Bound<'_, PyAny>>,
        head_dim: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        guard("IndexerKeyCache", || {
            let num_blocks = args::size("num_blocks", num_blocks)?;
            let block_size = block_size.map_or(Ok(64), |b| args::size("block_size", b))?;
            let head_dim = head_dim.map_or(Ok(128), |h| args::size("head_dim", h))?;
            let core = IndexerKeyCache::new(num_blocks, block_size, head_dim)
                .map_err(|e| cache_err("IndexerKeyCache", e))?;
            let bytes = ZeroedBytes::new(core.buffer_bytes()).map_err(|e| {
                PyMemoryError::new_err(format!(
                    "num_blocks: the page buffer ({num_blocks} pages of {} bytes): {e}",
                    core.page_bytes()
                ))
            })?;
            let ptr = RawPages {
                ptr: bytes.as_ptr(),
                len: bytes.len(),
            };
            Ok(PyIndexerKeyCache {
                core: RwLock::new(core),
                buffer: Py::new(py, PageBuffer { bytes })?,
                ptr,
            })
        })
    }

    #[getter]
    fn num_blocks(&self) -> PyResult<usize> {
        guard("IndexerKeyCache.num_blocks", || {
            Ok(self.read().num_blocks())
        })
    }
    #[getter]
    fn block_size(&self) -> PyResult<usize> {
        guard("IndexerKeyCache.block_size", || {
            Ok(self.read().block_size())
        })
    }
    #[getter]
    fn head_dim(&self) -> PyResult<usize> {
        guard("IndexerKeyCache.head_dim", || Ok(self.read().head_dim()))
    }
    #[getter]
    fn page_bytes(&self) -> PyResult<usize> {
        guard("IndexerKeyCache.page_bytes", || {
            Ok(self.read().page_bytes())
        })
    }
    #[getter]
    fn num_free_blocks(&self) -> PyResult<usize> {
        guard("IndexerKeyCache.num_free_blocks", || {
            Ok(self.read().num_free_blocks())
        })
    }
    #[getter]
    fn bytes_used(&self) -> PyResult<usize> {
        guard("IndexerKeyCache.bytes_used", || {
            Ok(self.read().bytes_used())
        })
    }
    fn sequence_ids(&self) -> PyResult<Vec<i64>> {
        guard("IndexerKeyCache.sequence_ids", || {
            Ok(self.read().sequence_ids())
        })
    }
    fn block_refcount(&self, block: &Bound<'_, PyAny>) -> PyResult<u32> {
        guard("IndexerKeyCache.block_refcount", || {
            let b = block_arg(self, "block", block)?;
            self.read()
                .block_refcount(b as i64)
                .map_err(|e| cache_err("block", e))
        })
    }
    fn add_sequence(&self, seq_id: &Bound<'_, PyAny>) -> PyResult<()> {
        guard("IndexerKeyCache.add_sequence", || {
            let id = new_id("seq_id", seq_id)?;
            self.write()
                .add_sequence(id)
                .map_err(|e| cache_err("seq_id", e))
        })
    }
    fn length(&self, seq_id: &Bound<'_, PyAny>) -> PyResult<usize> {
        guard("IndexerKeyCache.length", || {
            let id = lookup_id("seq_id", seq_id)?;
            self.read().length(id).map_err(|e| cache_err("seq_id", e))
        })
    }
    fn block_table<'py>(
        &self,
        py: Python<'py>,
        seq_id: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<i32>>> {
        guard("IndexerKeyCache.block_table", || {
            let id = lookup_id("seq_id", seq_id)?;
            // Block ids are below num_blocks <= 2^31 / 16: they fit in an int32.
            let table: Vec<i32> = self
                .read()
                .block_table(id)
                .map_err(|e| cache_err("seq_id", e))?
                .iter()
                .map(|b| *b as i32)
                .collect();
            Ok(table.into_pyarray(py))
        })
    }
    fn can_append(&self, seq_id: &Bound<'_, PyAny>, n: &Bound<'_, PyAny>) -> PyResult<bool> {
        guard("IndexerKeyCache.can_append", || {
            let id = lookup_id("seq_id", seq_id)?;
            let n = args::count("n", n)?;
            self.read()
                .can_append(id, n)
                .map_err(|e| cache_err("seq_id", e))
        })
    }
    fn fork(&self, parent: &Bound<'_, PyAny>, child: &Bound<'_, PyAny>) -> PyResult<()> {
        guard("IndexerKeyCache.fork", || {
            let parent = lookup_id("parent", parent)?;
            let child = new_id("child", child)?;
            self.write().fork(parent, child).map_err(|e| match e {
                CacheError::UnknownSequence(_) => cache_err("parent", e),
                _ => cache_err("child", e),
            })
        })
    }
    fn truncate(&self, seq_id: &Bound<'_, PyAny>, n: &Bound<'_, PyAny>) -> PyResult<()> {
        guard("IndexerKeyCache.truncate", || {
            let id = lookup_id("seq_id", seq_id)?;
            let n_tokens = args::count("n", n)?;
            self.write().truncate(id, n_tokens).map_err(|e| match e {
                CacheError::UnknownSequence(_) => cache_err("seq_id", e),
                CacheError::TruncateBeyondLength { length, .. } => PyValueError::new_err(format!(
                    "n: cannot truncate to {n} tokens: the sequence has {length}"
                )),
                _ => cache_err("n", e),
            })
        })
    }
    fn free(&self, seq_id: &Bound<'_, PyAny>) -> PyResult<()> {
        guard("IndexerKeyCache.free", || {
            let id = lookup_id("seq_id", seq_id)?;
            self.write().free(id).map_err(|e| cache_err("seq_id", e))
        })
    }

    fn append(
        &self,
        py: Python<'_>,
        seq_id: &Bound<'_, PyAny>,
        keys: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        guard("IndexerKeyCache.append", || {
            let id = lookup_id("seq_id", seq_id)?;
            let keys = args::array::<f32, numpy::Ix2>("keys", keys)?;
            let d = self.head_dim_now();
            if keys.shape()[1] != d {
                return Err(PyValueError::new_err(format!(
                    "keys: expected [n, {d}], got {:?}",
                    keys.shape()
                )));
            }
            let keys = args::slice("keys", &keys)?;
            self.with_pages_mut(py, |c, pages| c.append(pages, id, keys))
                .map_err(|e| match e {
                    CacheError::UnknownSequence(_) => cache_err("seq_id", e),
                    _ => cache_err("keys", e),
                })
        })
    }

    fn append_quantized(
        &self,
        py: Python<'_>,
        seq_id: &Bound<'_, PyAny>,
        fp8: &Bound<'_, PyAny>,
        scales: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        guard("IndexerKeyCache.append_quantized", || {
            let id = lookup_id("seq_id", seq_id)?;
            let fp8 = args::array::<u8, numpy::Ix2>("fp8", fp8)?;
            let scales = args::array::<f32, numpy::Ix1>("scales", scales)?;
            let d = self.head_dim_now();
            if fp8.shape()[1] != d || fp8.shape()[0] != scales.len() {
                return Err(PyValueError::new_err(format!(
                    "fp8: expected [n, {d}] with scales [n], got {:?} and {:?}",
                    fp8.shape(),
                    scales.shape()
                )));
            }
            let codes = args::slice("fp8", &fp8)?;
            let s = args::slice("scales", &scales)?;
            self.with_pages_mut(py, |c, pages| c.append_quantized(pages, id, codes, s))
                .map_err(|e| match e {
                    CacheError::UnknownSequence(_) => cache_err("seq_id", e),
                    CacheError::NonFiniteScale { .. } => cache_err("scales", e),
                    _ => cache_err("fp8", e),
                })
        })
    }

    /// Write pre-quantized keys at external slots (`block · block_size + offset`; −1 skips a row).
    fn write_slots(
        &self,
        py: Python<'_>,
        slots: &Bound<'_, PyAny>,
        fp8: &Bound<'_, PyAny>,
        scales: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        guard("IndexerKeyCache.write_slots", || {
            let slots = args::array::<i32, numpy::Ix1>("slots", slots)?;
            let fp8 = args::array::<u8, numpy::Ix2>("fp8", fp8)?;
            let scales = args::array::<f32, numpy::Ix1>("scales", scales)?;
            let d = self.head_dim_now();
            let n = slots.len();
            if fp8.shape() != [n, d] || scales.len() != n {
                return Err(PyValueError::new_err(format!(
                    "fp8: expected [{n}, {d}] with scales [{n}] for {n} slots, got {:?} and {:?}",
                    fp8.shape(),
                    scales.shape()
                )));
            }
            let slots = args::slice("slots", &slots)?;
            let codes = args::slice("fp8", &fp8)?;
            let s = args::slice("scales", &scales)?;
            self.with_pages_mut(py, |c, pages| c.write_slots(pages, slots, codes, s))
                .map_err(|e| match e {
                    CacheError::Slot { .. } => cache_err("slots", e),
                    CacheError::NonFiniteScale { .. } => cache_err("scales", e),
                    _ => cache_err("fp8", e),
                })
        })
    }

    /// Copy page `src` over page `dst` (codes and scales).
    fn copy_block(
        &self,
        py: Python<'_>,
        src: &Bound<'_, PyAny>,
        dst: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        guard("IndexerKeyCache.copy_block", || {
            let (s, d) = (block_arg(self, "src", src)?, block_arg(self, "dst", dst)?);
            self.with_pages_mut(py, |c, pages| c.copy_block(pages, s, d))
                .map_err(|e| cache_err("copy_block", e))
        })
    }

    #[allow(clippy::type_complexity)]
    fn gather<'py>(
        &self,
        py: Python<'py>,
        seq_id: &Bound<'py, PyAny>,
        positions: &Bound<'py, PyAny>,
    ) -> PyResult<(Bound<'py, PyArray2<u8>>, Bound<'py, PyArray1<f32>>)> {
        guard("IndexerKeyCache.gather", || {
            let id = lookup_id("seq_id", seq_id)?;
            let positions = args::array::<i64, numpy::Ix1>("positions", positions)?;
            let pos = args::slice("positions", &positions)?;
            let d = self.head_dim_now();
            let oom = |e: mem::AllocError| {
                PyMemoryError::new_err(format!(
                    "positions: the [{}, {d}] gathered codes: {e}",
                    pos.len()
                ))
            };
            let mut codes = mem::try_matrix(pos.len(), d, 0u8).map_err(oom)?;
            let mut scales = mem::try_filled(pos.len(), 0f32).map_err(oom)?;
            self.with_pages(py, |c, pages| {
                c.gather(pages, id, pos, &mut codes, &mut scales)
            })
            .map_err(|e| match e {
                CacheError::UnknownSequence(_) => cache_err("seq_id", e),
                _ => cache_err("positions", e),
            })?;
            Ok((array2(py, pos.len(), d, codes)?, scales.into_pyarray(py)))
        })
    }

    fn dequantize<'py>(
        &self,
        py: Python<'py>,
        seq_id: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        guard("IndexerKeyCache.dequantize", || {
            let id = lookup_id("seq_id", seq_id)?;
            let d = self.head_dim_now();
            let v = self
                .with_pages(py, |c, pages| c.dequantize(pages, id))
                .map_err(|e| cache_err("seq_id", e))?;
            array2(py, v.len() / d, d, v)
        })
    }

    fn slots<'py>(
        &self,
        py: Python<'py>,
        seq_ids: &Bound<'py, PyAny>,
        positions: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray2<i32>>> {
        guard("IndexerKeyCache.slots", || {
            let seq_ids = args::array::<i64, numpy::Ix1>("seq_ids", seq_ids)?;
            let positions = args::array::<i64, numpy::Ix2>("positions", positions)?;
            let (t, k) = (positions.shape()[0], positions.shape()[1]);
            if seq_ids.len() != t {
                return Err(PyValueError::new_err(format!(
                    "seq_ids: {} ids for {t} rows of positions",
                    seq_ids.len()
                )));
            }
            let ids = args::slice("seq_ids", &seq_ids)?;
            let pos = args::slice("positions", &positions)?;
            let mut out = mem::try_matrix(t, k, 0i32).map_err(|e| {
                PyMemoryError::new_err(format!("positions: the [{t}, {k}] int32 slots: {e}"))
            })?;
            self.with_pages(py, |c, _| {
                for ((id, row), o) in ids
                    .iter()
                    .zip(pos.chunks_exact(k.max(1)))
                    .zip(out.chunks_exact_mut(k.max(1)))
                {
                    c.slots_into(*id, row, o)?;
                }
                Ok(())
            })
            .map_err(|e| match e {
                CacheError::UnknownSequence(_) => cache_err("seq_ids", e),
                _ => cache_err("positions", e),
            })?;
            array2(py, t, k, out)
        })
    }

    /// Top-k keys per query row, scored from the FP8 pages (see `dsa_hybrid.IndexerKeyCache.select`).
    #[pyo3(signature = (seq_ids, q, weights, positions, k, *, as_slots = None, quantize_queries = None, sorted = None, threads = None, query_dtype = None))]
    #[allow(clippy::too_many_arguments)]
    fn select<'py>(
        &self,
        py: Python<'py>,
        seq_ids: &Bound<'py, PyAny>,
        q: &Bound<'py, PyAny>,
        weights: &Bound<'py, PyAny>,
        positions: &Bound<'py, PyAny>,
        k: &Bound<'py, PyAny>,
        as_slots: Option<&Bound<'py, PyAny>>,
        quantize_queries: Option<&Bound<'py, PyAny>>,
        sorted: Option<&Bound<'py, PyAny>>,
        threads: Option<&Bound<'py, PyAny>>,
        query_dtype: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArray2<i32>>> {
        guard("IndexerKeyCache.select", || {
            let rows = RowsArg::sequences(seq_ids, positions)?;
            let opts =
                select::Opts::new(k, as_slots, quantize_queries, sorted, threads, query_dtype)?;
            select::select(self, py, rows, q, weights, opts)
        })
    }

    /// All visible scores per query row, −inf past each row's own length (see the wrapper).
    #[pyo3(signature = (seq_ids, q, weights, positions, *, quantize_queries = None, threads = None, query_dtype = None))]
    #[allow(clippy::too_many_arguments)]
    fn scores<'py>(
        &self,
        py: Python<'py>,
        seq_ids: &Bound<'py, PyAny>,
        q: &Bound<'py, PyAny>,
        weights: &Bound<'py, PyAny>,
        positions: &Bound<'py, PyAny>,
        quantize_queries: Option<&Bound<'py, PyAny>>,
        threads: Option<&Bound<'py, PyAny>>,
        query_dtype: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        guard("IndexerKeyCache.scores", || {
            let rows = RowsArg::sequences(seq_ids, positions)?;
            let opts = select::Opts::for_scores(quantize_queries, threads, query_dtype)?;
            select::scores(self, py, rows, q, weights, opts)
        })
    }

    /// `select` through external block tables (`[T, W]` int32, −1 padded).
    #[pyo3(signature = (block_tables, positions, q, weights, k, *, as_slots = None, quantize_queries = None, sorted = None, threads = None, query_dtype = None))]
    #[allow(clippy::too_many_arguments)]
    fn select_paged<'py>(
        &self,
        py: Python<'py>,
        block_tables: &Bound<'py, PyAny>,
        positions: &Bound<'py, PyAny>,
        q: &Bound<'py, PyAny>,
        weights: &Bound<'py, PyAny>,
        k: &Bound<'py, PyAny>,
        as_slots: Option<&Bound<'py, PyAny>>,
        quantize_queries: Option<&Bound<'py, PyAny>>,
        sorted: Option<&Bound<'py, PyAny>>,
        threads: Option<&Bound<'py, PyAny>>,
        query_dtype: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArray2<i32>>> {
        guard("IndexerKeyCache.select_paged", || {
            let rows = RowsArg::paged(block_tables, positions)?;
            let opts =
                select::Opts::new(k, as_slots, quantize_queries, sorted, threads, query_dtype)?;
            select::select(self, py, rows, q, weights, opts)
        })
    }

    /// `scores` through external block tables.
    #[pyo3(signature = (block_tables, positions, q, weights, *, quantize_queries = None, threads = None, query_dtype = None))]
    #[allow(clippy::too_many_arguments)]
    fn scores_paged<'py>(
        &self,
        py: Python<'py>,
        block_tables: &Bound<'py, PyAny>,
        positions: &Bound<'py, PyAny>,
        q: &Bound<'py, PyAny>,
        weights: &Bound<'py, PyAny>,
        quantize_queries: Option<&Bound<'py, PyAny>>,
        threads: Option<&Bound<'py, PyAny>>,
        query_dtype: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        guard("IndexerKeyCache.scores_paged", || {
            let rows = RowsArg::paged(block_tables, positions)?;
            let opts = select::Opts::for_scores(quantize_queries, threads, query_dtype)?;
            select::scores(self, py, rows, q, weights, opts)
        })
    }

    /// The page buffer: a read-only, zero-copy `uint8 [num_blocks, page_bytes]` view that cannot
    /// be made writeable or resized (its base is the cache's `PageBuffer`).
    fn pages<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<u8>>> {
        guard("IndexerKeyCache.pages", || self.view(py))
    }

    fn __repr__(&self) -> PyResult<String> {
        guard("IndexerKeyCache.__repr__", || {
            let c = self.read();
            Ok(format!(
                "IndexerKeyCache(num_blocks={}, block_size={}, head_dim={}, sequences={}, free_blocks={})",
                c.num_blocks(),
                c.block_size(),
                c.head_dim(),
                c.num_sequences(),
                c.num_free_blocks()
            ))
        })
    }
}

//! dsa_hybrid host core: the Rust half of DeepSeek Sparse Attention on CPU/TPU.
//!
//! The core modules are plain Rust with their own `cargo test`; the PyO3
//! bindings (feature `python`, turned on by maturin) only check arguments,
//! release the GIL and map errors to Python exceptions.

pub mod cpu;
pub mod fp8;
pub mod hadamard;
pub mod indexer_cache;
pub mod par;
pub mod pool;
pub mod quant;
pub mod score;
pub mod select;
pub mod topk;

/// A seeded generator for the unit tests: 31 random bits per call (a 64-bit LCG's high bits).
#[cfg(test)]
pub(crate) fn test_rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        x >> 33
    }
}

#[cfg(feature = "python")]
mod bindings {
    use numpy::ndarray::{Array1, Array2};
    use numpy::{
        IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods,
    };
    use pyo3::exceptions::PyValueError;
    use pyo3::prelude::*;
    use pyo3::types::PyDict;

    use crate::{cpu, fp8, quant, topk};

    /// Detected CPU features (name -> bool) and the SIMD path in use.
    #[pyfunction]
    fn cpu_features(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
        let d = PyDict::new(py);
        for (name, present) in cpu::features() {
            d.set_item(name, present)?;
        }
        d.set_item("simd_path", cpu::simd_path())?;
        Ok(d)
    }

    /// Quantize rows of a float32 `[n, d]` array to FP8 e4m3fn with one
    /// power-of-two scale per row (spec §4); with `hadamard=True` each row is
    /// first rotated by the orthonormal Hadamard matrix. Returns
    /// `(codes uint8 [n, d], scales float32 [n])`, bit-identical to
    /// `reference.quantize_fp8(reference.hadamard(x))`.
    #[pyfunction]
    #[pyo3(signature = (x, *, hadamard = true))]
    #[allow(clippy::type_complexity)]
    fn fp8_quantize_rows<'py>(
        py: Python<'py>,
        x: PyReadonlyArray2<'py, f32>,
        hadamard: bool,
    ) -> PyResult<(Bound<'py, PyArray2<u8>>, Bound<'py, PyArray1<f32>>)> {
        let (n, d) = (x.shape()[0], x.shape()[1]);
        let rows = x
            .as_slice()
            .map_err(|_| PyValueError::new_err("x: must be C-contiguous"))?;
        let mut codes = vec![0u8; n * d];
        let mut scales = vec![0f32; n];
        py.detach(|| quant::quantize_rows(rows, d, hadamard, &mut codes, &mut scales))
            .map_err(|e| PyValueError::new_err(format!("x: {e}")))?;
        let codes = Array2::from_shape_vec((n, d), codes).expect("shape matches length");
        Ok((
            codes.into_pyarray(py),
            Array1::from_vec(scales).into_pyarray(py),
        ))
    }

    /// Make the kernels use the named SIMD path (`None`: the widest the CPU has);
    /// returns the path now in use. Refused with ValueError when the CPU lacks it.
    #[pyfunction]
    #[pyo3(signature = (name = None))]
    fn set_simd_path(name: Option<&str>) -> PyResult<&'static str> {
        let isa = match name {
            None => None,
            Some(n) => Some(cpu::Isa::from_name(n).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "name: unknown SIMD path {n:?} (one of scalar, avx2, avx512, neon)"
                ))
            })?),
        };
        cpu::set_active(isa)
            .map(|i| i.name())
            .map_err(|e| PyValueError::new_err(format!("name: {e}")))
    }

    /// `None` or a count ≥ 1 of worker threads, as the core's convention (0 = one per core).
    fn thread_count(threads: Option<usize>) -> PyResult<usize> {
        match threads {
            Some(0) => Err(PyValueError::new_err(
                "threads: must be at least 1 (or None for one per core)",
            )),
            Some(n) => Ok(n),
            None => Ok(0),
        }
    }

    /// Top-k of each row of float32 `scores` `[T, L]` (spec §5); see `dsa_hybrid.topk`.
    #[pyfunction]
    #[pyo3(name = "topk", signature = (scores, k, lengths = None, *, sorted = false, threads = None))]
    fn topk_rows<'py>(
        py: Python<'py>,
        scores: PyReadonlyArray2<'py, f32>,
        k: usize,
        lengths: Option<PyReadonlyArray1<'py, i64>>,
        sorted: bool,
        threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray2<i32>>> {
        let (t, l) = (scores.shape()[0], scores.shape()[1]);
        let rows = contiguous("scores", scores.as_slice())?;
        if k == 0 {
            return Err(PyValueError::new_err("k: must be at least 1"));
        }
        let threads = thread_count(threads)?;
        let lens: Vec<usize> = match &lengths {
            None => vec![l; t],
            Some(a) => {
                let a = contiguous("lengths", a.as_slice())?;
                if a.len() != t {
                    return Err(PyValueError::new_err(format!(
                        "lengths: {} entries for {t} rows",
                        a.len()
                    )));
                }
                if let Some((i, v)) = a
                    .iter()
                    .enumerate()
                    .find(|(_, v)| **v < 0 || **v as usize > l)
                {
                    return Err(PyValueError::new_err(format!(
                        "lengths: entry {i} is {v}, outside [0, {l}]"
                    )));
                }
                a.iter().map(|v| *v as usize).collect()
            }
        };
        let isa = cpu::active();
        let out = py
            .detach(|| topk::topk_rows(isa, rows, l, &lens, k, sorted, threads))
            .map_err(|r| {
                PyValueError::new_err(format!(
                    "scores: NaN in row {r} among its visible positions"
                ))
            })?;
        Ok(Array2::from_shape_vec((t, k), out)
            .expect("shape matches length")
            .into_pyarray(py))
    }

    /// The float32 value of each of the 256 e4m3fn codes (index = code).
    #[pyfunction]
    fn fp8_decode_table(py: Python<'_>) -> Bound<'_, PyArray1<f32>> {
        Array1::from_vec(fp8::DECODE_TABLE.to_vec()).into_pyarray(py)
    }

    use numpy::PyReadonlyArray1;
    use pyo3::create_exception;
    use pyo3::exceptions::{PyIndexError, PyKeyError, PyRuntimeError};
    use std::sync::Mutex;

    use crate::indexer_cache::{CacheError, IndexerKeyCache};
    use crate::select::{self, Queries, SelectOptions};
    use numpy::PyReadonlyArray3;

    /// Errors of `select` and `scores`, named after the argument at fault.
    fn select_err(e: CacheError) -> PyErr {
        match e {
            CacheError::UnknownSequence(_) => cache_err("seq_ids", e),
            CacheError::Position { .. } => cache_err("positions", e),
            CacheError::NonFiniteScore { .. } => cache_err("q, weights", e),
            other => PyValueError::new_err(other.to_string()),
        }
    }

    /// The inputs of `select` and `scores`: the queries laid out for the kernels (checked, GIL
    /// released) and the rows' sequence ids and positions as slices.
    fn indexer_rows<'a>(
        py: Python<'_>,
        seq_ids: &'a PyReadonlyArray1<'_, i64>,
        q: &PyReadonlyArray3<'_, f32>,
        weights: &PyReadonlyArray2<'_, f32>,
        positions: &'a PyReadonlyArray1<'_, i64>,
        quantize: bool,
    ) -> PyResult<(Queries, &'a [i64], &'a [i64])> {
        let (t, h, d) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        if weights.shape() != [t, h] {
            return Err(PyValueError::new_err(format!(
                "weights: expected [{t}, {h}] for q of {:?}, got {:?}",
                q.shape(),
                weights.shape()
            )));
        }
        let qs = contiguous("q", q.as_slice())?;
        let ws = contiguous("weights", weights.as_slice())?;
        let queries = py
            .detach(|| Queries::new(qs, ws, t, h, d, quantize))
            .map_err(PyValueError::new_err)?;
        let ids = contiguous("seq_ids", seq_ids.as_slice())?;
        let pos = contiguous("positions", positions.as_slice())?;
        Ok((queries, ids, pos))
    }

    create_exception!(
        _core,
        CacheFullError,
        PyRuntimeError,
        "The block pool has too few free blocks for the request; nothing was written."
    );

    /// `arg: message` as the Python exception that fits the error.
    fn cache_err(arg: &str, e: CacheError) -> PyErr {
        let msg = format!("{arg}: {e}");
        match e {
            CacheError::UnknownSequence(_) => PyKeyError::new_err(msg),
            CacheError::PoolExhausted { .. } => CacheFullError::new_err(msg),
            CacheError::Position { .. } => PyIndexError::new_err(msg),
            _ => PyValueError::new_err(msg),
        }
    }

    fn contiguous<'a, T>(arg: &str, r: Result<&'a [T], numpy::AsSliceError>) -> PyResult<&'a [T]> {
        r.map_err(|_| PyValueError::new_err(format!("{arg}: must be a C-contiguous array")))
    }

    /// The page buffer: a numpy array allocated once and never resized, written only under the
    /// cache's mutex. Kept as a raw pointer so writes can run with the GIL released.
    struct PageBuffer {
        ptr: *mut u8,
        len: usize,
    }
    // SAFETY: the pointer is only dereferenced while `PyIndexerKeyCache::core` is locked, and the
    // array it points into is owned by the same object (`pages`), so it outlives every use.
    unsafe impl Send for PageBuffer {}
    unsafe impl Sync for PageBuffer {}

    /// Paged FP8 indexer-key cache (see `dsa_hybrid.IndexerKeyCache` for the documented API).
    #[pyclass(name = "IndexerKeyCache", module = "dsa_hybrid._core", frozen)]
    struct PyIndexerKeyCache {
        core: Mutex<IndexerKeyCache>,
        pages: Py<PyArray2<u8>>,
        buffer: PageBuffer,
    }

    impl PyIndexerKeyCache {
        /// Run `f` on the locked bookkeeping and the page bytes, with the GIL released.
        fn with_pages<R: Send>(
            &self,
            py: Python<'_>,
            f: impl FnOnce(&mut IndexerKeyCache, &mut [u8]) -> R + Send,
        ) -> R {
            py.detach(|| {
                let mut core = self.core.lock().unwrap_or_else(|p| p.into_inner());
                // SAFETY: see `PageBuffer`; the lock serialises every access through this object.
                let pages =
                    unsafe { std::slice::from_raw_parts_mut(self.buffer.ptr, self.buffer.len) };
                f(&mut core, pages)
            })
        }

        fn core(&self) -> std::sync::MutexGuard<'_, IndexerKeyCache> {
            self.core.lock().unwrap_or_else(|p| p.into_inner())
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
            let arr = PyArray2::<u8>::zeros(py, [num_blocks, core.page_bytes()], false);
            let buffer = PageBuffer {
                ptr: arr.data(),
                len: core.buffer_bytes(),
            };
            // The view handed to Python is read-only: only the cache writes pages.
            let kwargs = PyDict::new(py);
            kwargs.set_item("write", false)?;
            arr.call_method("setflags", (), Some(&kwargs))?;
            Ok(PyIndexerKeyCache {
                core: Mutex::new(core),
                pages: arr.unbind(),
                buffer,
            })
        }

        #[getter]
        fn num_blocks(&self) -> usize {
            self.core().num_blocks()
        }
        #[getter]
        fn block_size(&self) -> usize {
            self.core().block_size()
        }
        #[getter]
        fn head_dim(&self) -> usize {
            self.core().head_dim()
        }
        #[getter]
        fn page_bytes(&self) -> usize {
            self.core().page_bytes()
        }
        #[getter]
        fn num_free_blocks(&self) -> usize {
            self.core().num_free_blocks()
        }
        #[getter]
        fn bytes_used(&self) -> usize {
            self.core().bytes_used()
        }
        fn sequence_ids(&self) -> Vec<i64> {
            self.core().sequence_ids()
        }
        fn block_refcount(&self, block: u32) -> PyResult<u32> {
            let core = self.core();
            if block as usize >= core.num_blocks() {
                return Err(PyIndexError::new_err(format!(
                    "block: {block} out of range"
                )));
            }
            Ok(core.block_refcount(block))
        }
        fn add_sequence(&self, seq_id: i64) -> PyResult<()> {
            self.core()
                .add_sequence(seq_id)
                .map_err(|e| cache_err("seq_id", e))
        }
        fn length(&self, seq_id: i64) -> PyResult<usize> {
            self.core()
                .length(seq_id)
                .map_err(|e| cache_err("seq_id", e))
        }
        fn block_table<'py>(
            &self,
            py: Python<'py>,
            seq_id: i64,
        ) -> PyResult<Bound<'py, PyArray1<i32>>> {
            let table: Vec<i32> = self
                .core()
                .block_table(seq_id)
                .map_err(|e| cache_err("seq_id", e))?
                .iter()
                .map(|b| *b as i32)
                .collect();
            Ok(Array1::from_vec(table).into_pyarray(py))
        }
        fn can_append(&self, seq_id: i64, n: usize) -> PyResult<bool> {
            self.core()
                .can_append(seq_id, n)
                .map_err(|e| cache_err("seq_id", e))
        }
        fn fork(&self, parent: i64, child: i64) -> PyResult<()> {
            self.core().fork(parent, child).map_err(|e| match e {
                CacheError::UnknownSequence(_) => cache_err("parent", e),
                _ => cache_err("child", e),
            })
        }
        fn truncate(&self, seq_id: i64, n: usize) -> PyResult<()> {
            self.core().truncate(seq_id, n).map_err(|e| match e {
                CacheError::UnknownSequence(_) => cache_err("seq_id", e),
                _ => cache_err("n", e),
            })
        }
        fn free(&self, seq_id: i64) -> PyResult<()> {
            self.core().free(seq_id).map_err(|e| cache_err("seq_id", e))
        }

        fn append(
            &self,
            py: Python<'_>,
            seq_id: i64,
            keys: PyReadonlyArray2<'_, f32>,
        ) -> PyResult<()> {
            let d = self.core().head_dim();
            if keys.shape()[1] != d {
                return Err(PyValueError::new_err(format!(
                    "keys: expected [n, {d}], got {:?}",
                    keys.shape()
                )));
            }
            let keys = contiguous("keys", keys.as_slice())?;
            self.with_pages(py, |c, pages| c.append(pages, seq_id, keys))
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
            let d = self.core().head_dim();
            if fp8.shape()[1] != d || fp8.shape()[0] != scales.len() {
                return Err(PyValueError::new_err(format!(
                    "fp8: expected [n, {d}] with scales [n], got {:?} and {:?}",
                    fp8.shape(),
                    scales.shape()
                )));
            }
            let codes = contiguous("fp8", fp8.as_slice())?;
            let s = contiguous("scales", scales.as_slice())?;
            self.with_pages(py, |c, pages| c.append_quantized(pages, seq_id, codes, s))
                .map_err(|e| match e {
                    CacheError::UnknownSequence(_) => cache_err("seq_id", e),
                    CacheError::NonFiniteScale { .. } => cache_err("scales", e),
                    _ => cache_err("fp8", e),
                })
        }

        #[allow(clippy::type_complexity)]
        fn gather<'py>(
            &self,
            py: Python<'py>,
            seq_id: i64,
            positions: PyReadonlyArray1<'_, i64>,
        ) -> PyResult<(Bound<'py, PyArray2<u8>>, Bound<'py, PyArray1<f32>>)> {
            let pos = contiguous("positions", positions.as_slice())?;
            let d = self.core().head_dim();
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
            let codes =
                Array2::from_shape_vec((pos.len(), d), codes).expect("shape matches length");
            Ok((
                codes.into_pyarray(py),
                Array1::from_vec(scales).into_pyarray(py),
            ))
        }

        fn dequantize<'py>(
            &self,
            py: Python<'py>,
            seq_id: i64,
        ) -> PyResult<Bound<'py, PyArray2<f32>>> {
            let d = self.core().head_dim();
            let v = self
                .with_pages(py, |c, pages| c.dequantize(pages, seq_id))
                .map_err(|e| cache_err("seq_id", e))?;
            let n = v.len() / d;
            Ok(Array2::from_shape_vec((n, d), v)
                .expect("shape matches length")
                .into_pyarray(py))
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
            Ok(Array2::from_shape_vec((t, k), out)
                .expect("shape matches length")
                .into_pyarray(py))
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
            let threads = thread_count(threads)?;
            let (queries, ids, pos) =
                indexer_rows(py, &seq_ids, &q, &weights, &positions, quantize_queries)?;
            let opts = SelectOptions {
                k,
                as_slots,
                by_score: sorted,
                threads,
                isa: cpu::active(),
            };
            let out = self
                .with_pages(py, |c, pages| {
                    select::select(c, pages, &queries, ids, pos, opts)
                })
                .map_err(select_err)?;
            Ok(Array2::from_shape_vec((queries.rows(), k), out)
                .expect("shape matches length")
                .into_pyarray(py))
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
            let threads = thread_count(threads)?;
            let (queries, ids, pos) =
                indexer_rows(py, &seq_ids, &q, &weights, &positions, quantize_queries)?;
            let isa = cpu::active();
            let (out, l) = self
                .with_pages(py, |c, pages| {
                    select::scores(c, pages, &queries, ids, pos, threads, isa)
                })
                .map_err(select_err)?;
            Ok(Array2::from_shape_vec((queries.rows(), l), out)
                .expect("shape matches length")
                .into_pyarray(py))
        }

        /// The page buffer itself: a read-only, zero-copy `uint8 [num_blocks, page_bytes]` view.
        fn pages<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<u8>> {
            self.pages.bind(py).clone()
        }
    }

    #[pymodule]
    #[pyo3(name = "_core")]
    fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add_function(wrap_pyfunction!(cpu_features, m)?)?;
        m.add_function(wrap_pyfunction!(fp8_quantize_rows, m)?)?;
        m.add_function(wrap_pyfunction!(fp8_decode_table, m)?)?;
        m.add_function(wrap_pyfunction!(set_simd_path, m)?)?;
        m.add_function(wrap_pyfunction!(topk_rows, m)?)?;
        m.add_class::<PyIndexerKeyCache>()?;
        m.add("CacheFullError", m.py().get_type::<CacheFullError>())?;
        Ok(())
    }
}

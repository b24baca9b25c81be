//! The bodies of `IndexerKeyCache.select` / `.scores` and their paged twins: argument checks, the
//! queries borrowed zero-copy, one call of the core with the GIL released, errors named.

use numpy::{Ix1, Ix2, Ix3, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::{PyMemoryError, PyValueError};
use pyo3::prelude::*;

use super::args;
use super::array2;
use super::cache::PyIndexerKeyCache;
use super::errors::select_err;
use crate::indexer_cache::CacheError;
use crate::indexer_cache::IndexerKeyCache;
use crate::select::{self, Queries, RowSource, SelectOptions};
use crate::{cpu, mem};

/// Where the rows' block tables come from, converted.
pub enum RowsArg<'py> {
    /// The cache's own sequences: `seq_ids [T]`, `positions [T]`.
    Sequences {
        seq_ids: PyReadonlyArray1<'py, i64>,
        positions: PyReadonlyArray1<'py, i64>,
    },
    /// External tables: `block_tables [T, W]` int32, `positions [T]`.
    Paged {
        tables: PyReadonlyArray2<'py, i32>,
        positions: PyReadonlyArray1<'py, i64>,
    },
}

impl<'py> RowsArg<'py> {
    pub fn sequences(seq_ids: &Bound<'py, PyAny>, positions: &Bound<'py, PyAny>) -> PyResult<Self> {
        Ok(RowsArg::Sequences {
            seq_ids: args::array::<i64, Ix1>("seq_ids", seq_ids)?,
            positions: args::array::<i64, Ix1>("positions", positions)?,
        })
    }

    pub fn paged(tables: &Bound<'py, PyAny>, positions: &Bound<'py, PyAny>) -> PyResult<Self> {
        Ok(RowsArg::Paged {
            tables: args::array::<i32, Ix2>("block_tables", tables)?,
            positions: args::array::<i64, Ix1>("positions", positions)?,
        })
    }

    fn slices(&self) -> PyResult<RowSource<'_>> {
        Ok(match self {
            RowsArg::Sequences { seq_ids, positions } => RowSource::Sequences {
                seq_ids: args::slice("seq_ids", seq_ids)?,
                positions: args::slice("positions", positions)?,
            },
            RowsArg::Paged { tables, positions } => RowSource::Paged {
                tables: args::slice("block_tables", tables)?,
                width: tables.shape()[1],
                positions: args::slice("positions", positions)?,
            },
        })
    }
}

/// The keyword options of the four calls, checked.
#[derive(Clone, Copy)]
pub struct Opts {
    k: usize,
    as_slots: bool,
    quantize: bool,
    sorted: bool,
    threads: usize,
    bf16: bool,
}

/// The environment variable that pins `query_dtype="auto"` when set to "float32" or "bfloat16".
pub const QUERY_DTYPE_ENV: &str = "DSA_HYBRID_QUERY_DTYPE";

/// A `query_dtype` argument: Some(false) "float32", Some(true) "bfloat16", None "auto";
/// ValueError naming it for anything else.
fn parse_query_dtype(name: &str) -> PyResult<Option<bool>> {
    match name {
        "float32" => Ok(Some(false)),
        "bfloat16" => Ok(Some(true)),
        "auto" => Ok(None),
        other => Err(PyValueError::new_err(format!(
            "query_dtype: expected \"auto\", \"float32\" or \"bfloat16\", got {other:?}"
        ))),
    }
}

/// What "auto" scores FP8-quantized queries with here: `DSA_HYBRID_QUERY_DTYPE` when it names a
/// dtype, else bf16 where the CPU runs it faster (`score_bf16::auto_prefers_bf16`); any other value
/// of the variable is ignored, as an unusable `DSA_HYBRID_SIMD` is (the Python package warns of
/// both at import). Unquantized queries stay float32 under "auto" (rounding them would change the
/// function, not only the order of the sums).
pub fn auto_bf16() -> bool {
    let env = std::env::var(QUERY_DTYPE_ENV).unwrap_or_default();
    match env.trim() {
        "float32" => false,
        "bfloat16" => true,
        _ => crate::score_bf16::auto_prefers_bf16(),
    }
}

/// `query_dtype` (`None` is "auto") with `quantize_queries`: whether to score in bf16.
fn query_dtype(obj: Option<&Bound<'_, PyAny>>, quantize: bool) -> PyResult<bool> {
    let choice = match obj.filter(|o| !o.is_none()) {
        None => None,
        Some(obj) => parse_query_dtype(&args::string("query_dtype", obj)?)?,
    };
    match choice {
        Some(bf16) => Ok(bf16),
        None => Ok(quantize && auto_bf16()),
    }
}

impl Opts {
    pub fn new(
        k: &Bound<'_, PyAny>,
        as_slots: Option<&Bound<'_, PyAny>>,
        quantize: Option<&Bound<'_, PyAny>>,
        sorted: Option<&Bound<'_, PyAny>>,
        threads: Option<&Bound<'_, PyAny>>,
        dtype: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let quantize = args::flag("quantize_queries", quantize, true)?;
        Ok(Opts {
            bf16: query_dtype(dtype, quantize)?,
            k: args::k(k)?,
            as_slots: args::flag("as_slots", as_slots, false)?,
            quantize,
            sorted: args::flag("sorted", sorted, false)?,
            threads: args::threads(threads)?,
        })
    }

    pub fn for_scores(
        quantize: Option<&Bound<'_, PyAny>>,
        threads: Option<&Bound<'_, PyAny>>,
        dtype: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let quantize = args::flag("quantize_queries", quantize, true)?;
        Ok(Opts {
            bf16: query_dtype(dtype, quantize)?,
            k: 1,
            as_slots: false,
            quantize,
            sorted: false,
            threads: args::threads(threads)?,
        })
    }
}

/// `q [T, H, D]` and `weights [T, H]` converted, with their sizes.
type QueryArrays<'py> = (
    numpy::PyReadonlyArray3<'py, f32>,
    PyReadonlyArray2<'py, f32>,
    [usize; 3],
);

fn query_arrays<'py>(
    q: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
) -> PyResult<QueryArrays<'py>> {
    let q = args::array::<f32, Ix3>("q", q)?;
    let weights = args::array::<f32, Ix2>("weights", weights)?;
    let (t, h, d) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    if weights.shape() != [t, h] {
        return Err(PyValueError::new_err(format!(
            "weights: expected [{t}, {h}] for q of {:?}, got {:?}",
            q.shape(),
            weights.shape()
        )));
    }
    Ok((q, weights, [t, h, d]))
}

/// The body both calls share: `run` on the cache, its pages, the checked queries and the rows,
/// with the GIL released; errors named (`select_err`).
fn run_rows<R: Send>(
    cache: &PyIndexerKeyCache,
    py: Python<'_>,
    rows: &RowsArg<'_>,
    arrays: &QueryArrays<'_>,
    o: Opts,
    run: impl FnOnce(&IndexerKeyCache, &[u8], &Queries<'_>, RowSource<'_>) -> Result<R, CacheError>
        + Send,
) -> PyResult<R> {
    let (q, weights, [t, h, d]) = arrays;
    let (qs, ws) = (args::slice("q", q)?, args::slice("weights", weights)?);
    let rows = rows.slices()?;
    cache
        .with_pages(py, |c, pages| {
            let queries = Queries::new(qs, ws, *t, *h, *d, o.quantize)
                .map_err(CacheError::Shape)?
                .with_bf16(o.bf16);
            run(c, pages, &queries, rows)
        })
        .map_err(select_err)
}

/// `select` (sequence rows) or `select_paged` (table rows): int32 `[T, k]`.
pub fn select<'py>(
    cache: &PyIndexerKeyCache,
    py: Python<'py>,
    rows: RowsArg<'py>,
    q: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
    o: Opts,
) -> PyResult<Bound<'py, PyArray2<i32>>> {
    let arrays = query_arrays(q, weights)?;
    let t = arrays.2[0];
    // Refused before any work: an output past the limit (allocation failures come later).
    mem::check_size::<i32>(t, o.k)
        .map_err(|e| PyMemoryError::new_err(format!("k: the [{t}, {}] int32 output: {e}", o.k)))?;
    let opts = SelectOptions {
        k: o.k,
        as_slots: o.as_slots,
        by_score: o.sorted,
        threads: o.threads,
        isa: cpu::active(),
    };
    let out = run_rows(cache, py, &rows, &arrays, o, |c, pages, queries, src| {
        select::select(c, pages, queries, src, opts)
    })?;
    array2(py, t, o.k, out)
}

/// `scores` (sequence rows) or `scores_paged` (table rows): float32 `[T, max(p) + 1]`.
pub fn scores<'py>(
    cache: &PyIndexerKeyCache,
    py: Python<'py>,
    rows: RowsArg<'py>,
    q: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
    o: Opts,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let arrays = query_arrays(q, weights)?;
    let isa = cpu::active();
    let (out, l) = run_rows(cache, py, &rows, &arrays, o, |c, pages, queries, src| {
        select::scores(c, pages, queries, src, o.threads, isa)
    })?;
    array2(py, arrays.2[0], l, out)
}

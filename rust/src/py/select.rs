//! The bodies of `IndexerKeyCache.select` / `.scores` and their paged twins: argument checks, the
//! queries borrowed zero-copy, one call of the core with the GIL released, errors named.

use numpy::{
    PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::cache::PyIndexerKeyCache;
use super::errors::select_err;
use super::{array2, contiguous, thread_count};
use crate::cpu;
use crate::indexer_cache::CacheError;
use crate::select::{self, Queries, SelectOptions};

/// Where the rows' block tables come from.
pub enum RowsArg<'a, 'py> {
    /// The cache's own sequences: `seq_ids [T]`, `positions [T]`.
    Sequences {
        seq_ids: &'a PyReadonlyArray1<'py, i64>,
        positions: &'a PyReadonlyArray1<'py, i64>,
    },
    /// External tables: `block_tables [T, W]` int32, `positions [T]`.
    Paged {
        tables: &'a PyReadonlyArray2<'py, i32>,
        positions: &'a PyReadonlyArray1<'py, i64>,
    },
}

/// The rows as plain slices.
#[derive(Clone, Copy)]
enum Rows<'a> {
    Sequences {
        seq_ids: &'a [i64],
        positions: &'a [i64],
    },
    Paged {
        tables: &'a [i32],
        width: usize,
        positions: &'a [i64],
    },
}

impl<'a, 'py> RowsArg<'a, 'py> {
    pub fn sequences(
        seq_ids: &'a PyReadonlyArray1<'py, i64>,
        positions: &'a PyReadonlyArray1<'py, i64>,
    ) -> Self {
        RowsArg::Sequences { seq_ids, positions }
    }

    pub fn paged(
        tables: &'a PyReadonlyArray2<'py, i32>,
        positions: &'a PyReadonlyArray1<'py, i64>,
    ) -> Self {
        RowsArg::Paged { tables, positions }
    }

    fn slices(&self) -> PyResult<Rows<'_>> {
        Ok(match self {
            RowsArg::Sequences { seq_ids, positions } => Rows::Sequences {
                seq_ids: contiguous("seq_ids", seq_ids.as_slice())?,
                positions: contiguous("positions", positions.as_slice())?,
            },
            RowsArg::Paged { tables, positions } => Rows::Paged {
                tables: contiguous("block_tables", tables.as_slice())?,
                width: tables.shape()[1],
                positions: contiguous("positions", positions.as_slice())?,
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
}

impl Opts {
    pub fn new(
        k: usize,
        as_slots: bool,
        quantize: bool,
        sorted: bool,
        threads: Option<usize>,
    ) -> PyResult<Self> {
        Ok(Opts {
            k,
            as_slots,
            quantize,
            sorted,
            threads: thread_count(threads)?,
        })
    }
}

/// `q [T, H, D]` and `weights [T, H]` as slices, with their sizes.
fn query_slices<'a>(
    q: &'a PyReadonlyArray3<'_, f32>,
    weights: &'a PyReadonlyArray2<'_, f32>,
) -> PyResult<(&'a [f32], &'a [f32], [usize; 3])> {
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
    Ok((qs, ws, [t, h, d]))
}

/// `select` (sequence rows) or `select_paged` (table rows): int32 `[T, k]`.
pub fn select<'py>(
    cache: &PyIndexerKeyCache,
    py: Python<'py>,
    rows: RowsArg<'_, 'py>,
    q: &PyReadonlyArray3<'py, f32>,
    weights: &PyReadonlyArray2<'py, f32>,
    o: Opts,
) -> PyResult<Bound<'py, PyArray2<i32>>> {
    let (qs, ws, [t, h, d]) = query_slices(q, weights)?;
    let rows = rows.slices()?;
    let opts = SelectOptions {
        k: o.k,
        as_slots: o.as_slots,
        by_score: o.sorted,
        threads: o.threads,
        isa: cpu::active(),
    };
    let out = cache
        .with_pages(py, |c, pages| {
            let queries = Queries::new(qs, ws, t, h, d, o.quantize).map_err(CacheError::Shape)?;
            match rows {
                Rows::Sequences { seq_ids, positions } => {
                    select::select(c, pages, &queries, seq_ids, positions, opts)
                }
                Rows::Paged {
                    tables,
                    width,
                    positions,
                } => select::select_paged(
                    c.geometry(),
                    pages,
                    &queries,
                    tables,
                    width,
                    positions,
                    opts,
                ),
            }
        })
        .map_err(select_err)?;
    array2(py, t, o.k, out)
}

/// `scores` (sequence rows) or `scores_paged` (table rows): float32 `[T, max(p) + 1]`.
pub fn scores<'py>(
    cache: &PyIndexerKeyCache,
    py: Python<'py>,
    rows: RowsArg<'_, 'py>,
    q: &PyReadonlyArray3<'py, f32>,
    weights: &PyReadonlyArray2<'py, f32>,
    o: Opts,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let (qs, ws, [t, h, d]) = query_slices(q, weights)?;
    let rows = rows.slices()?;
    let isa = cpu::active();
    let (out, l) = cache
        .with_pages(py, |c, pages| {
            let queries = Queries::new(qs, ws, t, h, d, o.quantize).map_err(CacheError::Shape)?;
            match rows {
                Rows::Sequences { seq_ids, positions } => {
                    select::scores(c, pages, &queries, seq_ids, positions, o.threads, isa)
                }
                Rows::Paged {
                    tables,
                    width,
                    positions,
                } => select::scores_paged(
                    c.geometry(),
                    pages,
                    &queries,
                    tables,
                    width,
                    positions,
                    o.threads,
                    isa,
                ),
            }
        })
        .map_err(select_err)?;
    array2(py, t, l, out)
}

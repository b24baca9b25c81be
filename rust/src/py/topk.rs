//! Stand-alone top-k of float32 rows (dsa.md §5).

use numpy::{PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::{array2, contiguous, thread_count};
use crate::{cpu, topk};

/// Top-k of each row of float32 `scores` `[T, L]` (dsa.md §5); see `dsa_hybrid.topk`.
#[pyfunction]
#[pyo3(name = "topk", signature = (scores, k, lengths = None, *, sorted = false, threads = None))]
pub fn topk_rows<'py>(
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
    array2(py, t, k, out)
}

//! Stand-alone top-k of float32 rows (dsa.md §5).

use numpy::{PyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::{PyMemoryError, PyValueError};
use pyo3::prelude::*;

use super::{args, array2, guard};
use crate::topk::{self, TopkError};
use crate::{cpu, mem};

/// Top-k of each row of float32 `scores` `[T, L]` (dsa.md §5); see `dsa_hybrid.topk`.
#[pyfunction]
#[pyo3(name = "topk", signature = (scores, k, lengths = None, *, sorted = None, threads = None))]
pub fn topk_rows<'py>(
    py: Python<'py>,
    scores: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    lengths: Option<&Bound<'py, PyAny>>,
    sorted: Option<&Bound<'py, PyAny>>,
    threads: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArray2<i32>>> {
    guard("topk", || {
        let scores = args::array::<f32, numpy::Ix2>("scores", scores)?;
        let (t, l) = (scores.shape()[0], scores.shape()[1]);
        let k = args::k(k)?;
        let lengths = args::opt_array::<i64, numpy::Ix1>("lengths", lengths)?;
        let sorted = args::flag("sorted", sorted, false)?;
        let threads = args::threads(threads)?;
        if l > topk::MAX_ROW_LEN {
            return Err(PyValueError::new_err(format!(
                "scores: {}",
                TopkError::RowTooLong { len: l }
            )));
        }
        // Refused before the work (and before the lengths are converted): an absurd k.
        mem::check_size::<i32>(t, k)
            .map_err(|e| PyMemoryError::new_err(format!("k: the [{t}, {k}] int32 output: {e}")))?;
        let rows = args::slice("scores", &scores)?;
        let lens: Vec<usize> = match &lengths {
            None => vec![l; t],
            Some(a) => {
                let a = args::slice("lengths", a)?;
                if a.len() != t {
                    return Err(PyValueError::new_err(format!(
                        "lengths: {} entries for {t} rows",
                        a.len()
                    )));
                }
                if let Some((i, v)) = a
                    .iter()
                    .enumerate()
                    .find(|(_, v)| !matches!(usize::try_from(**v), Ok(v) if v <= l))
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
            .map_err(|e| match e {
                TopkError::Nan { .. } | TopkError::RowTooLong { .. } => {
                    PyValueError::new_err(format!("scores: {e}"))
                }
                TopkError::K { .. } => PyValueError::new_err(format!("k: {e}")),
                TopkError::Alloc(_) => PyMemoryError::new_err(format!("k: {e}")),
                TopkError::Shape(m) => PyValueError::new_err(m),
            })?;
        array2(py, t, k, out)
    })
}

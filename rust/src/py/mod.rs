//! The PyO3 bindings (feature `python`), split by concept. They only translate: check arguments
//! and name the one at fault, borrow numpy buffers zero-copy, release the GIL for the real work,
//! and map the core's errors to Python exceptions (`errors`). Nothing here panics on bad input.

pub mod cache;
pub mod cpu;
pub mod errors;
pub mod pool;
pub mod quant;
mod select;
pub mod topk;

use numpy::AsSliceError;
use pyo3::exceptions::PyValueError;
use pyo3::PyResult;

/// The slice of a C-contiguous array, or ValueError naming `arg`.
fn contiguous<'a, T>(arg: &str, r: Result<&'a [T], AsSliceError>) -> PyResult<&'a [T]> {
    r.map_err(|_| PyValueError::new_err(format!("{arg}: must be a C-contiguous array")))
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

/// `v` as a numpy `[rows, cols]` array (no copy).
fn array2<T: numpy::Element>(
    py: pyo3::Python<'_>,
    rows: usize,
    cols: usize,
    v: Vec<T>,
) -> PyResult<pyo3::Bound<'_, numpy::PyArray2<T>>> {
    use numpy::IntoPyArray;
    numpy::ndarray::Array2::from_shape_vec((rows, cols), v)
        .map(|a| a.into_pyarray(py))
        .map_err(|e| PyValueError::new_err(format!("output shape: {e}")))
}

/// Block ids or slots from any 1-D integer array or sequence: an int64 or int32 numpy array is
/// read in place, anything else (a list, a range, other integer dtypes) converted element-wise.
/// TypeError naming `arg` for non-integers.
fn int_list(arg: &str, obj: &pyo3::Bound<'_, pyo3::PyAny>) -> PyResult<Vec<i64>> {
    use numpy::PyReadonlyArray1;
    use pyo3::types::{PyAnyMethods, PyString, PyTypeMethods};
    if let Ok(a) = obj.extract::<PyReadonlyArray1<'_, i64>>() {
        return Ok(a.as_array().to_vec());
    }
    if let Ok(a) = obj.extract::<PyReadonlyArray1<'_, i32>>() {
        return Ok(a.as_array().iter().map(|b| i64::from(*b)).collect());
    }
    let bad = || {
        pyo3::exceptions::PyTypeError::new_err(format!(
            "{arg}: expected a 1-D sequence or array of integers, got {}",
            obj.get_type()
                .name()
                .map_or_else(|_| "?".to_owned(), |n| n.to_string())
        ))
    };
    if obj.is_instance_of::<PyString>() {
        return Err(bad());
    }
    obj.extract::<Vec<i64>>().map_err(|_| bad())
}

//! FP8 e4m3fn quantization of rows (Hadamard + power-of-two scales) and the decode table.

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::{PyMemoryError, PyValueError};
use pyo3::prelude::*;

use super::{args, guard};
use crate::{fp8, mem, quant};

/// Quantize rows of a float32 `[n, d]` array to FP8 e4m3fn with one
/// power-of-two scale per row (dsa.md §4); with `hadamard=True` each row is
/// first rotated by the orthonormal Hadamard matrix. Returns
/// `(codes uint8 [n, d], scales float32 [n])`, bit-identical to
/// `reference.quantize_fp8(reference.hadamard(x))`.
#[pyfunction]
#[pyo3(signature = (x, *, hadamard = None))]
#[allow(clippy::type_complexity)]
pub fn fp8_quantize_rows<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    hadamard: Option<&Bound<'py, PyAny>>,
) -> PyResult<(Bound<'py, PyArray2<u8>>, Bound<'py, PyArray1<f32>>)> {
    guard("fp8_quantize_rows", || {
        let x = args::array::<f32, numpy::Ix2>("x", x)?;
        let hadamard = args::flag("hadamard", hadamard, true)?;
        let (n, d) = (x.shape()[0], x.shape()[1]);
        let rows = args::slice("x", &x)?;
        let oom = |e: mem::AllocError| PyMemoryError::new_err(format!("x: the output: {e}"));
        let mut codes = mem::try_matrix(n, d, 0u8).map_err(oom)?;
        let mut scales = mem::try_filled(n, 0f32).map_err(oom)?;
        py.detach(|| quant::quantize_rows(rows, d, hadamard, &mut codes, &mut scales))
            .map_err(|e| PyValueError::new_err(format!("x: {e}")))?;
        let codes = Array2::from_shape_vec((n, d), codes)
            .map_err(|e| PyValueError::new_err(format!("x: {e}")))?;
        Ok((codes.into_pyarray(py), scales.into_pyarray(py)))
    })
}

/// The float32 value of each of the 256 e4m3fn codes (index = code).
#[pyfunction]
pub fn fp8_decode_table(py: Python<'_>) -> PyResult<Bound<'_, PyArray1<f32>>> {
    guard("fp8_decode_table", || {
        Ok(fp8::DECODE_TABLE.to_vec().into_pyarray(py))
    })
}

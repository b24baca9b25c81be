//! dsa_hybrid host core: the Rust half of DeepSeek Sparse Attention on CPU/TPU.
//!
//! The core modules are plain Rust with their own `cargo test`; the PyO3
//! bindings (feature `python`, turned on by maturin) only check arguments,
//! release the GIL and map errors to Python exceptions.

pub mod cpu;
pub mod fp8;
pub mod hadamard;
pub mod indexer_cache;
pub mod pool;
pub mod quant;

#[cfg(feature = "python")]
mod bindings {
    use numpy::ndarray::{Array1, Array2};
    use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray2, PyUntypedArrayMethods};
    use pyo3::exceptions::PyValueError;
    use pyo3::prelude::*;
    use pyo3::types::PyDict;

    use crate::{cpu, fp8, quant};

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

    /// The float32 value of each of the 256 e4m3fn codes (index = code).
    #[pyfunction]
    fn fp8_decode_table(py: Python<'_>) -> Bound<'_, PyArray1<f32>> {
        Array1::from_vec(fp8::DECODE_TABLE.to_vec()).into_pyarray(py)
    }

    #[pymodule]
    #[pyo3(name = "_core")]
    fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add_function(wrap_pyfunction!(cpu_features, m)?)?;
        m.add_function(wrap_pyfunction!(fp8_quantize_rows, m)?)?;
        m.add_function(wrap_pyfunction!(fp8_decode_table, m)?)?;
        Ok(())
    }
}

//! What the core detected on this CPU, and the SIMD path its kernels use.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::cpu;

/// Detected CPU features (name -> bool) and the SIMD path in use.
#[pyfunction]
pub fn cpu_features(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for (name, present) in cpu::features() {
        d.set_item(name, present)?;
    }
    d.set_item("simd_path", cpu::simd_path())?;
    Ok(d)
}

/// Make the kernels use the named SIMD path (`None`: the widest the CPU has);
/// returns the path now in use. Refused with ValueError when the CPU lacks it.
#[pyfunction]
#[pyo3(signature = (name = None))]
pub fn set_simd_path(name: Option<&str>) -> PyResult<&'static str> {
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

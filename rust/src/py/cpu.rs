//! What the core detected on this CPU, and the SIMD path its kernels use.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::{args, guard};
use crate::cpu;

/// Detected CPU features (name -> bool) and the SIMD path in use.
#[pyfunction]
pub fn cpu_features(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    guard("cpu_features", || {
        let d = PyDict::new(py);
        for (name, present) in cpu::features() {
            d.set_item(name, present)?;
        }
        d.set_item("simd_path", cpu::simd_path())?;
        // What `query_dtype="auto"` scores FP8-quantized indexer queries with on this CPU.
        let auto = if super::select::auto_bf16() {
            "bfloat16"
        } else {
            "float32"
        };
        d.set_item("indexer_query_dtype", auto)?;
        Ok(d)
    })
}

/// Make the kernels use the named SIMD path (`None`: the widest the CPU has);
/// returns the path now in use. ValueError naming the path when it is unknown or the CPU lacks it.
#[pyfunction]
#[pyo3(signature = (name = None))]
pub fn set_simd_path(name: Option<&Bound<'_, PyAny>>) -> PyResult<&'static str> {
    guard("set_simd_path", || {
        let isa = match name {
            None => None,
            Some(n) if n.is_none() => None,
            Some(n) => {
                let n = args::string("name", n).map_err(|_| {
                    PyTypeError::new_err(format!(
                        "name: expected a str or None, got {}",
                        args::type_name(n)
                    ))
                })?;
                Some(cpu::Isa::from_name(&n).ok_or_else(|| {
                    PyValueError::new_err(format!(
                        "name: unknown SIMD path {n:?} (one of {})",
                        cpu::Isa::ALL.map(|i| i.name()).join(", ")
                    ))
                })?)
            }
        };
        cpu::set_active(isa)
            .map(|i| i.name())
            .map_err(|e| PyValueError::new_err(format!("name: {e}")))
    })
}

/// Run the FMA-peak loop (`peak.rs`) `iters` times on the SIMD path in use, with the GIL
/// released; returns the floating-point operations it did (time it to get the peak).
#[pyfunction]
pub fn fma_loop(py: Python<'_>, iters: &Bound<'_, PyAny>) -> PyResult<u64> {
    guard("fma_loop", || {
        let iters = args::int_in("iters", iters, 0, 1 << 40)? as u64;
        let isa = cpu::active();
        let (values, flops) = py.detach(|| crate::peak::fma_loop(isa, iters));
        // Used, so the loop is not optimised away.
        std::hint::black_box(values);
        Ok(flops)
    })
}

//! The XLA FFI handlers (`crate::ffi`) as PyCapsules, for `jax.ffi.register_ffi_target`.

use std::ffi::c_void;
use std::ptr::NonNull;

use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyDict};

use super::guard;
use crate::ffi;

/// `{target name: PyCapsule of its XLA FFI handler}`: register each with
/// `jax.ffi.register_ffi_target(name, capsule, platform="cpu", api_version=1)`
/// (`dsa_hybrid.ops.cpu_kernels` does, on first use).
#[pyfunction]
pub fn ffi_targets(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    guard("ffi_targets", || {
        type Handler = unsafe extern "C" fn(*mut ffi::CallFrame) -> *mut ffi::FfiError;
        let handlers: [(&str, Handler); 2] = [
            (ffi::SPARSE_MLA_F32, ffi::sparse_mla_f32),
            (ffi::INDEXER_SELECT, ffi::indexer_select),
        ];
        let d = PyDict::new(py);
        for (name, handler) in handlers {
            let ptr = NonNull::new(handler as *mut c_void)
                .ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("null handler"))?;
            // SAFETY: a function pointer with static lifetime (this library stays loaded while
            // Python runs), handed to XLA as an FFI handler; the capsule owns nothing.
            let capsule =
                unsafe { PyCapsule::new_with_pointer(py, ptr, c"xla._CUSTOM_CALL_TARGET") }?;
            d.set_item(name, capsule)?;
        }
        Ok(d)
    })
}

/// The address of the latent buffer the last successful `dsa_hybrid_sparse_mla_f32` call read
/// (0 before the first): a diagnostic that shows the cache is read in place.
#[pyfunction]
pub fn ffi_last_kv_address() -> PyResult<usize> {
    guard("ffi_last_kv_address", || Ok(ffi::last_kv_address()))
}

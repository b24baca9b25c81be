//! dsa_hybrid host core: the Rust half of DeepSeek Sparse Attention on CPU/TPU.
//!
//! The core modules are plain Rust with their own `cargo test`; the PyO3
//! bindings (feature `python`, turned on by maturin) live in `py/`, split by
//! concept, and only check arguments, release the GIL and map errors to Python
//! exceptions. This file declares the modules, registers the Python module and words a caught
//! panic's message for both boundaries (Python and XLA's FFI).

pub mod cpu;
pub mod ffi;
pub mod fp8;
pub mod hadamard;
pub mod indexer_cache;
pub mod mem;
pub mod mla;
pub mod par;
pub mod peak;
pub mod pool;
pub mod quant;
pub mod score;
pub mod score_bf16;
pub mod select;
pub mod topk;

/// The message a caught panic becomes at a boundary (Python's `InternalError` in `py::guard`, an
/// XLA INTERNAL error in `ffi`): the call's name, that it is a bug, and the panic's own message.
pub fn internal_error_message(call: &str, payload: &(dyn std::any::Any + Send)) -> String {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    format!("{call}: internal error (a bug in dsa_hybrid's Rust core, please report it): {msg}")
}

/// A seeded generator for the unit tests: 31 random bits per call (a 64-bit LCG's high bits).
#[cfg(test)]
pub(crate) fn test_rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        x >> 33
    }
}

#[cfg(feature = "python")]
mod py;

/// The extension module `dsa_hybrid._core` (typed in `python/dsa_hybrid/_core.pyi`).
#[cfg(feature = "python")]
#[pyo3::pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
    use pyo3::prelude::*;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(py::cpu::cpu_features, m)?)?;
    m.add_function(wrap_pyfunction!(py::cpu::set_simd_path, m)?)?;
    m.add_function(wrap_pyfunction!(py::cpu::fma_loop, m)?)?;
    m.add_function(wrap_pyfunction!(py::quant::fp8_quantize_rows, m)?)?;
    m.add_function(wrap_pyfunction!(py::quant::fp8_decode_table, m)?)?;
    m.add_function(wrap_pyfunction!(py::topk::topk_rows, m)?)?;
    m.add_function(wrap_pyfunction!(py::mla::sparse_mla, m)?)?;
    m.add_function(wrap_pyfunction!(py::ffi::ffi_targets, m)?)?;
    m.add_function(wrap_pyfunction!(py::ffi::ffi_last_kv_address, m)?)?;
    m.add_function(wrap_pyfunction!(py::test_panic, m)?)?;
    m.add_class::<py::cache::PyIndexerKeyCache>()?;
    m.add_class::<py::cache::PageBuffer>()?;
    m.add_class::<py::pool::PyBlockPool>()?;
    m.add(
        "CacheFullError",
        m.py().get_type::<py::errors::CacheFullError>(),
    )?;
    m.add(
        "InternalError",
        m.py().get_type::<py::errors::InternalError>(),
    )?;
    Ok(())
}

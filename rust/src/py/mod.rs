//! The PyO3 bindings (feature `python`), split by concept. They only translate: check arguments
//! and name the one at fault, borrow numpy buffers zero-copy, release the GIL for the real work,
//! and map the core's errors to Python exceptions (`errors`).
//!
//! Two rules every entry point follows:
//! - its body runs inside `guard`, so a Rust panic (a bug) becomes `InternalError` (a
//!   `RuntimeError`) naming the call, never pyo3's `PanicException` (a `BaseException`);
//! - its arguments arrive as plain Python objects and are converted here (`args`), so every
//!   refusal is an ordinary exception whose message starts with the argument's name.

pub mod args;
pub mod cache;
pub mod cpu;
pub mod errors;
pub mod ffi;
pub mod mla;
pub mod pool;
pub mod quant;
mod select;
pub mod topk;

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use errors::InternalError;

/// Run the body of the entry point `call`, turning a panic into `InternalError("{call}: ...")`.
///
/// The panic payload's message is kept (the default hook has already printed it, with its
/// location, to stderr). Shared state stays usable: every call checks before it changes
/// anything, and the locks recover from poisoning.
pub fn guard<T>(call: &str, f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(InternalError::new_err(crate::internal_error_message(
            call, &*payload,
        ))),
    }
}

/// `v` as a numpy `[rows, cols]` array (no copy).
fn array2<T: numpy::Element>(
    py: Python<'_>,
    rows: usize,
    cols: usize,
    v: Vec<T>,
) -> PyResult<Bound<'_, numpy::PyArray2<T>>> {
    use numpy::IntoPyArray;
    numpy::ndarray::Array2::from_shape_vec((rows, cols), v)
        .map(|a| a.into_pyarray(py))
        .map_err(|e| PyValueError::new_err(format!("output shape: {e}")))
}

/// A test hook (`_core._test_panic`): panic on purpose, so the tests can see a panic become
/// `InternalError` — on the calling thread ("direct"), with the GIL released ("detached") or in a
/// worker thread of a pool ("worker").
#[pyfunction]
#[pyo3(name = "_test_panic")]
pub fn test_panic(py: Python<'_>, mode: &Bound<'_, PyAny>) -> PyResult<()> {
    guard("_test_panic", || {
        let mode = args::string("mode", mode)?;
        match mode.as_str() {
            "direct" => panic!("test panic on the calling thread"),
            "detached" => py.detach(|| panic!("test panic with the GIL released")),
            "worker" => py.detach(|| {
                let w = crate::par::Workers::new(2);
                let mut out = vec![0u8; 4];
                let _ = w.run(|| {
                    crate::par::for_each_row_chunk(
                        &mut out,
                        1,
                        2,
                        || (),
                        |row, _, _| -> Result<(), ()> {
                            if row == 3 {
                                panic!("test panic in a worker thread");
                            }
                            Ok(())
                        },
                    )
                });
            }),
            other => {
                return Err(PyValueError::new_err(format!(
                    "mode: expected \"direct\", \"detached\" or \"worker\", got {other:?}"
                )))
            }
        }
        Ok(())
    })
}

//! The core's errors as Python exceptions, each message starting with the argument at fault:
//! `KeyError` (unknown sequence), `IndexError` (a position, slot, block or page out of range),
//! `CacheFullError` (too few free blocks; with `wanted` and `free` attributes), `MemoryError` (an
//! output or buffer too large to allocate, or past the 2^40-byte limit), `ValueError`
//! (everything else: shapes, NaN, duplicates, a free block released), and `InternalError` for
//! a panic caught at the binding boundary (a bug).

use pyo3::create_exception;
use pyo3::exceptions::{PyIndexError, PyKeyError, PyMemoryError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::indexer_cache::CacheError;
use crate::pool::PoolError;

create_exception!(
    _core,
    CacheFullError,
    PyRuntimeError,
    "The block pool has too few free blocks for the request; nothing was written."
);

create_exception!(
    _core,
    InternalError,
    PyRuntimeError,
    "A bug in the Rust core (a panic), caught at the binding boundary; the message names the call. \
     The call's object is as before it (every call checks before it changes anything)."
);

/// CacheFullError with `msg`, its `wanted` and `free` attributes set (`wanted` any Python int).
pub fn cache_full_with<'py>(
    py: Python<'py>,
    msg: String,
    wanted: impl IntoPyObject<'py>,
    free: usize,
) -> PyErr {
    let err = CacheFullError::new_err(msg);
    let value = err.value(py);
    // Setting attributes on a fresh exception instance does not fail.
    let _ = value.setattr("wanted", wanted);
    let _ = value.setattr("free", free);
    err
}

/// CacheFullError with `msg`, its `wanted` and `free` attributes set.
fn cache_full(msg: String, wanted: usize, free: usize) -> PyErr {
    Python::attach(|py| cache_full_with(py, msg, wanted, free))
}

/// `arg: message` as the Python exception that fits a cache error.
pub fn cache_err(arg: &str, e: CacheError) -> PyErr {
    let msg = format!("{arg}: {e}");
    match e {
        CacheError::UnknownSequence(_) => PyKeyError::new_err(msg),
        CacheError::PoolExhausted { needed, free } => cache_full(msg, needed, free),
        CacheError::Pool(p) => pool_err(arg, p),
        // Named after the argument that sized the buffer, whichever argument the call blames.
        CacheError::Alloc { arg, .. } => PyMemoryError::new_err(format!("{arg}: {e}")),
        CacheError::Position { .. }
        | CacheError::NegativePosition { .. }
        | CacheError::PositionTooLarge { .. }
        | CacheError::Slot { .. }
        | CacheError::Block { .. }
        | CacheError::TableTooNarrow { .. }
        | CacheError::BadPage { .. } => PyIndexError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

/// `arg: message` as the Python exception that fits a pool error.
pub fn pool_err(arg: &str, e: PoolError) -> PyErr {
    let msg = format!("{arg}: {e}");
    match e {
        PoolError::Exhausted { wanted, free } => cache_full(msg, wanted, free),
        PoolError::OutOfRange { .. } => PyIndexError::new_err(msg),
        PoolError::Alloc(_) => PyMemoryError::new_err(msg),
        PoolError::TooManyBlocks { .. }
        | PoolError::NotHeld { .. }
        | PoolError::RefcountOverflow { .. } => PyValueError::new_err(msg),
    }
}

/// Errors of `select`, `scores` and their paged twins, named after the argument at fault.
pub fn select_err(e: CacheError) -> PyErr {
    match e {
        CacheError::UnknownSequence(_) => cache_err("seq_ids", e),
        CacheError::Position { .. }
        | CacheError::NegativePosition { .. }
        | CacheError::PositionTooLarge { .. } => cache_err("positions", e),
        CacheError::TableTooNarrow { .. } | CacheError::BadPage { .. } => {
            cache_err("block_tables", e)
        }
        CacheError::NonFiniteScore { .. } => cache_err("q, weights", e),
        CacheError::Alloc { .. } => cache_err("", e),
        // Shape errors already name their argument.
        other => PyValueError::new_err(other.to_string()),
    }
}

//! Converting Python arguments, each error naming the argument (`"k: ..."`).
//!
//! The entry points take their arguments as plain objects and convert them here rather than let
//! pyo3 do it: pyo3's conversion errors are `OverflowError`s and `TypeError`s whose message does
//! not name the argument (only a note does), and a negative or huge int would never reach a check.
//!
//! - ints: Python ints or anything with `__index__` (numpy integers); never a bool or a float
//!   (TypeError). Values of any size arrive, so a range check can say what is wrong with them.
//! - arrays: numpy arrays of exactly the dtype (native byte order) and number of dimensions,
//!   C-contiguous and aligned. TypeError for a non-array or another dtype, ValueError for the
//!   rest; the message says which.

use numpy::{
    Element, PyArray, PyArrayDescrMethods, PyArrayMethods, PyReadonlyArray, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyInt, PyString};

use crate::par::MAX_THREADS;
use crate::topk::MAX_K;

/// An int argument: its value, or the fact that it is outside int64 (and its sign).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int {
    Small(i64),
    Big { negative: bool },
}

impl Int {
    /// The value clamped into int64 (a Big one becomes `i64::MIN` or `i64::MAX`).
    pub fn saturating(self) -> i64 {
        match self {
            Int::Small(v) => v,
            Int::Big { negative: true } => i64::MIN,
            Int::Big { negative: false } => i64::MAX,
        }
    }
}

/// The Python type name of `obj`, for messages.
pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map_or_else(|_| "?".to_owned(), |n| n.to_string())
}

/// `obj` as an int (anything with `__index__`, not a bool); TypeError naming `name` otherwise.
pub fn int(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<Int> {
    let not_int =
        || PyTypeError::new_err(format!("{name}: expected an int, got {}", type_name(obj)));
    if obj.is_instance_of::<PyBool>() || type_name(obj) == "bool" {
        return Err(not_int());
    }
    let value = if obj.is_instance_of::<PyInt>() {
        obj.clone()
    } else {
        // SAFETY: `obj` is a valid object; PyNumber_Index returns a new reference or NULL.
        let r = unsafe { pyo3::ffi::PyNumber_Index(obj.as_ptr()) };
        if r.is_null() {
            // Drop the TypeError Python set; ours names the argument.
            let _ = PyErr::take(obj.py());
            return Err(not_int());
        }
        // SAFETY: a new, non-null reference.
        unsafe { Bound::from_owned_ptr(obj.py(), r) }
    };
    match value.extract::<i64>() {
        Ok(v) => Ok(Int::Small(v)),
        Err(_) => Ok(Int::Big {
            negative: value.lt(0i64)?,
        }),
    }
}

/// An int in `[lo, hi]`; ValueError `"{name}: must be in [lo, hi], got v"` otherwise.
pub fn int_in(name: &str, obj: &Bound<'_, PyAny>, lo: i64, hi: i64) -> PyResult<i64> {
    match int(name, obj)? {
        Int::Small(v) if (lo..=hi).contains(&v) => Ok(v),
        _ => Err(PyValueError::new_err(format!(
            "{name}: must be in [{lo}, {hi}], got {obj}"
        ))),
    }
}

/// A count `>= 0` (any size: huge ones saturate to `usize::MAX`); ValueError if negative.
pub fn count(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<usize> {
    match int(name, obj)? {
        Int::Small(v) if v >= 0 => Ok(usize::try_from(v).unwrap_or(usize::MAX)),
        Int::Big { negative: false } => Ok(usize::MAX),
        _ => Err(PyValueError::new_err(format!(
            "{name}: must be >= 0, got {obj}"
        ))),
    }
}

/// A size argument (`num_blocks`, `block_size`, `head_dim`): an int `>= 0` that fits a usize.
pub fn size(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<usize> {
    int_in(name, obj, 0, i64::MAX).map(|v| v as usize)
}

/// `k`: entries per output row, in `[1, 2**31 - 1]` (positions are int32).
pub fn k(obj: &Bound<'_, PyAny>) -> PyResult<usize> {
    let v = int("k", obj)?.saturating();
    if v < 1 {
        Err(PyValueError::new_err(format!(
            "k: must be at least 1, got {obj}"
        )))
    } else if v as u64 > MAX_K as u64 {
        Err(PyValueError::new_err(format!(
            "k: must be at most {MAX_K} (positions are int32), got {obj}"
        )))
    } else {
        Ok(v as usize)
    }
}

/// `threads`: `None` (one worker per core: the core's 0) or a count in `[1, MAX_THREADS]`.
pub fn threads(obj: Option<&Bound<'_, PyAny>>) -> PyResult<usize> {
    let Some(obj) = obj else { return Ok(0) };
    let v = int("threads", obj)?.saturating();
    if v < 1 {
        Err(PyValueError::new_err(format!(
            "threads: must be at least 1 (or None for one per core), got {obj}"
        )))
    } else if v as u64 > MAX_THREADS as u64 {
        Err(PyValueError::new_err(format!(
            "threads: must be at most {MAX_THREADS}, got {obj}"
        )))
    } else {
        Ok(v as usize)
    }
}

/// A bool flag (Python or numpy bool); TypeError naming `name` for anything else.
pub fn flag(name: &str, obj: Option<&Bound<'_, PyAny>>, default: bool) -> PyResult<bool> {
    let Some(obj) = obj else { return Ok(default) };
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(b.is_true());
    }
    if type_name(obj) == "bool" {
        // numpy.bool_
        return obj.is_truthy();
    }
    Err(PyTypeError::new_err(format!(
        "{name}: expected a bool, got {}",
        type_name(obj)
    )))
}

/// A str argument; TypeError naming `name` otherwise.
pub fn string(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<String> {
    obj.cast::<PyString>()
        .map_err(|_| {
            PyTypeError::new_err(format!("{name}: expected a str, got {}", type_name(obj)))
        })?
        .to_str()
        .map(str::to_owned)
}

/// `obj` as a read-only numpy array of `T` with `D`'s number of dimensions, C-contiguous and
/// aligned (so it can be read as a slice). Errors name `name`.
pub fn array<'py, T: Element, D: numpy::ndarray::Dimension>(
    name: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<PyReadonlyArray<'py, T, D>> {
    let py = obj.py();
    let want = T::get_dtype(py);
    let Ok(arr) = obj.cast::<PyUntypedArray>() else {
        return Err(PyTypeError::new_err(format!(
            "{name}: expected a numpy array of {want}, got {}",
            type_name(obj)
        )));
    };
    let ndim = D::NDIM.unwrap_or(arr.ndim());
    if arr.ndim() != ndim {
        return Err(PyValueError::new_err(format!(
            "{name}: expected {ndim} dimension(s), got shape {:?}",
            arr.shape()
        )));
    }
    let dtype = arr.dtype();
    if !dtype.is_equiv_to(&want) {
        let swapped = dtype.byteorder() != b'=' && dtype.byteorder() != b'|' && {
            // The same kind and size in the other byte order.
            dtype.kind() == want.kind() && dtype.itemsize() == want.itemsize()
        };
        let hint = if swapped {
            format!(" (non-native byte order: .astype(np.{want}) converts it)")
        } else {
            String::new()
        };
        return Err(PyTypeError::new_err(format!(
            "{name}: expected {want}, got {dtype}{hint}"
        )));
    }
    if arr.len() > 0 && !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{name}: must be a C-contiguous array (np.ascontiguousarray makes one)"
        )));
    }
    if arr.len() > 0 && !arr.is_aligned() {
        return Err(PyValueError::new_err(format!(
            "{name}: must be aligned to its {}-byte elements (np.require(x, requirements=\"CA\") makes a copy that is)",
            want.itemsize()
        )));
    }
    obj.cast::<PyArray<T, D>>()
        .map_err(|_| PyTypeError::new_err(format!("{name}: expected {want}")))?
        .try_readonly()
        .map_err(|_| {
            PyValueError::new_err(format!(
                "{name}: the array is being written by another call"
            ))
        })
}

/// `None`, or `array(name, obj)`.
pub fn opt_array<'py, T: Element, D: numpy::ndarray::Dimension>(
    name: &str,
    obj: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<PyReadonlyArray<'py, T, D>>> {
    match obj {
        Some(o) if !o.is_none() => array(name, o).map(Some),
        _ => Ok(None),
    }
}

/// Block ids from any 1-D integer array or sequence (a list, a range, any integer dtype). An
/// entry outside int64 comes back as `i64::MIN` / `i64::MAX` (out of range of every pool).
/// TypeError naming `arg` for anything else (floats, bools, strings, nested sequences, None).
pub fn int_list(arg: &str, obj: &Bound<'_, PyAny>) -> PyResult<Vec<i64>> {
    let bad = || {
        PyTypeError::new_err(format!(
            "{arg}: expected a 1-D sequence or array of integers, got {}",
            type_name(obj)
        ))
    };
    if let Ok(a) = obj.extract::<numpy::PyReadonlyArray1<'_, i64>>() {
        return Ok(a.as_array().to_vec());
    }
    if let Ok(a) = obj.extract::<numpy::PyReadonlyArray1<'_, i32>>() {
        return Ok(a.as_array().iter().map(|b| i64::from(*b)).collect());
    }
    if let Ok(arr) = obj.cast::<PyUntypedArray>() {
        let kind = arr.dtype().kind();
        if arr.ndim() != 1 || !(kind == b'i' || kind == b'u') {
            return Err(bad());
        }
    } else if obj.is_instance_of::<PyString>() || obj.is_none() {
        return Err(bad());
    }
    let mut out = Vec::new();
    for item in obj.try_iter().map_err(|_| bad())? {
        let item = item.map_err(|_| bad())?;
        out.push(int(arg, &item).map_err(|_| bad())?.saturating());
    }
    Ok(out)
}

/// The elements of an array `array` accepted (C-contiguous and aligned), as a slice.
pub fn slice<'a, T: Element, D: numpy::ndarray::Dimension>(
    name: &str,
    a: &'a PyReadonlyArray<'_, T, D>,
) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|_| {
        PyValueError::new_err(format!("{name}: must be a C-contiguous, aligned array"))
    })
}

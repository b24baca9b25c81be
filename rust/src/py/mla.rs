//! Sparse MLA attention on the CPU (dsa.md §3): `dsa_hybrid.host.sparse_mla_host`.

use numpy::{
    Ix2, Ix3, PyArray2, PyArray3, PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyMemoryError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyFloat;

use super::{args, array2, guard};
use crate::cpu;
use crate::mla::{self, Indices, Latent, MlaError, Problem};

/// The dtype kind and item size of an array argument, for dispatch (`None` if it is not an array).
fn dtype_of(obj: &Bound<'_, PyAny>) -> Option<(u8, usize)> {
    let arr = obj.cast::<PyUntypedArray>().ok()?;
    let dt = arr.dtype();
    Some((dt.kind(), dt.itemsize()))
}

/// `(out float32 [T, h, d_v], lse float32 [T, h])`; see `dsa_hybrid.host.sparse_mla_host`.
/// `kv` is float32 `[N, D]` or uint16 `[N, D]` (bfloat16 bit patterns); `indices` int32 or int64
/// `[T, K]`.
#[pyfunction]
#[pyo3(name = "sparse_mla", signature = (q, kv, indices, scale, d_v, *, threads = None))]
#[allow(clippy::type_complexity)]
pub fn sparse_mla<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    kv: &Bound<'py, PyAny>,
    indices: &Bound<'py, PyAny>,
    scale: &Bound<'py, PyAny>,
    d_v: &Bound<'py, PyAny>,
    threads: Option<&Bound<'py, PyAny>>,
) -> PyResult<(Bound<'py, PyArray3<f32>>, Bound<'py, PyArray2<f32>>)> {
    guard("sparse_mla", || {
        let q = args::array::<f32, Ix3>("q", q)?;
        let (t, h, d) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        let kv_f32;
        let kv_u16;
        let kv_lat = match dtype_of(kv) {
            Some((b'u', 2)) => {
                kv_u16 = args::array::<u16, Ix2>("kv", kv)?;
                if kv_u16.shape()[1] != d {
                    return Err(PyValueError::new_err(format!(
                        "kv: expected [N, {d}] (q's width), got {:?}",
                        kv_u16.shape()
                    )));
                }
                Latent::Bf16(args::slice("kv", &kv_u16)?)
            }
            _ => {
                kv_f32 = args::array::<f32, Ix2>("kv", kv)?;
                if kv_f32.shape()[1] != d {
                    return Err(PyValueError::new_err(format!(
                        "kv: expected [N, {d}] (q's width), got {:?}",
                        kv_f32.shape()
                    )));
                }
                Latent::F32(args::slice("kv", &kv_f32)?)
            }
        };
        let idx32;
        let idx64;
        let (idx, k) = match dtype_of(indices) {
            Some((b'i', 4)) => {
                idx32 = args::array::<i32, Ix2>("indices", indices)?;
                let k = idx32.shape()[1];
                if idx32.shape()[0] != t {
                    return Err(PyValueError::new_err(format!(
                        "indices: expected [{t}, K] (q's rows), got {:?}",
                        idx32.shape()
                    )));
                }
                (Indices::I32(args::slice("indices", &idx32)?), k)
            }
            _ => {
                idx64 = args::array::<i64, Ix2>("indices", indices)?;
                let k = idx64.shape()[1];
                if idx64.shape()[0] != t {
                    return Err(PyValueError::new_err(format!(
                        "indices: expected [{t}, K] (q's rows), got {:?}",
                        idx64.shape()
                    )));
                }
                (Indices::I64(args::slice("indices", &idx64)?), k)
            }
        };
        let scale = if scale.is_instance_of::<PyFloat>() || args::int("scale", scale).is_ok() {
            scale.extract::<f64>()?
        } else {
            return Err(PyTypeError::new_err(format!(
                "scale: expected a float, got {}",
                args::type_name(scale)
            )));
        };
        let d_v = args::size("d_v", d_v)?;
        let threads = args::threads(threads)?;
        let p = Problem {
            q: args::slice("q", &q)?,
            kv: kv_lat,
            indices: idx,
            t,
            h,
            d,
            d_v,
            k,
            scale: scale as f32,
        };
        let isa = cpu::active();
        let r = py
            .detach(|| mla::sparse_mla(isa, &p, threads))
            .map_err(|e| match e {
                MlaError::Shape(m) => PyValueError::new_err(m),
                MlaError::Alloc(_) => PyMemoryError::new_err(format!("q: {e}")),
            })?;
        let out = numpy::ndarray::Array3::from_shape_vec((t, h, d_v), r.out)
            .map_err(|e| PyValueError::new_err(format!("output shape: {e}")))?;
        Ok((
            numpy::IntoPyArray::into_pyarray(out, py),
            array2(py, t, h, r.lse)?,
        ))
    })
}

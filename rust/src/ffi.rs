//! The sparse-MLA kernel (`mla.rs`) as an XLA FFI custom call for the CPU backend, so a jitted JAX
//! program calls it on XLA's own buffers: the latent cache is read where XLA keeps it (no copy, no
//! Python callback) and the results are written straight into XLA's result buffers.
//!
//! This module mirrors the few `repr(C)` structs of XLA's FFI C API that the handler touches
//! (`xla/ffi/api/c_api.h`, API version 0.3, shipped in jaxlib's `include/` directory), and does per
//! call what the C++ helper `XLA_FFI_DEFINE_HANDLER` does: check the call frame's size, answer the
//! metadata query (XLA calls every handler once with a metadata extension, at registration, to
//! learn the FFI version it was built against), refuse a stage other than "execute", then decode
//! and check every argument, result and attribute before any work. A refusal is an `XLA_FFI_Error`
//! (made by the API's `XLA_FFI_Error_Create`, so XLA owns and frees it) whose message starts with
//! the argument's name; a panic (a bug) is caught and becomes an INTERNAL error. Nothing unwinds
//! into XLA.
//!
//! The custom call `dsa_hybrid_sparse_mla_f32` (`sparse_mla_f32`):
//! - arguments: `q` float32 `[T, h, D]`, `kv` float32 `[..., D]` (the float32 `LatentCache`'s
//!   `[pages, page_size, D]` rows, any leading shape: `N` rows), `slots` int32 `[T, K]` (entries
//!   < 0 or >= N skipped);
//! - results: `out` float32 `[T, h, d_v]` (`d_v` in `[1, D]`: the value width is the result's),
//!   `lse` float32 `[T, h]`;
//! - attributes: `scale` (float32 scalar, finite), `threads` (int64 scalar, the `par.rs`
//!   convention: 0 one per core, 1 the calling XLA thread, at most 1024).
//!
//! `unsafe` is confined to this boundary: reading the call frame XLA passes (valid for the call,
//! per the C API) and viewing its buffers as slices once their dtypes, ranks, dims, pointers and
//! alignment have been checked. The kernel itself is the safe `mla::sparse_mla_into`.

use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::cpu;
use crate::mla::{self, Indices, Latent, Problem};
use crate::par::MAX_THREADS;

/// The FFI API version this handler is written against (`XLA_FFI_API_MAJOR` / `_MINOR`).
pub const API_MAJOR: i32 = 0;
pub const API_MINOR: i32 = 3;

/// The names the Python side registers the handlers under (platform "cpu").
pub const SPARSE_MLA_F32: &str = "dsa_hybrid_sparse_mla_f32";
pub const INDEXER_SELECT: &str = "dsa_hybrid_indexer_select";

// ----- the mirrored C API (xla/ffi/api/c_api.h) --------------------------------------------------

/// `XLA_FFI_Extension_Type`: the metadata extension.
pub const EXTENSION_METADATA: i32 = 1;
/// `XLA_FFI_ExecutionStage_EXECUTE`.
pub const STAGE_EXECUTE: i32 = 3;
/// `XLA_FFI_ArgType_BUFFER` / `XLA_FFI_RetType_BUFFER`.
pub const BUFFER: i32 = 1;
/// `XLA_FFI_AttrType_SCALAR`.
pub const ATTR_SCALAR: i32 = 3;
/// `XLA_FFI_DataType` values used here.
pub const DT_S32: i32 = 4;
pub const DT_U8: i32 = 6;
pub const DT_S64: i32 = 5;
pub const DT_F32: i32 = 11;
/// `XLA_FFI_Error_Code` values used here.
pub const ERR_INVALID_ARGUMENT: i32 = 3;
pub const ERR_INTERNAL: i32 = 13;

/// `XLA_FFI_Error` (opaque: created and freed by XLA).
#[repr(C)]
pub struct FfiError {
    _opaque: [u8; 0],
}

/// `XLA_FFI_Extension_Base`.
#[repr(C)]
pub struct ExtensionBase {
    pub struct_size: usize,
    pub kind: i32,
    pub next: *mut ExtensionBase,
}

/// `XLA_FFI_Api_Version`.
#[repr(C)]
pub struct ApiVersion {
    pub struct_size: usize,
    pub extension_start: *mut ExtensionBase,
    pub major_version: i32,
    pub minor_version: i32,
}

/// `XLA_FFI_Error_Create_Args`.
#[repr(C)]
pub struct ErrorCreateArgs {
    pub struct_size: usize,
    pub extension_start: *mut ExtensionBase,
    pub message: *const c_char,
    pub errc: i32,
}

/// `XLA_FFI_Error_Create`.
pub type ErrorCreate = unsafe extern "C" fn(*mut ErrorCreateArgs) -> *mut FfiError;

/// `XLA_FFI_Api`: the version and the function table; only `error_create` is called here (the
/// other entries are kept as untyped pointers so the layout is the C one).
#[repr(C)]
pub struct Api {
    pub struct_size: usize,
    pub extension_start: *mut ExtensionBase,
    pub api_version: ApiVersion,
    pub internal_api: *const c_void,
    pub error_create: Option<ErrorCreate>,
    pub others: [*const c_void; 17],
}

/// `XLA_FFI_Buffer`.
#[repr(C)]
pub struct Buffer {
    pub struct_size: usize,
    pub extension_start: *mut ExtensionBase,
    pub dtype: i32,
    pub data: *mut c_void,
    pub rank: i64,
    pub dims: *mut i64,
}

/// `XLA_FFI_Args` and `XLA_FFI_Rets` (the same layout).
#[repr(C)]
pub struct Operands {
    pub struct_size: usize,
    pub extension_start: *mut ExtensionBase,
    pub size: i64,
    pub types: *mut i32,
    pub ptrs: *mut *mut c_void,
}

/// `XLA_FFI_ByteSpan`.
#[repr(C)]
pub struct ByteSpan {
    pub ptr: *const c_char,
    pub len: usize,
}

/// `XLA_FFI_Scalar`.
#[repr(C)]
pub struct Scalar {
    pub dtype: i32,
    pub value: *mut c_void,
}

/// `XLA_FFI_Attrs` (sorted by name).
#[repr(C)]
pub struct Attrs {
    pub struct_size: usize,
    pub extension_start: *mut ExtensionBase,
    pub size: i64,
    pub types: *mut i32,
    pub names: *mut *mut ByteSpan,
    pub attrs: *mut *mut c_void,
}

/// `XLA_FFI_CallFrame`.
#[repr(C)]
pub struct CallFrame {
    pub struct_size: usize,
    pub extension_start: *mut ExtensionBase,
    pub api: *const Api,
    pub ctx: *mut c_void,
    pub stage: i32,
    pub args: Operands,
    pub rets: Operands,
    pub attrs: Attrs,
    pub future: *mut c_void,
}

/// `XLA_FFI_Metadata`.
#[repr(C)]
pub struct Metadata {
    pub struct_size: usize,
    pub api_version: ApiVersion,
    pub traits: u32,
    pub state_type_id: i64,
}

/// `XLA_FFI_Metadata_Extension`.
#[repr(C)]
pub struct MetadataExtension {
    pub extension_base: ExtensionBase,
    pub metadata: *mut Metadata,
}

/// `XLA_FFI_STRUCT_SIZE(struct, last_field)`: the offset of the last field plus its size (not
/// `size_of`, which counts trailing padding) — the value the C side writes and compares.
macro_rules! struct_size {
    ($t:ty, $field:ident, $ft:ty) => {
        std::mem::offset_of!($t, $field) + std::mem::size_of::<$ft>()
    };
}

pub const CALL_FRAME_SIZE: usize = struct_size!(CallFrame, attrs, Attrs);
pub const METADATA_SIZE: usize = struct_size!(Metadata, traits, u32);
pub const METADATA_EXTENSION_SIZE: usize = struct_size!(MetadataExtension, metadata, *mut Metadata);
pub const API_VERSION_SIZE: usize = struct_size!(ApiVersion, minor_version, i32);
pub const ERROR_CREATE_ARGS_SIZE: usize = struct_size!(ErrorCreateArgs, errc, i32);
pub const BUFFER_SIZE: usize = struct_size!(Buffer, dims, *mut i64);
pub const OPERANDS_SIZE: usize = struct_size!(Operands, ptrs, *mut *mut c_void);
pub const ATTRS_SIZE: usize = struct_size!(Attrs, attrs, *mut *mut c_void);

// ----- the handler -------------------------------------------------------------------------------

/// Address of the latent rows the last successful call read (a diagnostic: the tests compare it
/// with the JAX array's buffer to show the cache is read in place).
static LAST_KV: AtomicUsize = AtomicUsize::new(0);

/// The `kv` data address of the last successful `sparse_mla_f32` call (0 before the first).
pub fn last_kv_address() -> usize {
    LAST_KV.load(Ordering::Relaxed)
}

/// A refusal: the error code and the message (starting with the argument's name).
struct Refusal(i32, String);

fn invalid(msg: String) -> Refusal {
    Refusal(ERR_INVALID_ARGUMENT, msg)
}

/// `XLA_FFI_Error_Create` through `api`; null (success, the only thing left to do) if the API
/// table lacks the function, which a conforming XLA never does.
///
/// # Safety
/// `api` is null or points to a valid `XLA_FFI_Api`.
unsafe fn make_error(api: *const Api, code: i32, msg: &str) -> *mut FfiError {
    // SAFETY: the caller's contract; `as_ref` handles null.
    let Some(create) = (unsafe { api.as_ref() }).and_then(|a| a.error_create) else {
        return std::ptr::null_mut();
    };
    let text = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    let mut args = ErrorCreateArgs {
        struct_size: ERROR_CREATE_ARGS_SIZE,
        extension_start: std::ptr::null_mut(),
        message: text.as_ptr(),
        errc: code,
    };
    // SAFETY: `create` is XLA's `XLA_FFI_Error_Create`, called as the C API specifies; it copies
    // the message (kept alive until it returns).
    unsafe { create(&mut args) }
}

/// The XLA FFI handler of `dsa_hybrid_sparse_mla_f32` (module docs). Registered through its
/// PyCapsule (`dsa_hybrid._core.ffi_targets`), called by XLA only.
///
/// # Safety
/// `frame` is null or a call frame XLA passes to an FFI handler (valid for the call).
pub unsafe extern "C" fn sparse_mla_f32(frame: *mut CallFrame) -> *mut FfiError {
    // SAFETY: the caller's contract.
    unsafe { entry(frame, SPARSE_MLA_F32, execute) }
}

/// The XLA FFI handler of `dsa_hybrid_indexer_select` (`execute_select`). Registered and called
/// as `sparse_mla_f32` is.
///
/// # Safety
/// `frame` is null or a call frame XLA passes to an FFI handler (valid for the call).
pub unsafe extern "C" fn indexer_select(frame: *mut CallFrame) -> *mut FfiError {
    // SAFETY: the caller's contract.
    unsafe { entry(frame, INDEXER_SELECT, execute_select) }
}

/// What every handler does around its execute stage: the stages (`handle`), a refusal made an
/// `XLA_FFI_Error`, a panic caught and made an INTERNAL error naming the target `name`.
///
/// # Safety
/// `frame` is null or a call frame XLA passes to an FFI handler (valid for the call).
unsafe fn entry(
    frame: *mut CallFrame,
    name: &str,
    exec: unsafe fn(&mut CallFrame) -> Result<(), Refusal>,
) -> *mut FfiError {
    // SAFETY: the caller's contract; a null frame cannot even report an error.
    let Some(frame) = (unsafe { frame.as_mut() }) else {
        return std::ptr::null_mut();
    };
    let api = frame.api;
    // SAFETY (for the closure): `frame` is valid for the call, as XLA guarantees.
    let result = catch_unwind(AssertUnwindSafe(|| unsafe { handle(frame, exec) }));
    let refusal = match result {
        Ok(Ok(())) => return std::ptr::null_mut(),
        Ok(Err(r)) => r,
        Err(payload) => Refusal(ERR_INTERNAL, crate::internal_error_message(name, &*payload)),
    };
    // SAFETY: `api` comes from XLA's call frame.
    unsafe { make_error(api, refusal.0, &refusal.1) }
}

/// The stages of one call, as `XLA_FFI_DEFINE_HANDLER` does them, `exec` at the execute stage.
///
/// # Safety
/// `frame` is a valid call frame (its pointers valid for the call).
unsafe fn handle(
    frame: &mut CallFrame,
    exec: unsafe fn(&mut CallFrame) -> Result<(), Refusal>,
) -> Result<(), Refusal> {
    if frame.struct_size < CALL_FRAME_SIZE {
        return Err(invalid(format!(
            "Unexpected XLA_FFI_CallFrame size: expected at least {CALL_FRAME_SIZE} got {}. Check installed software versions.",
            frame.struct_size
        )));
    }
    // SAFETY: a non-null extension_start points to an extension header (C API).
    if let Some(ext) = unsafe { frame.extension_start.as_ref() } {
        if ext.kind == EXTENSION_METADATA {
            // SAFETY: the metadata extension's header is its first field (C API).
            let ext = unsafe { &mut *frame.extension_start.cast::<MetadataExtension>() };
            return unsafe { populate_metadata(ext) };
        }
    }
    if frame.stage != STAGE_EXECUTE {
        return Err(invalid(format!(
            "Wrong execution stage: expected `execute` ({STAGE_EXECUTE}) but got `{}`",
            frame.stage
        )));
    }
    // SAFETY: forwarded contract.
    unsafe { exec(frame) }
}

/// Answer the metadata query: the API version this handler was written for, no traits, no state.
///
/// # Safety
/// `ext` is XLA's metadata extension, its `metadata` pointer valid.
unsafe fn populate_metadata(ext: &mut MetadataExtension) -> Result<(), Refusal> {
    if ext.extension_base.struct_size < METADATA_EXTENSION_SIZE {
        return Err(invalid(format!(
            "Unexpected XLA_FFI_Metadata_Extension size: expected at least {METADATA_EXTENSION_SIZE} got {}",
            ext.extension_base.struct_size
        )));
    }
    // SAFETY: the C API's contract for the metadata extension.
    let Some(meta) = (unsafe { ext.metadata.as_mut() }) else {
        return Err(invalid("XLA_FFI_Metadata: null pointer".into()));
    };
    if meta.struct_size < METADATA_SIZE {
        return Err(invalid(format!(
            "Unexpected XLA_FFI_Metadata size: expected at least {METADATA_SIZE} got {}",
            meta.struct_size
        )));
    }
    meta.api_version = ApiVersion {
        struct_size: API_VERSION_SIZE,
        extension_start: std::ptr::null_mut(),
        major_version: API_MAJOR,
        minor_version: API_MINOR,
    };
    meta.traits = 0;
    // The C++ helper writes the state type id unconditionally (XLA allocates the whole struct);
    // do the same: no state (`XLA_FFI_UNKNOWN_TYPE_ID`).
    meta.state_type_id = 0;
    Ok(())
}

/// A checked view of one buffer argument or result.
struct View {
    data: *mut c_void,
    dims: Vec<usize>,
    len: usize,
}

/// Buffer `i` of `ops` (`what` "argument" / "result"), named `name`, of `dtype` and `rank` (None:
/// at least 2); dims non-negative, the element count fitting `isize` bytes, the pointer non-null
/// and aligned for its element (`elem_bytes`) when there is any element.
///
/// # Safety
/// `ops` is a valid `XLA_FFI_Args` / `XLA_FFI_Rets` of the call frame.
unsafe fn buffer(
    ops: &Operands,
    i: usize,
    name: &str,
    dtype: i32,
    rank: Option<usize>,
) -> Result<View, Refusal> {
    // SAFETY: `types` and `ptrs` hold `size` entries (C API); `i` < size is checked by the caller.
    let (kind, ptr) = unsafe { (*ops.types.add(i), *ops.ptrs.add(i)) };
    if kind != BUFFER || ptr.is_null() {
        return Err(invalid(format!("{name}: expected a buffer")));
    }
    // SAFETY: a BUFFER entry points to an `XLA_FFI_Buffer` (C API).
    let b = unsafe { &*ptr.cast::<Buffer>() };
    if b.dtype != dtype {
        return Err(invalid(format!(
            "{name}: expected dtype {} (XLA_FFI_DataType {dtype}), got XLA_FFI_DataType {}",
            dtype_name(dtype),
            b.dtype
        )));
    }
    let r = usize::try_from(b.rank).map_err(|_| invalid(format!("{name}: rank {}", b.rank)))?;
    match rank {
        Some(want) if r != want => {
            return Err(invalid(format!("{name}: expected rank {want}, got {r}")))
        }
        None if r < 2 => return Err(invalid(format!("{name}: expected rank >= 2, got {r}"))),
        _ => {}
    }
    if r > 0 && b.dims.is_null() {
        return Err(invalid(format!("{name}: null dims")));
    }
    let mut dims = Vec::with_capacity(r);
    for k in 0..r {
        // SAFETY: `dims` holds `rank` entries (C API).
        let v = unsafe { *b.dims.add(k) };
        dims.push(usize::try_from(v).map_err(|_| invalid(format!("{name}: dim {k} is {v}")))?);
    }
    let elem = elem_bytes(dtype);
    let len = dims
        .iter()
        .try_fold(1usize, |a, d| a.checked_mul(*d))
        .filter(|n| {
            n.checked_mul(elem)
                .is_some_and(|b| b <= isize::MAX as usize)
        })
        .ok_or_else(|| invalid(format!("{name}: {dims:?} is too large")))?;
    if len > 0 && (b.data.is_null() || !(b.data as usize).is_multiple_of(elem)) {
        return Err(invalid(format!(
            "{name}: the buffer pointer {:p} is null or not {elem}-byte aligned",
            b.data
        )));
    }
    Ok(View {
        data: b.data,
        dims,
        len,
    })
}

fn dtype_name(dtype: i32) -> &'static str {
    match dtype {
        DT_F32 => "float32",
        DT_S32 => "int32",
        DT_S64 => "int64",
        DT_U8 => "uint8",
        _ => "?",
    }
}

/// Bytes of one element of the buffer dtypes the handlers take.
fn elem_bytes(dtype: i32) -> usize {
    match dtype {
        DT_U8 => 1,
        DT_S64 => 8,
        _ => 4,
    }
}

/// The `threads` attribute as a worker count (the `par.rs` convention: 0 one per core, 1 the
/// calling XLA thread), at most `MAX_THREADS`.
fn thread_count(threads: i64) -> Result<usize, Refusal> {
    usize::try_from(threads)
        .ok()
        .filter(|n| *n <= MAX_THREADS)
        .ok_or_else(|| {
            invalid(format!(
                "threads: must be in [0, {MAX_THREADS}], got {threads}"
            ))
        })
}

/// The scalar attribute `name` of `dtype` (an `XLA_FFI_Scalar`), its value read as `T`.
///
/// # Safety
/// `attrs` is the call frame's valid `XLA_FFI_Attrs`; `T` is the type `dtype` names.
unsafe fn scalar_attr<T: Copy>(attrs: &Attrs, name: &str, dtype: i32) -> Result<T, Refusal> {
    let n = usize::try_from(attrs.size).unwrap_or(0);
    for i in 0..n {
        // SAFETY: `names`, `types` and `attrs` hold `size` entries (C API); a name is a byte span.
        let (span, kind, ptr) = unsafe {
            (
                &**attrs.names.add(i),
                *attrs.types.add(i),
                *attrs.attrs.add(i),
            )
        };
        // SAFETY: a byte span of the attribute's name, valid for the call.
        let bytes = unsafe { std::slice::from_raw_parts(span.ptr.cast::<u8>(), span.len) };
        if bytes != name.as_bytes() {
            continue;
        }
        if kind != ATTR_SCALAR || ptr.is_null() {
            return Err(invalid(format!("{name}: expected a scalar attribute")));
        }
        // SAFETY: a SCALAR attribute points to an `XLA_FFI_Scalar` (C API).
        let s = unsafe { &*ptr.cast::<Scalar>() };
        if s.dtype != dtype || s.value.is_null() {
            return Err(invalid(format!(
                "{name}: expected a {} scalar, got XLA_FFI_DataType {}",
                dtype_name(dtype),
                s.dtype
            )));
        }
        // SAFETY: the scalar's value has type `dtype`, i.e. `T` (caller's contract); unaligned read
        // for safety's sake.
        return Ok(unsafe { s.value.cast::<T>().read_unaligned() });
    }
    Err(invalid(format!("{name}: missing attribute")))
}

/// A checked view as a slice of `T` (the buffer's element type; empty when there are none).
///
/// # Safety
/// `v` came from `buffer` for a buffer of `T` that lives for `'a` and that no one else writes.
unsafe fn slice<'a, T>(v: &View) -> &'a [T] {
    if v.len == 0 {
        return &[];
    }
    // SAFETY: non-null, aligned, `len` elements (checked by `buffer`), valid for the call.
    unsafe { std::slice::from_raw_parts(v.data.cast::<T>(), v.len) }
}

/// As `slice`, mutable: a result buffer (XLA's results are distinct from the arguments).
///
/// # Safety
/// As `slice`, and nothing else reads or writes the buffer during the call.
unsafe fn slice_mut<'a, T>(v: &View) -> &'a mut [T] {
    if v.len == 0 {
        return &mut [];
    }
    // SAFETY: as `slice`; a result buffer of this call, aliased by nothing else.
    unsafe { std::slice::from_raw_parts_mut(v.data.cast::<T>(), v.len) }
}

/// The execute stage: decode, check, run the kernel into the result buffers.
///
/// # Safety
/// `frame` is a valid call frame.
unsafe fn execute(frame: &mut CallFrame) -> Result<(), Refusal> {
    if frame.args.size != 3 {
        return Err(invalid(format!(
            "{SPARSE_MLA_F32}: expected 3 arguments (q, kv, slots), got {}",
            frame.args.size
        )));
    }
    if frame.rets.size != 2 {
        return Err(invalid(format!(
            "{SPARSE_MLA_F32}: expected 2 results (out, lse), got {}",
            frame.rets.size
        )));
    }
    if frame.attrs.size != 2 {
        return Err(invalid(format!(
            "{SPARSE_MLA_F32}: expected 2 attributes (scale, threads), got {}",
            frame.attrs.size
        )));
    }
    // SAFETY (all of the block): the frame's operands and attributes are valid for the call.
    let (q, kv, slots, out, lse, scale, threads) = unsafe {
        (
            buffer(&frame.args, 0, "q", DT_F32, Some(3))?,
            buffer(&frame.args, 1, "kv", DT_F32, None)?,
            buffer(&frame.args, 2, "slots", DT_S32, Some(2))?,
            buffer(&frame.rets, 0, "out", DT_F32, Some(3))?,
            buffer(&frame.rets, 1, "lse", DT_F32, Some(2))?,
            scalar_attr::<f32>(&frame.attrs, "scale", DT_F32)?,
            scalar_attr::<i64>(&frame.attrs, "threads", DT_S64)?,
        )
    };
    let (t, h, d) = (q.dims[0], q.dims[1], q.dims[2]);
    if kv.dims[kv.dims.len() - 1] != d {
        return Err(invalid(format!(
            "kv: expected rows of {d} (q's width), got {:?}",
            kv.dims
        )));
    }
    if slots.dims[0] != t {
        return Err(invalid(format!(
            "slots: expected [{t}, K] (q's rows), got {:?}",
            slots.dims
        )));
    }
    let d_v = out.dims[2];
    if out.dims[0] != t || out.dims[1] != h || !(1..=d).contains(&d_v) {
        return Err(invalid(format!(
            "out: expected [{t}, {h}, d_v] with d_v in [1, {d}], got {:?}",
            out.dims
        )));
    }
    if lse.dims != [t, h] {
        return Err(invalid(format!(
            "lse: expected [{t}, {h}], got {:?}",
            lse.dims
        )));
    }
    if !scale.is_finite() {
        return Err(invalid(format!("scale: must be finite, got {scale}")));
    }
    let threads = thread_count(threads)?;
    // SAFETY: each view was checked for its dtype (the slice's element type), size and alignment;
    // the arguments are read-only and the results are this call's own buffers.
    let (qs, kvs, ss, os, ls) = unsafe {
        (
            slice::<f32>(&q),
            slice::<f32>(&kv),
            slice::<i32>(&slots),
            slice_mut::<f32>(&out),
            slice_mut::<f32>(&lse),
        )
    };
    let p = Problem {
        q: qs,
        kv: Latent::F32(kvs),
        indices: Indices::I32(ss),
        t,
        h,
        d,
        d_v,
        k: slots.dims[1],
        scale,
    };
    mla::sparse_mla_into(cpu::active(), &p, threads, os, ls).map_err(|e| invalid(e.to_string()))?;
    LAST_KV.store(kv.data as usize, Ordering::Relaxed);
    Ok(())
}

/// The execute stage of `dsa_hybrid_indexer_select`: the host indexer's `select_paged` (FP8
/// scores, top-k, ascending positions) over the device's split pages, read in place.
///
/// - arguments: `q` float32 `[T, H, D]` post-RoPE indexer queries (rotated and quantized here, as
///   on the host), `weights` float32 `[T, H]`, `codes` uint8 `[P, S, D]` (e4m3fn bit patterns),
///   `scales` float32 with `P × S` elements (`[P, 1, S]`), `block_tables` int32 `[T, W]` (−1
///   padded), `positions` int32 `[T]` (a padding row, at a negative position or with a table
///   that starts with −1, selects nothing);
/// - result: `out` int32 `[T, k]`, ascending positions, −1 padded;
/// - attributes: `quantize` (int64 0 / 1: FP8 queries), `bf16` (int64 0 / 1: score in bfloat16),
///   `threads` (int64, as for `sparse_mla_f32`).
///
/// Any other page a row needs that is −1 or outside `[0, P)` is refused (`block_tables: ...`), as
/// the host's `select_paged` refuses it (the XLA path would mask a −1 page and clamp the rest).
///
/// # Safety
/// `frame` is a valid call frame.
unsafe fn execute_select(frame: &mut CallFrame) -> Result<(), Refusal> {
    use crate::indexer_cache::{CacheError, PageGeometry};
    use crate::select::{paged_rows_padded, select_rows, Pages, Queries, SelectOptions};

    if frame.args.size != 6 || frame.rets.size != 1 || frame.attrs.size != 3 {
        return Err(invalid(format!(
            "{INDEXER_SELECT}: expected 6 arguments (q, weights, codes, scales, block_tables, \
             positions), 1 result and 3 attributes (quantize, bf16, threads), got {}, {} and {}",
            frame.args.size, frame.rets.size, frame.attrs.size
        )));
    }
    // SAFETY (all of the block): the frame's operands and attributes are valid for the call.
    let (q, w, codes, scales, tables, positions, out, quantize, bf16, threads) = unsafe {
        (
            buffer(&frame.args, 0, "q", DT_F32, Some(3))?,
            buffer(&frame.args, 1, "weights", DT_F32, Some(2))?,
            buffer(&frame.args, 2, "codes", DT_U8, Some(3))?,
            buffer(&frame.args, 3, "scales", DT_F32, None)?,
            buffer(&frame.args, 4, "block_tables", DT_S32, Some(2))?,
            buffer(&frame.args, 5, "positions", DT_S32, Some(1))?,
            buffer(&frame.rets, 0, "out", DT_S32, Some(2))?,
            scalar_attr::<i64>(&frame.attrs, "quantize", DT_S64)?,
            scalar_attr::<i64>(&frame.attrs, "bf16", DT_S64)?,
            scalar_attr::<i64>(&frame.attrs, "threads", DT_S64)?,
        )
    };
    let (t, h, d) = (q.dims[0], q.dims[1], q.dims[2]);
    let (p, s) = (codes.dims[0], codes.dims[1]);
    if w.dims != [t, h] {
        return Err(invalid(format!(
            "weights: expected [{t}, {h}] (q's rows and heads), got {:?}",
            w.dims
        )));
    }
    if codes.dims[2] != d || s == 0 || !s.is_multiple_of(16) {
        return Err(invalid(format!(
            "codes: expected [pages, page_size, {d}] with page_size a positive multiple of 16, got {:?}",
            codes.dims
        )));
    }
    if scales.len != p * s {
        return Err(invalid(format!(
            "scales: expected {p} × {s} floats ([pages, 1, page_size]), got {:?}",
            scales.dims
        )));
    }
    if tables.dims[0] != t || positions.dims != [t] {
        return Err(invalid(format!(
            "block_tables and positions: expected [{t}, W] and [{t}] (q's rows), got {:?} and {:?}",
            tables.dims, positions.dims
        )));
    }
    let k = out.dims[1];
    if out.dims[0] != t || k == 0 {
        return Err(invalid(format!(
            "out: expected [{t}, k >= 1], got {:?}",
            out.dims
        )));
    }
    let flag = |name: &str, v: i64| match v {
        0 | 1 => Ok(v == 1),
        _ => Err(invalid(format!("{name}: expected 0 or 1, got {v}"))),
    };
    let (quantize, bf16) = (flag("quantize", quantize)?, flag("bf16", bf16)?);
    let threads = thread_count(threads)?;
    // SAFETY: each view was checked for its dtype (the slice's element type), size and alignment;
    // the arguments are read-only and the result is this call's own buffer.
    let (qs, ws, cs, ss, ts, ps, os) = unsafe {
        (
            slice::<f32>(&q),
            slice::<f32>(&w),
            slice::<u8>(&codes),
            slice::<f32>(&scales),
            slice::<i32>(&tables),
            slice::<i32>(&positions),
            slice_mut::<i32>(&out),
        )
    };
    let queries = Queries::new(qs, ws, t, h, d, quantize)
        .map_err(invalid)?
        .with_bf16(bf16);
    let geom = PageGeometry {
        num_blocks: p,
        block_size: s,
        head_dim: d,
    };
    let pos: Vec<i64> = ps.iter().map(|&x| i64::from(x)).collect();
    // The messages that do not start with the argument's name get it.
    let named = |e: CacheError| match e {
        CacheError::TableTooNarrow { .. } | CacheError::BadPage { .. } => {
            invalid(format!("block_tables: {e}"))
        }
        CacheError::PositionTooLarge { .. } => invalid(format!("positions: {e}")),
        CacheError::NonFiniteScore { .. } => invalid(format!("q: {e}")),
        _ => invalid(e.to_string()),
    };
    let rows = paged_rows_padded(geom, &queries, ts, tables.dims[1], &pos).map_err(named)?;
    let opts = SelectOptions {
        k,
        as_slots: false,
        by_score: false,
        threads,
        isa: cpu::active(),
    };
    let pages = Pages::Split {
        codes: cs,
        scales: ss,
    };
    let sel = select_rows(geom, pages, &queries, &rows, opts).map_err(named)?;
    os.copy_from_slice(&sel);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng;
    use std::ffi::CStr;
    use std::sync::Mutex;

    /// What the mock `XLA_FFI_Error_Create` received: (code, message).
    static ERRORS: Mutex<Vec<(i32, String)>> = Mutex::new(Vec::new());

    unsafe extern "C" fn mock_error_create(args: *mut ErrorCreateArgs) -> *mut FfiError {
        // SAFETY: the handler passes valid args with a NUL-terminated message.
        let a = unsafe { &*args };
        assert_eq!(a.struct_size, ERROR_CREATE_ARGS_SIZE);
        let msg = unsafe { CStr::from_ptr(a.message) }
            .to_string_lossy()
            .into_owned();
        let mut e = ERRORS.lock().unwrap();
        e.push((a.errc, msg));
        e.len() as *mut FfiError // a non-null token
    }

    fn api() -> Api {
        Api {
            struct_size: std::mem::size_of::<Api>(),
            extension_start: std::ptr::null_mut(),
            api_version: ApiVersion {
                struct_size: API_VERSION_SIZE,
                extension_start: std::ptr::null_mut(),
                major_version: API_MAJOR,
                minor_version: API_MINOR,
            },
            internal_api: std::ptr::null(),
            error_create: Some(mock_error_create),
            others: [std::ptr::null(); 17],
        }
    }

    /// Owns every buffer and pointer array of one mock call frame.
    struct Call {
        dims: Vec<Vec<i64>>,
        bufs: Vec<Buffer>,
        arg_types: Vec<i32>,
        arg_ptrs: Vec<*mut c_void>,
        ret_types: Vec<i32>,
        ret_ptrs: Vec<*mut c_void>,
        names: Vec<ByteSpan>,
        name_ptrs: Vec<*mut ByteSpan>,
        scale: f32,
        threads: i64,
        scalars: Vec<Scalar>,
        attr_types: Vec<i32>,
        attr_ptrs: Vec<*mut c_void>,
        api: Api,
    }

    /// (dtype, data, dims) for 3 arguments then 2 results.
    fn call(ops: Vec<(i32, *mut c_void, Vec<i64>)>, scale: f32, threads: i64) -> Box<Call> {
        let mut c = Box::new(Call {
            dims: ops.iter().map(|o| o.2.clone()).collect(),
            bufs: Vec::new(),
            arg_types: vec![BUFFER; 3],
            arg_ptrs: Vec::new(),
            ret_types: vec![BUFFER; ops.len() - 3],
            ret_ptrs: Vec::new(),
            // Sorted by name, as XLA passes them.
            names: vec![
                ByteSpan {
                    ptr: c"scale".as_ptr(),
                    len: 5,
                },
                ByteSpan {
                    ptr: c"threads".as_ptr(),
                    len: 7,
                },
            ],
            name_ptrs: Vec::new(),
            scale,
            threads,
            scalars: Vec::new(),
            attr_types: vec![ATTR_SCALAR; 2],
            attr_ptrs: Vec::new(),
            api: api(),
        });
        for (i, (dt, data, _)) in ops.iter().enumerate() {
            let dims = c.dims[i].as_mut_ptr();
            c.bufs.push(Buffer {
                struct_size: BUFFER_SIZE,
                extension_start: std::ptr::null_mut(),
                dtype: *dt,
                data: *data,
                rank: c.dims[i].len() as i64,
                dims,
            });
        }
        let bufs: Vec<*mut c_void> = c
            .bufs
            .iter_mut()
            .map(|b| (b as *mut Buffer).cast())
            .collect();
        c.arg_ptrs = bufs[..3].to_vec();
        c.ret_ptrs = bufs[3..].to_vec();
        c.name_ptrs = c.names.iter_mut().map(|n| n as *mut ByteSpan).collect();
        let sp = (&mut c.scale as *mut f32).cast();
        let tp = (&mut c.threads as *mut i64).cast();
        c.scalars = vec![
            Scalar {
                dtype: DT_F32,
                value: sp,
            },
            Scalar {
                dtype: DT_S64,
                value: tp,
            },
        ];
        c.attr_ptrs = c
            .scalars
            .iter_mut()
            .map(|s| (s as *mut Scalar).cast())
            .collect();
        c
    }

    fn frame(c: &mut Call, stage: i32) -> CallFrame {
        CallFrame {
            struct_size: CALL_FRAME_SIZE,
            extension_start: std::ptr::null_mut(),
            api: &c.api,
            ctx: std::ptr::null_mut(),
            stage,
            args: Operands {
                struct_size: OPERANDS_SIZE,
                extension_start: std::ptr::null_mut(),
                size: c.arg_ptrs.len() as i64,
                types: c.arg_types.as_mut_ptr(),
                ptrs: c.arg_ptrs.as_mut_ptr(),
            },
            rets: Operands {
                struct_size: OPERANDS_SIZE,
                extension_start: std::ptr::null_mut(),
                size: c.ret_ptrs.len() as i64,
                types: c.ret_types.as_mut_ptr(),
                ptrs: c.ret_ptrs.as_mut_ptr(),
            },
            attrs: Attrs {
                struct_size: ATTRS_SIZE,
                extension_start: std::ptr::null_mut(),
                size: 2,
                types: c.attr_types.as_mut_ptr(),
                names: c.name_ptrs.as_mut_ptr(),
                attrs: c.attr_ptrs.as_mut_ptr(),
            },
            future: std::ptr::null_mut(),
        }
    }

    /// Run the handler; None on success, else the message it reported.
    fn run(f: &mut CallFrame) -> Option<(i32, String)> {
        // SAFETY: a complete mock call frame whose buffers outlive the call.
        let e = unsafe { sparse_mla_f32(f) };
        if e.is_null() {
            return None;
        }
        let got = ERRORS.lock().unwrap()[e as usize - 1].clone();
        Some(got)
    }

    fn p<T>(v: &mut [T]) -> *mut c_void {
        v.as_mut_ptr().cast()
    }

    #[test]
    fn the_layout_matches_the_c_header() {
        // x86-64 / aarch64 Linux: offsets as a C compiler lays out c_api.h's structs.
        assert_eq!(std::mem::offset_of!(Buffer, data), 24);
        assert_eq!(BUFFER_SIZE, 48);
        assert_eq!(OPERANDS_SIZE, 40);
        assert_eq!(ATTRS_SIZE, 48);
        assert_eq!(std::mem::offset_of!(CallFrame, args), 40);
        assert_eq!(std::mem::offset_of!(CallFrame, rets), 80);
        assert_eq!(std::mem::offset_of!(CallFrame, attrs), 120);
        assert_eq!(CALL_FRAME_SIZE, 168);
        assert_eq!(std::mem::offset_of!(Api, error_create), 48);
        assert_eq!(std::mem::size_of::<Api>(), 48 + 18 * 8);
        assert_eq!(METADATA_SIZE, 36);
        assert_eq!(std::mem::offset_of!(Metadata, state_type_id), 40);
        assert_eq!(METADATA_EXTENSION_SIZE, 32);
        assert_eq!(ERROR_CREATE_ARGS_SIZE, 28);
        assert_eq!(API_VERSION_SIZE, 24);
    }

    #[test]
    fn metadata_query_reports_the_api_version() {
        let mut c = call(
            vec![(DT_F32, std::ptr::null_mut(), vec![0, 1, 1]); 5],
            1.0,
            1,
        );
        let mut meta = Metadata {
            struct_size: METADATA_SIZE,
            api_version: ApiVersion {
                struct_size: 0,
                extension_start: std::ptr::null_mut(),
                major_version: -1,
                minor_version: -1,
            },
            traits: 7,
            state_type_id: 9,
        };
        let mut ext = MetadataExtension {
            extension_base: ExtensionBase {
                struct_size: METADATA_EXTENSION_SIZE,
                kind: EXTENSION_METADATA,
                next: std::ptr::null_mut(),
            },
            metadata: &mut meta,
        };
        let mut f = frame(&mut c, 0);
        f.extension_start = (&mut ext as *mut MetadataExtension).cast();
        assert_eq!(run(&mut f), None);
        assert_eq!(
            (
                meta.api_version.major_version,
                meta.api_version.minor_version
            ),
            (0, 3)
        );
        assert_eq!(meta.api_version.struct_size, API_VERSION_SIZE);
        assert_eq!((meta.traits, meta.state_type_id), (0, 0));
    }

    #[test]
    fn executes_the_kernel_in_place_and_refuses_bad_frames_by_name() {
        let mut next = test_rng(5);
        let (t, h, d, d_v, k, pages, s) =
            (3usize, 5usize, 24usize, 16usize, 40usize, 4usize, 8usize);
        let n = pages * s;
        let mut q: Vec<f32> = (0..t * h * d).map(|_| next() as f32 / 2e9 - 0.5).collect();
        let mut kv: Vec<f32> = (0..n * d).map(|_| next() as f32 / 2e9 - 0.5).collect();
        let mut slots: Vec<i32> = (0..t * k)
            .map(|i| {
                if i % 7 == 0 {
                    -1
                } else {
                    (next() % (n as u64 + 3)) as i32
                }
            })
            .collect();
        slots[k..2 * k].fill(-1); // row 1: empty
        let mut out = vec![f32::NAN; t * h * d_v];
        let mut lse = vec![f32::NAN; t * h];
        let ops = |q: &mut [f32], kv: &mut [f32], sl: &mut [i32], o: &mut [f32], l: &mut [f32]| {
            vec![
                (DT_F32, p(q), vec![t as i64, h as i64, d as i64]),
                (DT_F32, p(kv), vec![pages as i64, s as i64, d as i64]),
                (DT_S32, p(sl), vec![t as i64, k as i64]),
                (DT_F32, p(o), vec![t as i64, h as i64, d_v as i64]),
                (DT_F32, p(l), vec![t as i64, h as i64]),
            ]
        };
        let mut c = call(
            ops(&mut q, &mut kv, &mut slots, &mut out, &mut lse),
            0.25,
            1,
        );
        assert_eq!(run(&mut frame(&mut c, STAGE_EXECUTE)), None);
        assert_eq!(last_kv_address(), kv.as_ptr() as usize);
        let want = mla::sparse_mla(
            cpu::active(),
            &Problem {
                q: &q,
                kv: Latent::F32(&kv),
                indices: Indices::I32(&slots),
                t,
                h,
                d,
                d_v,
                k,
                scale: 0.25,
            },
            1,
        )
        .unwrap();
        assert_eq!(out, want.out);
        assert_eq!(lse, want.lse);
        assert!(lse[h..2 * h].iter().all(|x| *x == f32::INFINITY));
        assert!(out[h * d_v..2 * h * d_v].iter().all(|x| *x == 0.0));

        // Refusals: each names its argument, and leaves the results untouched.
        out.fill(-3.0);
        type Edit = Box<dyn Fn(&mut Call)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("q:", Box::new(|c| c.bufs[0].dtype = DT_S32)),
            ("q:", Box::new(|c| c.bufs[0].rank = 2)),
            ("kv:", Box::new(|c| c.dims[1][2] = 23)),
            ("kv:", Box::new(|c| c.bufs[1].rank = 1)),
            ("slots:", Box::new(|c| c.bufs[2].dtype = DT_S64)),
            ("slots:", Box::new(|c| c.dims[2][0] = 2)),
            ("out:", Box::new(|c| c.dims[3][2] = 25)),
            ("out:", Box::new(|c| c.dims[3][1] = 4)),
            ("lse:", Box::new(|c| c.dims[4][1] = 4)),
            ("q:", Box::new(|c| c.dims[0][0] = -1)),
            ("q:", Box::new(|c| c.bufs[0].data = std::ptr::null_mut())),
            (
                "kv:",
                Box::new(|c| c.bufs[1].data = c.bufs[1].data.cast::<u8>().wrapping_add(2).cast()),
            ),
            ("scale:", Box::new(|c| c.scale = f32::NAN)),
            ("scale:", Box::new(|c| c.scalars[0].dtype = DT_S64)),
            ("threads:", Box::new(|c| c.threads = -1)),
            ("threads:", Box::new(|c| c.threads = 5000)),
            ("threads:", Box::new(|c| c.names[1].len = 6)),
            (
                "dsa_hybrid_sparse_mla_f32: expected 3 arguments",
                Box::new(|c| {
                    c.arg_ptrs.pop();
                }),
            ),
            (
                "dsa_hybrid_sparse_mla_f32: expected 2 results",
                Box::new(|c| {
                    c.ret_ptrs.pop();
                }),
            ),
            ("Wrong execution stage", Box::new(|_| {})),
        ];
        for (i, (want, edit)) in cases.iter().enumerate() {
            let mut c = call(
                ops(&mut q, &mut kv, &mut slots, &mut out, &mut lse),
                0.25,
                1,
            );
            edit(&mut c);
            let stage = if want.starts_with("Wrong") {
                1
            } else {
                STAGE_EXECUTE
            };
            let got = run(&mut frame(&mut c, stage));
            let (code, msg) = got.unwrap_or_else(|| panic!("case {i} ({want}) was accepted"));
            assert_eq!(code, ERR_INVALID_ARGUMENT, "{msg}");
            assert!(msg.starts_with(want), "case {i}: {msg}");
            assert!(out.iter().all(|x| *x == -3.0), "case {i} wrote the result");
        }
        let mut f = frame(&mut c, STAGE_EXECUTE);
        f.struct_size = 8;
        assert!(run(&mut f).unwrap().1.contains("XLA_FFI_CallFrame size"));
    }
}

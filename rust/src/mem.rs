//! Buffers whose size a caller chooses: allocated fallibly and capped, so an absurd size is an
//! error (`AllocError`, a `MemoryError` in Python) before any memory is touched, never an abort.
//!
//! Rust aborts the process when an infallible allocation (`vec![..; n]`, `Vec::resize`) fails.
//! Every buffer here whose length follows from an argument (an output of `[T, k]`, a row of
//! scores, the page buffer) goes through `try_filled` / `try_matrix` / `try_resize` /
//! `ZeroedBytes` instead.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// The largest output buffer a call may ask for: 2^40 bytes (1 TiB). Larger requests are refused
/// without trying (`AllocError::over_limit`); smaller ones are tried, and refused if the allocator
/// fails. The page buffer of a cache is not capped (it is sized once, by its owner).
pub const MAX_OUTPUT_BYTES: u128 = 1 << 40;

/// A buffer that could not be had: `bytes` were asked for (computed without overflow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocError {
    /// Bytes requested.
    pub bytes: u128,
    /// Refused up front: more than `MAX_OUTPUT_BYTES`.
    pub over_limit: bool,
}

impl std::fmt::Display for AllocError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.over_limit {
            write!(
                f,
                "the result would take {} bytes, more than the {MAX_OUTPUT_BYTES}-byte (2^40) limit",
                self.bytes
            )
        } else {
            write!(f, "{} bytes cannot be allocated", self.bytes)
        }
    }
}

impl std::error::Error for AllocError {}

/// Bytes of `rows × cols` elements of `T`, exactly (saturating at `u128::MAX`, far past any limit).
pub fn bytes_of<T>(rows: usize, cols: usize) -> u128 {
    (rows as u128)
        .saturating_mul(cols as u128)
        .saturating_mul(std::mem::size_of::<T>() as u128)
}

/// `Err` if `rows × cols` elements of `T` are more than `MAX_OUTPUT_BYTES`.
pub fn check_size<T>(rows: usize, cols: usize) -> Result<usize, AllocError> {
    let bytes = bytes_of::<T>(rows, cols);
    if bytes > MAX_OUTPUT_BYTES {
        return Err(AllocError {
            bytes,
            over_limit: true,
        });
    }
    // At most 2^40 bytes, so the element count fits in a usize on every 64-bit target; a 32-bit
    // target would fail the allocation below instead.
    usize::try_from(rows as u128 * cols as u128).map_err(|_| AllocError {
        bytes,
        over_limit: true,
    })
}

/// `v` resized to `n` elements (new ones `value`), or an error; `v` is unchanged on error.
pub fn try_resize<T: Clone>(v: &mut Vec<T>, n: usize, value: T) -> Result<(), AllocError> {
    check_size::<T>(n, 1)?;
    if n > v.len() {
        v.try_reserve_exact(n - v.len()).map_err(|_| AllocError {
            bytes: bytes_of::<T>(n, 1),
            over_limit: false,
        })?;
    }
    v.resize(n, value);
    Ok(())
}

/// A vector of `n` copies of `value`, or an error (never an abort).
pub fn try_filled<T: Clone>(n: usize, value: T) -> Result<Vec<T>, AllocError> {
    try_matrix(n, 1, value)
}

/// A row-major `rows × cols` buffer of `value`, or an error (never an abort, never an overflow).
pub fn try_matrix<T: Clone>(rows: usize, cols: usize, value: T) -> Result<Vec<T>, AllocError> {
    let n = check_size::<T>(rows, cols)?;
    let mut v = Vec::new();
    try_resize(&mut v, n, value)?;
    Ok(v)
}

/// The allocator's answer, made visible to the optimiser as used. LLVM may delete an allocation
/// whose memory is never touched, together with its `dealloc`, and then takes the deleted call to
/// have succeeded: in an optimised build a buffer that is made and dropped unused (a caller that
/// only checks the size can be had, or a test) came back `Ok` for any size, even one no allocator
/// can serve, while a debug build saw the null. Passing the pointer through `black_box` lets it
/// escape, so the call stays and a refusal is always seen.
#[inline(always)]
fn observed(ptr: *mut u8) -> *mut u8 {
    std::hint::black_box(ptr)
}

/// Element types whose all-zero bit pattern is the value zero.
pub trait Zeroed: Copy {}
impl Zeroed for u8 {}
impl Zeroed for u32 {}
impl Zeroed for i32 {}
impl Zeroed for i64 {}
impl Zeroed for f32 {}

/// `n` zeros, allocated zeroed (lazily, by the OS, for large buffers: nothing is written here),
/// or an error (never an abort).
pub fn try_zeroed<T: Zeroed>(n: usize) -> Result<Vec<T>, AllocError> {
    let n = check_size::<T>(n, 1)?;
    if n == 0 || std::mem::size_of::<T>() == 0 {
        return Ok(Vec::new());
    }
    let fail = AllocError {
        bytes: bytes_of::<T>(n, 1),
        over_limit: false,
    };
    let layout = Layout::array::<T>(n).map_err(|_| fail)?;
    // SAFETY: `layout` has a non-zero size.
    let ptr = observed(unsafe { alloc_zeroed(layout) }).cast::<T>();
    if ptr.is_null() {
        return Err(fail);
    }
    // SAFETY: allocated by the global allocator with the layout of `[T; n]`, and all `n`
    // elements are initialised: zero bits are a valid `T` (`Zeroed`).
    Ok(unsafe { Vec::from_raw_parts(ptr, n, n) })
}

/// A zeroed, 64-byte-aligned byte buffer allocated once and never moved or resized (the page
/// buffer of a cache). Zeroed lazily by the OS where it can (`calloc`-like), so a large, mostly
/// unused cache costs address space rather than memory. Synchronising access is the owner's job.
pub struct ZeroedBytes {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain bytes with a unique owner; the owner synchronises every access.
unsafe impl Send for ZeroedBytes {}
// SAFETY: as above.
unsafe impl Sync for ZeroedBytes {}

const BUFFER_ALIGN: usize = 64;

impl ZeroedBytes {
    /// `len` zero bytes, or an error if the allocator refuses (not capped by `MAX_OUTPUT_BYTES`).
    pub fn new(len: usize) -> Result<Self, AllocError> {
        let fail = AllocError {
            bytes: len as u128,
            over_limit: false,
        };
        if len == 0 {
            return Ok(ZeroedBytes {
                ptr: NonNull::<[u8; BUFFER_ALIGN]>::dangling().cast(),
                len,
            });
        }
        let layout = Layout::from_size_align(len, BUFFER_ALIGN).map_err(|_| fail)?;
        // SAFETY: `layout` has a non-zero size.
        let ptr = observed(unsafe { alloc_zeroed(layout) });
        NonNull::new(ptr)
            .map(|ptr| ZeroedBytes { ptr, len })
            .ok_or(fail)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte; valid for `len` bytes as long as `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for ZeroedBytes {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: allocated in `new` with this very layout (which was valid then).
            unsafe {
                dealloc(
                    self.ptr.as_ptr(),
                    Layout::from_size_align_unchecked(self.len, BUFFER_ALIGN),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_sizes_are_refused_without_trying() {
        let e = try_matrix(1 << 40, 1 << 40, 0u8).unwrap_err();
        assert!(e.over_limit && e.bytes == 1 << 80);
        assert!(
            try_matrix(usize::MAX, usize::MAX, 0i32)
                .unwrap_err()
                .over_limit
        );
        assert!(try_filled((1 << 38) + 1, 0f32).unwrap_err().over_limit);
        assert_eq!(try_matrix(0, usize::MAX, 7i32).unwrap(), Vec::<i32>::new());
        assert_eq!(try_matrix(2, 3, -1i32).unwrap(), vec![-1; 6]);
        let mut v = vec![1u8, 2];
        assert!(try_resize(&mut v, usize::MAX, 0).is_err());
        assert_eq!(v, [1, 2]);
        assert!(e.to_string().contains("2^40"));
        assert_eq!(try_zeroed::<u32>(3).unwrap(), vec![0; 3]);
        assert!(try_zeroed::<i64>(0).unwrap().is_empty());
        assert!(try_zeroed::<f32>(1 << 39).unwrap_err().over_limit);
    }

    #[test]
    fn an_allocation_the_allocator_refuses_is_an_error() {
        // Just under isize::MAX: a valid layout no allocator can serve. The buffer is dropped
        // unused, the case the optimiser could elide (`observed`): this must hold in release too.
        let e = ZeroedBytes::new(isize::MAX as usize - 4096).err().unwrap();
        assert!(!e.over_limit);
        assert!(e.to_string().contains("cannot be allocated"));
        let b = ZeroedBytes::new(100_000).unwrap();
        assert_eq!(b.len(), 100_000);
        assert_eq!(b.as_ptr() as usize % BUFFER_ALIGN, 0);
        // SAFETY: 100_000 bytes, zeroed.
        let s = unsafe { std::slice::from_raw_parts(b.as_ptr(), b.len()) };
        assert!(s.iter().all(|x| *x == 0));
        assert!(ZeroedBytes::new(0).unwrap().is_empty());
    }
}

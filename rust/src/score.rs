//! Fused lightning-indexer scoring straight from FP8 keys (dsa.md §4):
//! `I[s] = sk[s] · Σ_h hw[h] · ReLU(q[h] · k8[s])` for one query token and a
//! run of consecutive keys, with `hw[h] = w[h] · D^-0.5 · sq[h]` folded in by
//! the caller.
//!
//! Every kernel computes the same thing in the same order, so the SIMD kernels
//! equal their scalar twin bit for bit: lane `h` accumulates `q[h][d] · k[d]`
//! with one FMA per `d`, in order of `d`; the ReLU'd, weighted heads are summed
//! by a fixed halving tree (`tree_sum`). The x86 kernels decode e4m3 through
//! F16C (the code's bits shifted into an f16 give the value / 256) and fold
//! the 256 back into the key's scale; both scalings are exact powers of two.
//! The AVX2 kernel sums the tree in registers: head vectors `j` and `j + hp/16` are
//! scored together (the tree's first step), and the in-vector steps (+4, +2, +1) run
//! for eight keys at once across registers (`lane_sums8`), in the same order.
//!
//! Rows that read the same keys (a prefill chunk's rows of one request) are scored
//! together by `score_keys_rows`: each key decoded once for all of them, each row's
//! scores bit for bit what `score_keys` gives it alone.

use crate::cpu::Isa;
use crate::fp8::DECODE_TABLE;

/// Most indexer heads a query may have (DeepSeek-V3.2 has 64, GLM-5 32).
pub const MAX_HEADS: usize = 256;

/// Heads are padded with zero weight to a power of two of at least 16, so the
/// head sum's halving tree is the same for every vector width.
pub fn padded_heads(heads: usize) -> usize {
    heads.max(16).next_power_of_two()
}

/// One query token in the layout the kernels read.
#[derive(Clone, Copy)]
pub struct Query<'a> {
    /// Queries transposed: `qt[d · hp + h]`, `[head_dim][hp]`; zero past the real heads.
    pub qt: &'a [f32],
    /// Weight of each head after the ReLU, `[hp]`; zero past the real heads.
    pub hw: &'a [f32],
    /// Padded head count (`padded_heads`).
    pub hp: usize,
    /// Key width.
    pub d: usize,
    /// Empty: score in float32 from `qt`. Otherwise the queries rounded to bfloat16 in pairs,
    /// `[d/2][hp]` (`score_bf16::build_pairs`), and the bf16 kernels score them (`qt` unread).
    pub pairs: &'a [u32],
}

/// `score_keys` was handed buffers whose sizes do not agree (a caller bug); nothing was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError(pub String);

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "score_keys: {}", self.0)
    }
}

impl std::error::Error for ShapeError {}

/// The sizes `score_keys` relies on: `hp` a power of two in `[16, MAX_HEADS]`, `qt` `d × hp`,
/// `hw` `hp`, `codes` `n × d`, `out` `n`.
fn check_shapes(q: Query<'_>, codes: &[u8], n: usize, out: usize) -> Result<(), ShapeError> {
    if !(q.hp >= 16 && q.hp.is_power_of_two() && q.hp <= MAX_HEADS) {
        return Err(ShapeError(format!(
            "padded heads {} is not a power of two in [16, {MAX_HEADS}]",
            q.hp
        )));
    }
    if q.d.checked_mul(q.hp) != Some(q.qt.len()) || q.hw.len() != q.hp {
        return Err(ShapeError(format!(
            "queries of {} and weights of {} values for {} heads of {}",
            q.qt.len(),
            q.hw.len(),
            q.hp,
            q.d
        )));
    }
    if !q.pairs.is_empty() && q.d.div_ceil(2).checked_mul(q.hp) != Some(q.pairs.len()) {
        return Err(ShapeError(format!(
            "{} bf16 query pairs for {} heads of {}",
            q.pairs.len(),
            q.hp,
            q.d
        )));
    }
    if n.checked_mul(q.d) != Some(codes.len()) || out != n {
        return Err(ShapeError(format!(
            "{} code bytes and {out} outputs for {n} keys of {}",
            codes.len(),
            q.d
        )));
    }
    Ok(())
}

/// Scores of `scales.len()` consecutive keys (`codes`: `n × d` e4m3fn bytes)
/// into `out`. `scratch` is reused between calls. Sizes that do not agree are
/// an error (nothing written), checked before any kernel runs.
pub fn score_keys(
    isa: Isa,
    q: Query<'_>,
    codes: &[u8],
    scales: &[f32],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) -> Result<(), ShapeError> {
    check_shapes(q, codes, scales.len(), out.len())?;
    if !q.pairs.is_empty() {
        crate::score_bf16::score_keys_bf16(isa, q, codes, scales, out, scratch);
        return Ok(());
    }
    let simd_width_ok = q.d.is_multiple_of(16);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has the features (checked by `supported`) and the slice
        // lengths the kernel relies on were checked above (`check_shapes`).
        Isa::Avx512 if simd_width_ok && q.hp == 16 && isa.supported() => unsafe {
            x86::score_keys_avx512_h16(q, codes, scales, out, scratch)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512 if simd_width_ok && isa.supported() => unsafe {
            x86::score_keys_avx512(q, codes, scales, out, scratch)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 if simd_width_ok && isa.supported() => unsafe {
            x86::score_keys_avx2(q, codes, scales, out, scratch)
        },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Isa::Neon if simd_width_ok && isa.supported() => unsafe {
            neon::score_keys_neon(q, codes, scales, out, scratch)
        },
        _ => score_keys_scalar(q, codes, scales, out, scratch),
    }
    Ok(())
}

/// Scores of several query rows over the same run of keys (`codes`: `n × d` e4m3fn bytes, `n =
/// scales.len()`): row `r` scores the first `counts[r]` keys into `out[r · stride ..][..
/// counts[r]]` (a row with a count of 0 is skipped; the rest of `out` is left as it is). Each key
/// is decoded once for all the rows; every row's scores are bit for bit those `score_keys` gives
/// it alone. Sizes that do not agree are an error (nothing written), checked before any kernel.
#[allow(clippy::too_many_arguments)]
pub fn score_keys_rows(
    isa: Isa,
    qs: &[Query<'_>],
    counts: &[usize],
    codes: &[u8],
    scales: &[f32],
    out: &mut [f32],
    stride: usize,
    scratch: &mut Vec<f32>,
) -> Result<(), ShapeError> {
    let n = scales.len();
    if qs.len() != counts.len() {
        return Err(ShapeError(format!(
            "{} queries and {} counts",
            qs.len(),
            counts.len()
        )));
    }
    for (r, (q, &m)) in qs.iter().zip(counts).enumerate() {
        check_shapes(*q, codes, n, n)?;
        if q.d != qs[0].d || q.hp != qs[0].hp || q.pairs.is_empty() != qs[0].pairs.is_empty() {
            return Err(ShapeError(format!("row {r}: queries of another shape")));
        }
        let end = r.checked_mul(stride).and_then(|o| o.checked_add(m));
        if m > n || (m > 0 && (m > stride || end.is_none_or(|e| e > out.len()))) {
            return Err(ShapeError(format!(
                "row {r}: {m} of {n} keys at stride {stride} in {} outputs",
                out.len()
            )));
        }
    }
    if !qs.is_empty() && !qs[0].pairs.is_empty() {
        crate::score_bf16::score_keys_rows_bf16(
            isa, qs, counts, codes, scales, out, stride, scratch,
        );
        return Ok(());
    }
    let simd = !qs.is_empty() && qs[0].d.is_multiple_of(16);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has the features (checked by `supported`) and the sizes were checked above.
        Isa::Avx512 if simd && qs[0].hp == 16 && isa.supported() => unsafe {
            x86::score_keys_rows_avx512_h16(qs, counts, codes, scales, out, stride, scratch)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512 if simd && isa.supported() => unsafe {
            x86::score_keys_rows_avx512(qs, counts, codes, scales, out, stride, scratch)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 if simd && isa.supported() => unsafe {
            x86::score_keys_rows_avx2(qs, counts, codes, scales, out, stride, scratch)
        },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Isa::Neon if simd && isa.supported() => unsafe {
            neon::score_keys_rows_neon(qs, counts, codes, scales, out, stride, scratch)
        },
        // The scalar twin: row by row.
        _ => {
            let d = qs.first().map_or(0, |q| q.d);
            for ((q, &m), r) in qs.iter().zip(counts).zip(0..) {
                if m > 0 {
                    let o = &mut out[r * stride..r * stride + m];
                    score_keys(isa, *q, &codes[..m * d], &scales[..m], o, scratch)?;
                }
            }
        }
    }
    Ok(())
}

/// The scalar twin: the definition, in the kernels' order of operations.
fn score_keys_scalar(
    q: Query<'_>,
    codes: &[u8],
    scales: &[f32],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let hp = q.hp;
    score_each_key(q, codes, scales, out, scratch, q.d, 1.0, |h, k| {
        let mut acc = 0.0f32;
        for (dd, kf) in k.iter().enumerate() {
            acc = q.qt[dd * hp + h].mul_add(*kf, acc);
        }
        acc
    });
}

/// The per-key loop of both scalar twins (float32 here, bfloat16 in `score_bf16`): key `s` is
/// decoded into `key_len ≥ d` floats (`DECODE_TABLE / unit`, zero past `d`), `dot(h, key)` is
/// head `h`'s product, and `out[s] = tree_sum(ReLU(dot) · hw) · (scale · unit)`. `unit` is a power
/// of two (1, or 256 where the SIMD twin decodes through F16C), so every step is exact either way.
#[allow(clippy::too_many_arguments)]
pub(crate) fn score_each_key(
    q: Query<'_>,
    codes: &[u8],
    scales: &[f32],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
    key_len: usize,
    unit: f32,
    dot: impl Fn(usize, &[f32]) -> f32,
) {
    let (d, hp) = (q.d, q.hp);
    scratch.resize(key_len + hp, 0.0);
    let (k, heads) = scratch.split_at_mut(key_len);
    k[d..].fill(0.0);
    for ((row, &sk), o) in codes.chunks_exact(d).zip(scales).zip(out.iter_mut()) {
        for (kf, c) in k.iter_mut().zip(row) {
            *kf = DECODE_TABLE[*c as usize] / unit;
        }
        for (h, head) in heads.iter_mut().enumerate() {
            *head = dot(h, k).max(0.0) * q.hw[h];
        }
        *o = tree_sum(heads) * (sk * unit);
    }
}

/// Sum by halving: `b[i] += b[i + n/2]` until one value is left (len a power of two).
fn tree_sum(b: &mut [f32]) -> f32 {
    let mut n = b.len();
    while n > 1 {
        n /= 2;
        for i in 0..n {
            b[i] += b[i + n];
        }
    }
    b[0]
}

/// What a SIMD scoring kernel gives the driver every one of them runs (`score_blocks`): how a key
/// is decoded, how a register block of `N` keys × all heads is scored, and the head sum.
pub(crate) trait BlockKernel {
    /// Keys per register block (1 to 6).
    const NK: usize;
    /// The decoded keys are the code values / `KEY_UNIT` (a power of two), folded back into the scale.
    const KEY_UNIT: f32;
    /// Floats of scratch one decoded key of width `d` takes.
    fn key_floats(d: usize) -> usize;
    /// Decode one key, `d` codes, into `dst` (`key_floats(d)` floats).
    ///
    /// # Safety
    /// The CPU has the kernel's features; `d` suits the kernel (`score_keys` checks both).
    unsafe fn decode(codes: &[u8], dst: &mut [f32]);
    /// `heads[i · hp + h]` = the weighted ReLU of head `h`'s product with decoded key `i < N`
    /// (`keys`: `NK` decoded keys, `heads`: `NK × hp`).
    ///
    /// # Safety
    /// As `decode`; the buffers are the sizes above.
    unsafe fn heads<const N: usize>(q: Query<'_>, keys: &[f32], heads: &mut [f32]);
    /// `tree_sum` of one key's `hp` heads, in the same order.
    ///
    /// # Safety
    /// As `decode`.
    unsafe fn tree_sum(heads: &mut [f32]) -> f32;
    /// The scores of a register block's `N` keys: `out[i] = tree_sum(heads of key i) ·
    /// (scales[i] · KEY_UNIT)` (`out`, `scales`: `N` values; `heads`: `NK × hp` floats of scratch).
    /// By default `heads` and `tree_sum` key by key; a kernel may sum in registers instead, in the
    /// same order.
    ///
    /// # Safety
    /// As `heads`.
    #[inline(always)]
    unsafe fn scores<const N: usize>(
        q: Query<'_>,
        keys: &[f32],
        heads: &mut [f32],
        scales: &[f32],
        out: &mut [f32],
    ) {
        let hp = q.hp;
        // SAFETY: forwarded.
        unsafe {
            Self::heads::<N>(q, keys, heads);
            for i in 0..N {
                out[i] =
                    Self::tree_sum(&mut heads[i * hp..(i + 1) * hp]) * (scales[i] * Self::KEY_UNIT);
            }
        }
    }
}

/// The driver of every SIMD kernel: keys in groups of `K::NK`, decoded, scored a register block at
/// a time, summed over heads and scaled. Inlined into each kernel's `#[target_feature]` entry.
///
/// # Safety
/// The CPU has the kernel's features and the sizes were checked (`check_shapes`).
#[inline(always)]
pub(crate) unsafe fn score_blocks<K: BlockKernel>(
    q: Query<'_>,
    codes: &[u8],
    scales: &[f32],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let n = scales.len();
    // SAFETY: forwarded.
    unsafe { score_blocks_rows::<K>(&[q], &[n], codes, scales, out, n, scratch) }
}

/// Keys decoded at a time when several rows share them (about 32 KiB of scratch at d = 64).
pub(crate) const ROWS_CHUNK_FLOATS: usize = 8192;

/// `score_blocks` for rows that read the same keys: row `r` scores the first `counts[r]` keys
/// into `out[r · stride ..][.. counts[r]]`. Each key is decoded once for all the rows (a chunk
/// of keys at a time, then every row's register blocks over it); with one row, one register
/// block's keys at a time. Every row's scores are those `score_blocks` gives it alone.
///
/// # Safety
/// As `score_blocks`; each query was checked against `codes` and `scales`, `counts[r] ≤
/// scales.len()`, and `out` holds every row's outputs (`check_rows`).
#[inline(always)]
pub(crate) unsafe fn score_blocks_rows<K: BlockKernel>(
    qs: &[Query<'_>],
    counts: &[usize],
    codes: &[u8],
    scales: &[f32],
    out: &mut [f32],
    stride: usize,
    scratch: &mut Vec<f32>,
) {
    debug_assert!((1..=6).contains(&K::NK) && qs.len() == counts.len() && !qs.is_empty());
    let (d, hp, kf) = (qs[0].d, qs[0].hp, K::key_floats(qs[0].d));
    let n = counts.iter().copied().max().unwrap_or(0);
    let chunk = if qs.len() == 1 {
        K::NK
    } else {
        (ROWS_CHUNK_FLOATS / kf.max(1) / K::NK).max(1) * K::NK
    };
    scratch.resize(chunk * kf + K::NK * hp, 0.0);
    let (k, heads) = scratch.split_at_mut(chunk * kf);
    let mut c0 = 0;
    // SAFETY: forwarded; k holds `chunk` decoded keys, heads NK × hp.
    unsafe {
        while c0 < n {
            let c1 = (c0 + chunk).min(n);
            for i in c0..c1 {
                let j = i - c0;
                K::decode(&codes[i * d..(i + 1) * d], &mut k[j * kf..(j + 1) * kf]);
            }
            for ((q, &m), r) in qs.iter().zip(counts).zip(0..) {
                let mut s = c0;
                while s < c1.min(m) {
                    let nk = (c1.min(m) - s).min(K::NK);
                    let kk = &k[(s - c0) * kf..];
                    let (sc, o) = (
                        &scales[s..s + nk],
                        &mut out[r * stride + s..r * stride + s + nk],
                    );
                    match nk {
                        6 => K::scores::<6>(*q, kk, heads, sc, o),
                        5 => K::scores::<5>(*q, kk, heads, sc, o),
                        4 => K::scores::<4>(*q, kk, heads, sc, o),
                        3 => K::scores::<3>(*q, kk, heads, sc, o),
                        2 => K::scores::<2>(*q, kk, heads, sc, o),
                        _ => K::scores::<1>(*q, kk, heads, sc, o),
                    }
                    s += nk;
                }
            }
            c0 = c1;
        }
    }
}

/// A SIMD kernel's entry point: `#[target_feature]` (so the inlined driver and the kernel's
/// blocks are compiled for the features) around `score_blocks` with the kernel.
macro_rules! simd_entry {
    ($(#[$doc:meta])* $name:ident, $features:literal, $kernel:ty) => {
        $(#[$doc])*
        #[target_feature(enable = $features)]
        pub unsafe fn $name(
            q: Query<'_>,
            codes: &[u8],
            scales: &[f32],
            out: &mut [f32],
            scratch: &mut Vec<f32>,
        ) {
            // SAFETY: forwarded; the features are this function's.
            unsafe { $crate::score::score_blocks::<$kernel>(q, codes, scales, out, scratch) }
        }
    };
}
#[cfg(target_arch = "x86_64")] // (for the bf16 kernel)
pub(crate) use simd_entry;

/// A SIMD kernel's entry point for rows sharing keys: `#[target_feature]` around
/// `score_blocks_rows` with the kernel (`score_keys_rows`), or around another rows driver
/// (`driver = x86::score_rows_h16` for the few-head kernels).
macro_rules! simd_rows_entry {
    ($(#[$doc:meta])* $name:ident, $features:literal, $kernel:ty) => {
        simd_rows_entry!(
            $(#[$doc])* $name, $features, $kernel, driver = $crate::score::score_blocks_rows
        );
    };
    ($(#[$doc:meta])* $name:ident, $features:literal, $kernel:ty, driver = $($driver:ident)::+) => {
        $(#[$doc])*
        #[target_feature(enable = $features)]
        pub unsafe fn $name(
            qs: &[Query<'_>],
            counts: &[usize],
            codes: &[u8],
            scales: &[f32],
            out: &mut [f32],
            stride: usize,
            scratch: &mut Vec<f32>,
        ) {
            // SAFETY: forwarded; the features are this function's.
            unsafe { $($driver)::+::<$kernel>(qs, counts, codes, scales, out, stride, scratch) }
        }
    };
}

#[cfg(target_arch = "x86_64")] // (for the bf16 kernels)
pub(crate) use simd_rows_entry;

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{BlockKernel, Query};
    use std::arch::x86_64::*;

    /// 16 e4m3 codes as the f16 bit patterns whose values are code value / 256:
    /// `(c & 0x7f) << 7 | (c & 0x80) << 8`, as `((c << 8) >> 1 arithmetic) & !0x4000` (the sign
    /// lands in bits 15 and 14, the magnitude in 13..7; bit 14 is cleared).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) fn e4m3_to_f16_bits(b: __m128i) -> __m256i {
        let w = _mm256_slli_epi16::<8>(_mm256_cvtepu8_epi16(b));
        _mm256_and_si256(
            _mm256_srai_epi16::<1>(w),
            _mm256_set1_epi16(0xbfffu16 as i16),
        )
    }

    /// Decode one key (`d` codes, `d % 16 == 0`) into `dst`, scaled by 1/256.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn decode_avx2(src: &[u8], dst: &mut [f32]) {
        debug_assert!(src.len().is_multiple_of(16) && dst.len() >= src.len());
        for (c, o) in src.chunks_exact(16).zip(dst.chunks_exact_mut(16)) {
            // SAFETY: `c` has 16 bytes and `o` 16 floats.
            unsafe {
                let h = e4m3_to_f16_bits(_mm_loadu_si128(c.as_ptr().cast()));
                _mm256_storeu_ps(o.as_mut_ptr(), _mm256_cvtph_ps(_mm256_castsi256_si128(h)));
                _mm256_storeu_ps(
                    o.as_mut_ptr().add(8),
                    _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h)),
                );
            }
        }
    }

    /// `tree_sum` of `b` (a power of two ≥ 8 long) with 8-wide adds, same order.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn tree_sum_avx2(b: &mut [f32]) -> f32 {
        let p = b.as_mut_ptr();
        let mut n = b.len();
        // SAFETY: every index is below the current n ≤ b.len().
        unsafe {
            while n > 8 {
                n /= 2;
                for i in (0..n).step_by(8) {
                    _mm256_storeu_ps(
                        p.add(i),
                        _mm256_add_ps(_mm256_loadu_ps(p.add(i)), _mm256_loadu_ps(p.add(i + n))),
                    );
                }
            }
            let v = _mm256_loadu_ps(p);
            let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let y = _mm_add_ps(x, _mm_movehl_ps(x, x));
            _mm_cvtss_f32(_mm_add_ss(y, _mm_shuffle_ps::<1>(y, y)))
        }
    }

    /// `HB` vectors of 8 heads starting at head `h0`, `NK` decoded keys: the
    /// weighted ReLU of each head's dot product into `heads[i · hp + h]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)] // acc[j][i] is indexed along both axes
    unsafe fn block_avx2<const HB: usize, const NK: usize>(
        q: Query<'_>,
        h0: usize,
        k: &[f32],
        heads: &mut [f32],
    ) {
        let (d, hp) = (q.d, q.hp);
        debug_assert!(h0 + HB * 8 <= hp && k.len() >= NK * d && heads.len() >= NK * hp);
        let (qp, kp, hd) = (
            q.qt.as_ptr().wrapping_add(h0),
            k.as_ptr(),
            heads.as_mut_ptr(),
        );
        let mut acc = [[_mm256_setzero_ps(); NK]; HB];
        // SAFETY: qt is d × hp, k is NK × d, heads NK × hp, hw hp (asserted by the caller).
        unsafe {
            for dd in 0..d {
                let mut qv = [_mm256_setzero_ps(); HB];
                for (j, v) in qv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(qp.add(dd * hp + j * 8));
                }
                for i in 0..NK {
                    let kb = _mm256_broadcast_ss(&*kp.add(i * d + dd));
                    for j in 0..HB {
                        acc[j][i] = _mm256_fmadd_ps(qv[j], kb, acc[j][i]);
                    }
                }
            }
            let zero = _mm256_setzero_ps();
            for (j, acc_j) in acc.iter().enumerate() {
                let w = _mm256_loadu_ps(q.hw.as_ptr().add(h0 + j * 8));
                for (i, a) in acc_j.iter().enumerate() {
                    _mm256_storeu_ps(
                        hd.add(i * hp + h0 + j * 8),
                        _mm256_mul_ps(_mm256_max_ps(*a, zero), w),
                    );
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn heads_avx2<const NK: usize>(q: Query<'_>, k: &[f32], heads: &mut [f32]) {
        // SAFETY: forwarded; hp is a power of two ≥ 16, so it splits into blocks of 16.
        // 2 head vectors × 6 keys = 12 accumulators + 2 queries + 1 broadcast fit the 16 ymm registers.
        unsafe {
            for h0 in (0..q.hp).step_by(16) {
                block_avx2::<2, NK>(q, h0, k, heads);
            }
        }
    }

    /// A kernel that decodes through F16C (keys / 256) and sums heads with `tree_sum_avx2`: its
    /// decoder and head blocks (and, given, a `scores` that sums heads in registers), forwarded.
    macro_rules! f16c_kernel {
        ($kernel:ident, $decode:ident, $heads:ident $(, scores = $scores:ident)?) => {
            impl BlockKernel for $kernel {
                const NK: usize = 6;
                const KEY_UNIT: f32 = 256.0;
                fn key_floats(d: usize) -> usize {
                    d
                }
                #[inline(always)]
                unsafe fn decode(codes: &[u8], dst: &mut [f32]) {
                    // SAFETY: forwarded.
                    unsafe { $decode(codes, dst) }
                }
                #[inline(always)]
                unsafe fn heads<const N: usize>(q: Query<'_>, keys: &[f32], heads: &mut [f32]) {
                    // SAFETY: forwarded.
                    unsafe { $heads::<N>(q, keys, heads) }
                }
                #[inline(always)]
                unsafe fn tree_sum(heads: &mut [f32]) -> f32 {
                    // SAFETY: forwarded.
                    unsafe { tree_sum_avx2(heads) }
                }
                $(
                    #[inline(always)]
                    unsafe fn scores<const N: usize>(
                        q: Query<'_>,
                        keys: &[f32],
                        heads: &mut [f32],
                        scales: &[f32],
                        out: &mut [f32],
                    ) {
                        // SAFETY: forwarded (`heads` is NK × hp floats, more than the sums need).
                        unsafe { $scores::<N>(q, keys, heads, scales, out) }
                    }
                )?
            }
        };
    }

    /// Head vectors `ja` and `jb` (8 heads each, `jb = ja + hp / 16`), `NK` decoded keys: the
    /// first step of the head sum's tree for each key, `ReLU(a) · w_a + ReLU(b) · w_b`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pair_avx2<const NK: usize>(
        q: Query<'_>,
        ja: usize,
        jb: usize,
        k: &[f32],
    ) -> [__m256; NK] {
        let (d, hp) = (q.d, q.hp);
        debug_assert!(ja < jb && 8 * jb + 8 <= hp && k.len() >= NK * d);
        let (qa, qb, kp) = (
            q.qt.as_ptr().wrapping_add(8 * ja),
            q.qt.as_ptr().wrapping_add(8 * jb),
            k.as_ptr(),
        );
        let mut a = [_mm256_setzero_ps(); NK];
        let mut b = [_mm256_setzero_ps(); NK];
        // SAFETY: qt is d × hp, k is NK × d, hw hp (asserted by the caller).
        unsafe {
            for dd in 0..d {
                let va = _mm256_loadu_ps(qa.add(dd * hp));
                let vb = _mm256_loadu_ps(qb.add(dd * hp));
                for i in 0..NK {
                    let kb = _mm256_broadcast_ss(&*kp.add(i * d + dd));
                    a[i] = _mm256_fmadd_ps(va, kb, a[i]);
                    b[i] = _mm256_fmadd_ps(vb, kb, b[i]);
                }
            }
            let zero = _mm256_setzero_ps();
            let wa = _mm256_loadu_ps(q.hw.as_ptr().add(8 * ja));
            let wb = _mm256_loadu_ps(q.hw.as_ptr().add(8 * jb));
            let mut u = [zero; NK];
            for i in 0..NK {
                u[i] = _mm256_add_ps(
                    _mm256_mul_ps(_mm256_max_ps(a[i], zero), wa),
                    _mm256_mul_ps(_mm256_max_ps(b[i], zero), wb),
                );
            }
            u
        }
    }

    /// The in-vector steps of `tree_sum` (lane `i` + lane `i + 4`, then `+ 2`, then `+ 1`) for
    /// eight keys' head vectors at once: lane `i` of the result is key `i`'s sum.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn lane_sums8(u: &[__m256; 8]) -> __m256 {
        // [x_i | x_{i+4}] with x = lo + hi (the tree's + 4 step), keys i and i + 4.
        let x = |i: usize| {
            _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(u[i], u[i + 4]),
                _mm256_permute2f128_ps::<0x31>(u[i], u[i + 4]),
            )
        };
        let (x04, x15, x26, x37) = (x(0), x(1), x(2), x(3));
        // The + 2 step: [y_0, y_1 of key i, key i + 1 | the same for i + 4, i + 5].
        let y = |a: __m256, b: __m256| {
            _mm256_add_ps(
                _mm256_shuffle_ps::<0x44>(a, b),
                _mm256_shuffle_ps::<0xEE>(a, b),
            )
        };
        let (y0, y1) = (y(x04, x15), y(x26, x37));
        // The + 1 step: keys 0..3 | 4..7 in order.
        _mm256_add_ps(
            _mm256_shuffle_ps::<0x88>(y0, y1),
            _mm256_shuffle_ps::<0xDD>(y0, y1),
        )
    }

    /// The scores of `NK ≤ 6` keys: the head sum's tree summed in registers, in `tree_sum`'s
    /// order. Head vectors `j` and `j + hp / 16` are scored together (the tree's first step);
    /// for `hp > 16` those sums are kept in `part` (`NK × hp / 2` floats) and halved per key.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scores_avx2<const NK: usize>(
        q: Query<'_>,
        k: &[f32],
        part: &mut [f32],
        scales: &[f32],
        out: &mut [f32],
    ) {
        let half = q.hp / 16;
        debug_assert!(NK <= 6 && part.len() >= NK * half * 8 && scales.len() == NK);
        let mut u = [_mm256_setzero_ps(); 8];
        // SAFETY: forwarded; hp is a power of two ≥ 16, part holds NK × half vectors.
        unsafe {
            if half == 1 {
                u[..NK].copy_from_slice(&pair_avx2::<NK>(q, 0, 1, k));
            } else {
                let pp = part.as_mut_ptr();
                for j in 0..half {
                    let v = pair_avx2::<NK>(q, j, j + half, k);
                    for (i, vi) in v.iter().enumerate() {
                        _mm256_storeu_ps(pp.add((i * half + j) * 8), *vi);
                    }
                }
                for (i, ui) in u.iter_mut().take(NK).enumerate() {
                    let p = pp.add(i * half * 8);
                    let mut n = half;
                    while n > 1 {
                        n /= 2;
                        for j in 0..n {
                            _mm256_storeu_ps(
                                p.add(j * 8),
                                _mm256_add_ps(
                                    _mm256_loadu_ps(p.add(j * 8)),
                                    _mm256_loadu_ps(p.add((j + n) * 8)),
                                ),
                            );
                        }
                    }
                    *ui = _mm256_loadu_ps(p);
                }
            }
            let mut z = [0.0f32; 8];
            _mm256_storeu_ps(z.as_mut_ptr(), lane_sums8(&u));
            for i in 0..NK {
                out[i] = z[i] * (scales[i] * 256.0);
            }
        }
    }

    /// AVX2 + FMA + F16C: 6 keys × 16 heads per register block, the head sums in registers.
    struct Avx2;

    f16c_kernel!(Avx2, decode_avx2, heads_avx2, scores = scores_avx2);

    simd_entry!(
        /// AVX2 + FMA + F16C twin of `score_keys_scalar` (`Avx2` in the shared driver).
        score_keys_avx2,
        "avx2,fma,f16c",
        Avx2
    );

    simd_rows_entry!(
        /// `score_keys_avx2` for rows sharing keys (`score_keys_rows`).
        score_keys_rows_avx2,
        "avx2,fma,f16c",
        Avx2
    );

    /// Decode one key with AVX-512 (16 codes per conversion), scaled by 1/256.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,f16c")]
    unsafe fn decode_avx512(src: &[u8], dst: &mut [f32]) {
        for (c, o) in src.chunks_exact(16).zip(dst.chunks_exact_mut(16)) {
            // SAFETY: `c` has 16 bytes and `o` 16 floats.
            unsafe { decode16_avx512(c.as_ptr(), o.as_mut_ptr()) }
        }
    }

    /// Decode 16 codes at `src` into 16 floats at `dst` (code value / 256).
    ///
    /// # Safety
    /// `src` has 16 readable bytes and `dst` 16 writable floats.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,f16c")]
    unsafe fn decode16_avx512(src: *const u8, dst: *mut f32) {
        // SAFETY: forwarded.
        unsafe {
            let h = e4m3_to_f16_bits(_mm_loadu_si128(src.cast()));
            _mm512_storeu_ps(dst, _mm512_cvtph_ps(h));
        }
    }

    /// `HB` vectors of 16 heads from `h0`, `NK` keys (see `block_avx2`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)] // acc[j][i] is indexed along both axes
    unsafe fn block_avx512<const HB: usize, const NK: usize>(
        q: Query<'_>,
        h0: usize,
        k: &[f32],
        heads: &mut [f32],
    ) {
        let (d, hp) = (q.d, q.hp);
        debug_assert!(h0 + HB * 16 <= hp && k.len() >= NK * d && heads.len() >= NK * hp);
        let (qp, kp, hd) = (
            q.qt.as_ptr().wrapping_add(h0),
            k.as_ptr(),
            heads.as_mut_ptr(),
        );
        let mut acc = [[_mm512_setzero_ps(); NK]; HB];
        // SAFETY: as in `block_avx2`.
        unsafe {
            for dd in 0..d {
                let mut qv = [_mm512_setzero_ps(); HB];
                for (j, v) in qv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(qp.add(dd * hp + j * 16));
                }
                for i in 0..NK {
                    let kb = _mm512_set1_ps(*kp.add(i * d + dd));
                    for j in 0..HB {
                        acc[j][i] = _mm512_fmadd_ps(qv[j], kb, acc[j][i]);
                    }
                }
            }
            let zero = _mm512_setzero_ps();
            for (j, acc_j) in acc.iter().enumerate() {
                let w = _mm512_loadu_ps(q.hw.as_ptr().add(h0 + j * 16));
                for (i, a) in acc_j.iter().enumerate() {
                    _mm512_storeu_ps(
                        hd.add(i * hp + h0 + j * 16),
                        _mm512_mul_ps(_mm512_max_ps(*a, zero), w),
                    );
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn heads_avx512<const NK: usize>(q: Query<'_>, k: &[f32], heads: &mut [f32]) {
        // SAFETY: forwarded; hp is a power of two ≥ 16.
        unsafe {
            match q.hp {
                16 => block_avx512::<1, NK>(q, 0, k, heads),
                32 => block_avx512::<2, NK>(q, 0, k, heads),
                _ => {
                    for h0 in (0..q.hp).step_by(64) {
                        block_avx512::<4, NK>(q, h0, k, heads);
                    }
                }
            }
        }
    }

    /// AVX-512: 6 keys × 64 heads per register block.
    struct Avx512;

    f16c_kernel!(Avx512, decode_avx512, heads_avx512);

    simd_entry!(
        /// AVX-512 twin of `score_keys_scalar` (`Avx512` in the shared driver).
        score_keys_avx512,
        "avx512f,avx2,fma,f16c",
        Avx512
    );

    simd_rows_entry!(
        /// `score_keys_avx512` for rows sharing keys (`score_keys_rows`).
        score_keys_rows_avx512,
        "avx512f,avx2,fma,f16c",
        Avx512
    );

    /// The in-vector steps of `tree_sum` for 16 heads (lane `i` + lane `i + 8`, then `+ 4`, `+ 2`,
    /// `+ 1`) of sixteen keys' head vectors at once: lane `i` of the result is key `i`'s sum.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn lane_sums16(u: &[__m512; 16]) -> __m512 {
        // + 8: [key k's b[0..8] | key k + 8's b[0..8]] (as four 128-bit lanes: k, k, k + 8, k + 8).
        let x = |k: usize| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(u[k], u[k + 8]),
                _mm512_shuffle_f32x4::<0xEE>(u[k], u[k + 8]),
            )
        };
        // + 4: 128-bit lanes [k, k + 8, k + 4, k + 12], four values each.
        let y = |a: __m512, b: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(a, b),
                _mm512_shuffle_f32x4::<0xDD>(a, b),
            )
        };
        let (x0, x1, x2, x3) = (x(0), x(1), x(2), x(3));
        let (x4, x5, x6, x7) = (x(4), x(5), x(6), x(7));
        let (y0, y1, y2, y3) = (y(x0, x4), y(x1, x5), y(x2, x6), y(x3, x7));
        // + 2 (pairs of keys per 128-bit lane), then + 1: lanes [0..4 | 8..12 | 4..8 | 12..16].
        let z = |a: __m512, b: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(a, b),
                _mm512_shuffle_ps::<0xEE>(a, b),
            )
        };
        let (z01, z23) = (z(y0, y1), z(y2, y3));
        let f = _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(z01, z23),
            _mm512_shuffle_ps::<0xDD>(z01, z23),
        );
        _mm512_shuffle_f32x4::<0xD8>(f, f)
    }

    /// One register block of the few-head kernels: the 16 decoded keys at `kp` (`d` floats apart)
    /// against the query's one head vector, 16 FMA chains in order of `d`. With `next` given, chunk
    /// `dd` of the next block's codes is decoded into it at step `dd` (16 keys × d/16 chunks of 16
    /// codes: exactly one chunk per step), so the decoding overlaps the arithmetic.
    ///
    /// # Safety
    /// The features are enabled; `q.qt` holds `d × 16` floats, `kp` 16 keys of `d` floats, and with
    /// `next` = (codes, dst) 16 × `d` readable codes and as many writable floats.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn block16(
        q: Query<'_>,
        kp: *const f32,
        next: Option<(*const u8, *mut f32)>,
    ) -> [__m512; 16] {
        let d = q.d;
        let mut acc = [_mm512_setzero_ps(); 16];
        // SAFETY: as the caller promises.
        unsafe {
            for dd in 0..d {
                let qv = _mm512_loadu_ps(q.qt.as_ptr().add(dd * 16));
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(qv, _mm512_set1_ps(*kp.add(i * d + dd)), *a);
                }
                if let Some((codes, dst)) = next {
                    decode16_avx512(codes.add(dd * 16), dst.add(dd * 16));
                }
            }
        }
        acc
    }

    /// The 16 scores of a register block: `tree_sum(ReLU(acc) · hw) · (scale · 256)` per key, in
    /// `tree_sum`'s order (`lane_sums16`), stored at `out`.
    ///
    /// # Safety
    /// The features are enabled; `scales` has 16 readable floats and `out` 16 writable ones.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn finish16(q: Query<'_>, mut acc: [__m512; 16], scales: *const f32, out: *mut f32) {
        // SAFETY: hw holds 16 floats (checked by the callers); the rest as the caller promises.
        unsafe {
            let (w, zero) = (_mm512_loadu_ps(q.hw.as_ptr()), _mm512_setzero_ps());
            for a in acc.iter_mut() {
                *a = _mm512_mul_ps(_mm512_max_ps(*a, zero), w);
            }
            let sk = _mm512_mul_ps(_mm512_loadu_ps(scales), _mm512_set1_ps(256.0));
            _mm512_storeu_ps(out, _mm512_mul_ps(lane_sums16(&acc), sk));
        }
    }

    /// `score_keys_avx512` for queries of up to 16 heads (`hp == 16`, one head vector): 16 keys per
    /// register block (`block16`: 16 independent FMA chains, the next block decoded inside the FMA
    /// loop) and their head sums in registers (`finish16`). The last `n % 16` keys take
    /// `score_keys_avx512`: every key's score is the scalar twin's either way.
    ///
    /// # Safety
    /// The CPU has AVX-512F, AVX2, FMA and F16C; the sizes were checked (`check_shapes`), `q.hp ==
    /// 16` and `q.d % 16 == 0`.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn score_keys_avx512_h16(
        q: Query<'_>,
        codes: &[u8],
        scales: &[f32],
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        let (d, n) = (q.d, scales.len());
        debug_assert!(q.hp == 16 && d.is_multiple_of(16) && codes.len() == n * d);
        let full = n / 16 * 16;
        // Two blocks of 16 decoded keys: the one being scored and the next.
        scratch.resize(32 * d, 0.0);
        // SAFETY: block `b` reads keys b .. b + 16 ≤ full ≤ n and decodes keys b + 16 .. b + 32 only
        // when b + 32 ≤ full; each scratch half holds 16 × d floats; 16 scales and outputs per block.
        unsafe {
            let (cp, base) = (codes.as_ptr(), scratch.as_mut_ptr());
            if full > 0 {
                for j in 0..d {
                    decode16_avx512(cp.add(j * 16), base.add(j * 16));
                }
            }
            for (blk, b) in (0..full).step_by(16).enumerate() {
                let (kp, next) = if blk % 2 == 0 {
                    (base, base.add(16 * d))
                } else {
                    (base.add(16 * d), base)
                };
                let more = (b + 32 <= full).then(|| (cp.add((b + 16) * d), next));
                let acc = block16(q, kp, more);
                finish16(q, acc, scales.as_ptr().add(b), out.as_mut_ptr().add(b));
            }
            if full < n {
                score_keys_avx512(
                    q,
                    &codes[full * d..],
                    &scales[full..],
                    &mut out[full..],
                    scratch,
                );
            }
        }
    }

    /// What a few-head kernel (`hp == 16`: one head vector, 16 heads to the lanes) gives the driver
    /// of its rows (`score_rows_h16`): how keys are decoded into the scratch, how one register
    /// block of 16 decoded keys is scored, and what scores the last `count % 16` keys.
    pub(crate) trait FewHeadKernel {
        /// Floats of scratch one decoded key of width `d` takes.
        fn key_floats(d: usize) -> usize;
        /// Decode `keys` keys' codes (`keys × d` bytes at `codes`) into `dst`, at least every
        /// whole register block of 16 keys of them.
        ///
        /// # Safety
        /// The CPU has the kernel's features; `codes` has `keys × d` readable bytes and `dst`
        /// room for `keys × key_floats(d)` floats.
        unsafe fn decode(codes: *const u8, keys: usize, d: usize, dst: *mut f32);
        /// The 16 FMA chains of a register block: the 16 decoded keys at `kp` against the
        /// query's head vector, one lane per head (to be summed by `finish16`).
        ///
        /// # Safety
        /// As `decode`; `kp` holds 16 decoded keys.
        unsafe fn block16(q: Query<'_>, kp: *const f32) -> [__m512; 16];
        /// The scores of a row's last keys (fewer than 16), the kernel's bits.
        ///
        /// # Safety
        /// As `decode`; the sizes agree (`check_shapes`).
        unsafe fn tail(
            q: Query<'_>,
            codes: &[u8],
            scales: &[f32],
            out: &mut [f32],
            scratch: &mut Vec<f32>,
        );
    }

    /// The driver of the few-head rows kernels (float32 and bf16): a chunk of keys decoded once
    /// for all the rows (`K::decode`, about `ROWS_CHUNK_FLOATS` floats), then each row's whole
    /// register blocks of 16 over it (`K::block16`, `finish16`); a row's last `count % 16` keys
    /// take `K::tail`. Each row's scores are its kernel's bits for that row alone. Inlined into
    /// each kernel's `#[target_feature]` entry.
    ///
    /// # Safety
    /// The CPU has the kernel's features; `hp == 16` and `d` suits the kernel; the sizes were
    /// checked (`check_rows`: `counts[r] ≤ n`, outputs in range).
    #[inline(always)]
    pub(crate) unsafe fn score_rows_h16<K: FewHeadKernel>(
        qs: &[Query<'_>],
        counts: &[usize],
        codes: &[u8],
        scales: &[f32],
        out: &mut [f32],
        stride: usize,
        scratch: &mut Vec<f32>,
    ) {
        let (d, kf) = (qs[0].d, K::key_floats(qs[0].d));
        let n = counts.iter().copied().max().unwrap_or(0);
        // A multiple of 16 keys per chunk, about ROWS_CHUNK_FLOATS floats.
        let chunk = (super::ROWS_CHUNK_FLOATS / kf / 16).max(1) * 16;
        scratch.resize(chunk * kf, 0.0);
        let mut tail = Vec::new();
        let mut c0 = 0;
        // SAFETY: the chunk's keys c0 .. c1 ≤ n are decoded into the scratch (chunk × kf
        // floats); row r's block at s reads keys s .. s + 16 ≤ min(c1, counts[r]) of it, 16
        // scales, and writes out[r · stride + s ..][.. 16] (in range: checked by the caller).
        unsafe {
            while c0 < n {
                let c1 = (c0 + chunk).min(n);
                let kp = scratch.as_mut_ptr();
                K::decode(codes.as_ptr().add(c0 * d), c1 - c0, d, kp);
                for ((q, &m), r) in qs.iter().zip(counts).zip(0..) {
                    let end = c1.min(m);
                    let mut s = c0;
                    while s + 16 <= end {
                        let acc = K::block16(*q, kp.add((s - c0) * kf));
                        let o = out.as_mut_ptr().add(r * stride + s);
                        finish16(*q, acc, scales.as_ptr().add(s), o);
                        s += 16;
                    }
                    if s < end {
                        let o = &mut out[r * stride + s..r * stride + end];
                        K::tail(*q, &codes[s * d..end * d], &scales[s..end], o, &mut tail);
                    }
                }
                c0 = c1;
            }
        }
    }

    /// The float32 few-head kernel in the rows driver: keys decoded to floats (`decode16_avx512`),
    /// `block16` without the next block's decoding.
    struct F32H16;

    impl FewHeadKernel for F32H16 {
        fn key_floats(d: usize) -> usize {
            d
        }
        #[inline(always)]
        unsafe fn decode(codes: *const u8, keys: usize, d: usize, dst: *mut f32) {
            // SAFETY: as the trait promises: keys × d codes, as many floats, d % 16 == 0.
            unsafe {
                for j in 0..keys * d / 16 {
                    decode16_avx512(codes.add(j * 16), dst.add(j * 16));
                }
            }
        }
        #[inline(always)]
        unsafe fn block16(q: Query<'_>, kp: *const f32) -> [__m512; 16] {
            // SAFETY: forwarded.
            unsafe { block16(q, kp, None) }
        }
        #[inline(always)]
        unsafe fn tail(
            q: Query<'_>,
            codes: &[u8],
            scales: &[f32],
            out: &mut [f32],
            scratch: &mut Vec<f32>,
        ) {
            // SAFETY: forwarded.
            unsafe { score_keys_avx512(q, codes, scales, out, scratch) }
        }
    }

    simd_rows_entry!(
        /// `score_keys_rows` for queries of up to 16 heads (`score_rows_h16` with the float32
        /// kernel). Each row's scores are `score_keys`' bits. Safety: as `score_keys_avx512_h16`,
        /// for every row (`check_rows`: `counts[r] ≤ n`, outputs in range).
        score_keys_rows_avx512_h16,
        "avx512f,avx2,fma,f16c",
        F32H16,
        driver = score_rows_h16
    );
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{BlockKernel, Query, DECODE_TABLE};
    use std::arch::aarch64::*;

    /// `tree_sum` with 4-wide adds, same order.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn tree_sum_neon(b: &mut [f32]) -> f32 {
        let p = b.as_mut_ptr();
        let mut n = b.len();
        // SAFETY: every index is below the current n ≤ b.len().
        unsafe {
            while n > 4 {
                n /= 2;
                for i in (0..n).step_by(4) {
                    vst1q_f32(
                        p.add(i),
                        vaddq_f32(vld1q_f32(p.add(i)), vld1q_f32(p.add(i + n))),
                    );
                }
            }
            let v = vld1q_f32(p);
            let x = vadd_f32(vget_low_f32(v), vget_high_f32(v));
            vpadds_f32(x)
        }
    }

    /// `NK` keys × 16 heads from `h0` (see the x86 `block_avx2`).
    #[inline]
    #[target_feature(enable = "neon")]
    #[allow(clippy::needless_range_loop)] // acc[j][i] is indexed along both axes
    unsafe fn block_neon<const NK: usize>(q: Query<'_>, h0: usize, k: &[f32], heads: &mut [f32]) {
        const HB: usize = 4;
        let (d, hp) = (q.d, q.hp);
        debug_assert!(h0 + HB * 4 <= hp && k.len() >= NK * d && heads.len() >= NK * hp);
        let (qp, kp, hd) = (
            q.qt.as_ptr().wrapping_add(h0),
            k.as_ptr(),
            heads.as_mut_ptr(),
        );
        let mut acc = [[vdupq_n_f32(0.0); NK]; HB];
        // SAFETY: as in the x86 kernels.
        unsafe {
            for dd in 0..d {
                let mut qv = [vdupq_n_f32(0.0); HB];
                for (j, v) in qv.iter_mut().enumerate() {
                    *v = vld1q_f32(qp.add(dd * hp + j * 4));
                }
                for i in 0..NK {
                    let kb = vdupq_n_f32(*kp.add(i * d + dd));
                    for j in 0..HB {
                        acc[j][i] = vfmaq_f32(acc[j][i], qv[j], kb);
                    }
                }
            }
            let zero = vdupq_n_f32(0.0);
            for (j, acc_j) in acc.iter().enumerate() {
                let w = vld1q_f32(q.hw.as_ptr().add(h0 + j * 4));
                for (i, a) in acc_j.iter().enumerate() {
                    vst1q_f32(
                        hd.add(i * hp + h0 + j * 4),
                        vmulq_f32(vmaxq_f32(*a, zero), w),
                    );
                }
            }
        }
    }

    /// NEON: 4 keys × 16 heads per register block, keys decoded through the table (exact
    /// values, no 1/256 scaling).
    struct Neon;

    impl BlockKernel for Neon {
        const NK: usize = 4;
        const KEY_UNIT: f32 = 1.0;
        fn key_floats(d: usize) -> usize {
            d
        }
        #[inline(always)]
        unsafe fn decode(codes: &[u8], dst: &mut [f32]) {
            for (kf, c) in dst.iter_mut().zip(codes) {
                *kf = DECODE_TABLE[*c as usize];
            }
        }
        #[inline(always)]
        unsafe fn heads<const N: usize>(q: Query<'_>, keys: &[f32], heads: &mut [f32]) {
            for h0 in (0..q.hp).step_by(16) {
                // SAFETY: forwarded; hp is a power of two ≥ 16.
                unsafe { block_neon::<N>(q, h0, keys, heads) }
            }
        }
        #[inline(always)]
        unsafe fn tree_sum(heads: &mut [f32]) -> f32 {
            // SAFETY: forwarded.
            unsafe { tree_sum_neon(heads) }
        }
    }

    simd_entry!(
        /// NEON twin of `score_keys_scalar` (`Neon` in the shared driver).
        score_keys_neon,
        "neon",
        Neon
    );

    simd_rows_entry!(
        /// `score_keys_neon` for rows sharing keys (`score_keys_rows`).
        score_keys_rows_neon,
        "neon",
        Neon
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng as lcg;

    /// A random problem: FP8-valued queries (as the quantized path makes them), codes with no NaN.
    fn problem(
        heads: usize,
        d: usize,
        n: usize,
        seed: u64,
    ) -> (Vec<f32>, Vec<f32>, Vec<u8>, Vec<f32>) {
        let mut next = lcg(seed);
        let hp = padded_heads(heads);
        let mut qt = vec![0.0f32; d * hp];
        let mut hw = vec![0.0f32; hp];
        for h in 0..heads {
            for dd in 0..d {
                qt[dd * hp + h] = DECODE_TABLE[(next() % 0x7f) as usize]
                    * if next().is_multiple_of(2) { 1.0 } else { -1.0 };
            }
            hw[h] = (next() % 2001) as f32 / 1000.0 - 1.0;
        }
        let codes = (0..n * d)
            .map(|_| (next() % 256) as u8)
            .map(|c| if c & 0x7f == 0x7f { 0 } else { c })
            .collect();
        let scales = (0..n)
            .map(|_| 2f32.powi((next() % 20) as i32 - 12))
            .collect();
        (qt, hw, codes, scales)
    }

    fn f64_score(qt: &[f32], hw: &[f32], hp: usize, d: usize, key: &[u8], sk: f32) -> f64 {
        (0..hp)
            .map(|h| {
                let dot: f64 = (0..d)
                    .map(|dd| {
                        f64::from(qt[dd * hp + h]) * f64::from(DECODE_TABLE[key[dd] as usize])
                    })
                    .sum();
                f64::from(hw[h]) * dot.max(0.0)
            })
            .sum::<f64>()
            * f64::from(sk)
    }

    #[test]
    fn scalar_twin_is_close_to_the_f64_definition() {
        let (heads, d, n) = (5, 32, 9);
        let (qt, hw, codes, scales) = problem(heads, d, n, 3);
        let hp = padded_heads(heads);
        let q = Query {
            qt: &qt,
            hw: &hw,
            hp,
            d,
            pairs: &[],
        };
        let mut out = vec![0.0; n];
        score_keys(Isa::Scalar, q, &codes, &scales, &mut out, &mut Vec::new()).unwrap();
        for s in 0..n {
            let want = f64_score(&qt, &hw, hp, d, &codes[s * d..(s + 1) * d], scales[s]);
            let mag: f64 = 1e-5 * (want.abs() + 1e-3 * f64::from(scales[s]));
            assert!(
                (f64::from(out[s]) - want).abs() <= mag,
                "key {s}: {} vs {want}",
                out[s]
            );
        }
    }

    #[test]
    fn simd_kernels_equal_their_scalar_twin_bit_for_bit() {
        for isa in Isa::available() {
            for &(heads, d, n) in &[
                (64, 128, 67),
                (16, 16, 5),
                (32, 64, 13),
                (3, 128, 7),
                (100, 32, 4),
                (64, 128, 1),
            ] {
                let (qt, hw, codes, scales) = problem(heads, d, n, (heads * d + n) as u64);
                let q = Query {
                    qt: &qt,
                    hw: &hw,
                    hp: padded_heads(heads),
                    d,
                    pairs: &[],
                };
                let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
                score_keys(isa, q, &codes, &scales, &mut a, &mut Vec::new()).unwrap();
                score_keys(Isa::Scalar, q, &codes, &scales, &mut b, &mut Vec::new()).unwrap();
                assert_eq!(a, b, "{isa:?} heads={heads} d={d} n={n}");
            }
        }
    }

    #[test]
    fn f16c_route_decodes_every_non_nan_code_exactly() {
        // The identity the x86 kernels rely on: f16 with bits ((c & 0x7f) << 7 | (c & 0x80) << 8) = value / 256.
        for c in 0u16..256 {
            if c & 0x7f == 0x7f {
                continue;
            }
            let bits = ((c & 0x7f) << 7) | ((c & 0x80) << 8);
            let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
            let (e, m) = (i32::from((bits >> 10) & 0x1f), f32::from(bits & 0x3ff));
            let v = if e == 0 {
                m / 1024.0 * 2f32.powi(-14)
            } else {
                (1.0 + m / 1024.0) * 2f32.powi(e - 15)
            };
            assert_eq!(sign * v * 256.0, DECODE_TABLE[c as usize], "code {c:#x}");
        }
    }

    /// The x86 kernels' e4m3 → f16 bit conversion, on every code, against the identity above.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn f16c_bit_conversion_is_the_identity_on_every_code() {
        use std::arch::x86_64::*;
        if !Isa::Avx2.supported() {
            return;
        }
        for c0 in (0u16..256).step_by(16) {
            let codes: Vec<u8> = (c0..c0 + 16).map(|c| c as u8).collect();
            let mut got = [0u16; 16];
            // SAFETY: AVX2 is supported (checked above); 16 bytes in, 16 u16 out.
            unsafe {
                let v = x86::e4m3_to_f16_bits(_mm_loadu_si128(codes.as_ptr().cast()));
                _mm256_storeu_si256(got.as_mut_ptr().cast(), v);
            }
            for (c, g) in (c0..c0 + 16).zip(got) {
                assert_eq!(g, ((c & 0x7f) << 7) | ((c & 0x80) << 8), "code {c:#x}");
            }
        }
    }

    /// Uniform in [-1, 1) from the LCG's 31 bits.
    fn unit(next: &mut impl FnMut() -> u64) -> f32 {
        next() as f32 / (1u64 << 30) as f32 - 1.0
    }

    /// A random problem in the layout the kernels read. `fp8_queries`: query values are e4m3
    /// values (what `quantize_queries=True` makes); otherwise arbitrary float32 values across
    /// magnitudes 2^-10 .. 2^10, as the rotated but unquantized queries (`quantize_queries=False`)
    /// are. Head weights of both signs and zeros; scales 2^-14 .. 2^9; any non-NaN codes.
    fn random_problem(
        next: &mut impl FnMut() -> u64,
        heads: usize,
        d: usize,
        n: usize,
        fp8_queries: bool,
    ) -> (Vec<f32>, Vec<f32>, Vec<u8>, Vec<f32>) {
        let hp = padded_heads(heads);
        let mut qt = vec![0.0f32; d * hp];
        let mut hw = vec![0.0f32; hp];
        for h in 0..heads {
            for dd in 0..d {
                qt[dd * hp + h] = if fp8_queries {
                    let c = (next() % 256) as usize;
                    if c & 0x7f == 0x7f {
                        0.0
                    } else {
                        DECODE_TABLE[c]
                    }
                } else {
                    unit(next) * 2f32.powi((next() % 21) as i32 - 10)
                };
            }
            hw[h] = match next() % 8 {
                0 => 0.0,
                _ => unit(next) * 2f32.powi((next() % 9) as i32 - 4),
            };
        }
        let codes = (0..n * d)
            .map(|_| (next() % 256) as u8)
            .map(|c| if c & 0x7f == 0x7f { c ^ 1 } else { c })
            .collect();
        let scales = (0..n)
            .map(|_| 2f32.powi((next() % 24) as i32 - 14))
            .collect();
        (qt, hw, codes, scales)
    }

    /// Issue 19: every SIMD scoring kernel (AVX2, AVX-512 on x86-64; NEON on aarch64, run under
    /// qemu in CI) against its scalar twin, bit for bit, on random shapes and values — with FP8
    /// queries and with the unquantized float32 queries. Widths that are not a multiple of 16 take
    /// the scalar route on every path, and are compared too.
    #[test]
    fn every_simd_scoring_kernel_equals_its_scalar_twin_on_random_problems() {
        let mut next = lcg(0x005e_ed19);
        let paths: Vec<Isa> = Isa::available()
            .into_iter()
            .filter(|i| *i != Isa::Scalar)
            .collect();
        // Under qemu-aarch64 too: the NEON kernels must be the ones compared, not skipped.
        #[cfg(target_arch = "aarch64")]
        assert!(paths.contains(&Isa::Neon), "{paths:?}");
        let mut compared = 0;
        for case in 0..240 {
            let fp8_queries = case % 2 == 0;
            let heads = match next() % 4 {
                0 => 1 + (next() % 16) as usize,
                1 => [16, 32, 64, 128, 256][(next() % 5) as usize],
                _ => 1 + (next() % 100) as usize,
            };
            let d = [1usize, 2, 8, 16, 32, 64, 128, 256][(next() % 8) as usize];
            let n = (next() % 40) as usize;
            let (qt, hw, codes, scales) = random_problem(&mut next, heads, d, n, fp8_queries);
            let q = Query {
                qt: &qt,
                hw: &hw,
                hp: padded_heads(heads),
                d,
                pairs: &[],
            };
            let mut want = vec![0.0; n];
            score_keys(Isa::Scalar, q, &codes, &scales, &mut want, &mut Vec::new()).unwrap();
            for &isa in &paths {
                let mut got = vec![f32::NAN; n];
                // A reused scratch buffer, as the workers reuse theirs.
                let mut scratch = vec![f32::NAN; (next() % 64) as usize];
                score_keys(isa, q, &codes, &scales, &mut got, &mut scratch).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{isa:?} fp8_queries={fp8_queries} heads={heads} d={d} n={n}"
                );
                compared += 1;
            }
        }
        // Every compiled SIMD path of this CPU was exercised (none on a scalar-only machine).
        assert_eq!(compared, 240 * paths.len());
    }

    /// The few-head kernels (AVX-512 at up to 16 heads: 16 keys per register block, their head sums
    /// in registers) against the scalar twin, bit for bit: whole blocks, tails, and both kinds of
    /// queries.
    #[test]
    fn few_head_kernels_equal_the_scalar_twin_across_blocks_and_tails() {
        let mut next = lcg(0x0016_0016);
        for isa in Isa::available() {
            for &(heads, d, n) in &[
                (16, 64, 16),
                (16, 64, 17),
                (9, 64, 100),
                (16, 16, 33),
                (1, 128, 48),
                (16, 128, 257),
                (12, 32, 15),
            ] {
                for fp8_queries in [true, false] {
                    let (qt, hw, codes, scales) =
                        random_problem(&mut next, heads, d, n, fp8_queries);
                    let q = Query {
                        qt: &qt,
                        hw: &hw,
                        hp: padded_heads(heads),
                        d,
                        pairs: &[],
                    };
                    let (mut a, mut b) = (vec![f32::NAN; n], vec![0.0; n]);
                    score_keys(isa, q, &codes, &scales, &mut a, &mut vec![f32::NAN; 3]).unwrap();
                    score_keys(Isa::Scalar, q, &codes, &scales, &mut b, &mut Vec::new()).unwrap();
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&a), bits(&b), "{isa:?} heads={heads} d={d} n={n}");
                }
            }
        }
    }

    /// Rows sharing keys (`score_keys_rows`, the row-blocked prefill path): on every path, each
    /// row's scores equal `score_keys` of that row alone bit for bit, counts of 0 leave the row's
    /// outputs alone, and sizes that do not agree are errors.
    #[test]
    fn rows_sharing_keys_score_as_each_row_alone() {
        let mut next = lcg(0x0005_4a2e);
        for case in 0..60 {
            let heads = [1usize, 16, 20, 64, 100][(next() % 5) as usize];
            let d = [16usize, 32, 64, 128, 8][(next() % 5) as usize];
            let n = 1 + (next() % 200) as usize;
            let rows = 1 + (next() % 5) as usize;
            let (_, _, codes, scales) = random_problem(&mut next, heads, d, n, true);
            let probs: Vec<_> = (0..rows)
                .map(|_| random_problem(&mut next, heads, d, 0, case % 2 == 0))
                .collect();
            let hp = padded_heads(heads);
            let qs: Vec<Query<'_>> = probs
                .iter()
                .map(|(qt, hw, _, _)| Query {
                    qt,
                    hw,
                    hp,
                    d,
                    pairs: &[],
                })
                .collect();
            let counts: Vec<usize> = (0..rows)
                .map(|r| match (r + case) % 4 {
                    0 => n,
                    1 => 0,
                    _ => (next() as usize) % (n + 1),
                })
                .collect();
            let stride = n + (next() % 3) as usize;
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; rows * stride];
                let mut scratch = vec![1.0f32; (next() % 64) as usize];
                score_keys_rows(
                    isa,
                    &qs,
                    &counts,
                    &codes,
                    &scales,
                    &mut got,
                    stride,
                    &mut scratch,
                )
                .unwrap();
                for (r, q) in qs.iter().enumerate() {
                    let m = counts[r];
                    let mut want = vec![0.0f32; m];
                    score_keys(
                        isa,
                        *q,
                        &codes[..m * d],
                        &scales[..m],
                        &mut want,
                        &mut Vec::new(),
                    )
                    .unwrap();
                    let row = &got[r * stride..(r + 1) * stride];
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&row[..m]), bits(&want), "{isa:?} case {case} row {r}");
                    assert!(
                        row[m..].iter().all(|x| x.is_nan()),
                        "{isa:?} case {case} row {r}"
                    );
                }
            }
        }
        let (_, _, codes, scales) = random_problem(&mut next, 4, 16, 10, true);
        let (qt, hw, _, _) = random_problem(&mut next, 4, 16, 0, true);
        let q = Query {
            qt: &qt,
            hw: &hw,
            hp: 16,
            d: 16,
            pairs: &[],
        };
        let mut out = vec![0.0; 20];
        let mut s = Vec::new();
        for isa in Isa::available() {
            let mut run = |counts: &[usize], stride: usize, out: &mut [f32]| {
                let qs = vec![q; counts.len()];
                score_keys_rows(isa, &qs, counts, &codes, &scales, out, stride, &mut s)
            };
            assert!(run(&[10, 10], 10, &mut out).is_ok());
            assert!(run(&[11, 0], 11, &mut out).is_err(), "more keys than given");
            assert!(run(&[10, 10], 9, &mut out).is_err(), "rows overlap");
            assert!(
                run(&[10, 10], 10, &mut out[..19]).is_err(),
                "too few outputs"
            );
            assert!(run(&[10, 10, 1], 10, &mut out).is_err(), "too few outputs");
            let qs = [q, q];
            assert!(
                score_keys_rows(isa, &qs, &[1], &codes, &scales, &mut out, 10, &mut s).is_err()
            );
            let bad = Query { hp: 32, ..q };
            assert!(score_keys_rows(
                isa,
                &[q, bad],
                &[1, 1],
                &codes,
                &scales,
                &mut out,
                10,
                &mut s
            )
            .is_err());
        }
    }

    #[test]
    fn mismatched_buffers_are_an_error_not_a_panic() {
        let (qt, hw, codes, scales) = problem(4, 16, 3, 1);
        let q = Query {
            qt: &qt,
            hw: &hw,
            hp: 16,
            d: 16,
            pairs: &[],
        };
        let mut out = vec![0.0; 3];
        for isa in Isa::available() {
            let mut s = Vec::new();
            assert!(score_keys(isa, q, &codes[..40], &scales, &mut out, &mut s).is_err());
            assert!(score_keys(isa, q, &codes, &scales, &mut out[..2], &mut s).is_err());
            let bad = Query { hp: 24, ..q };
            assert!(score_keys(isa, bad, &codes, &scales, &mut out, &mut s).is_err());
            let short = Query { qt: &qt[..10], ..q };
            assert!(score_keys(isa, short, &codes, &scales, &mut out, &mut s).is_err());
            assert_eq!(out, [0.0; 3], "nothing written on error");
        }
    }
}

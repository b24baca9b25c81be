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
    let (d, hp, n, kf) = (q.d, q.hp, scales.len(), K::key_floats(q.d));
    scratch.resize(K::NK * (kf + hp), 0.0);
    let (k, heads) = scratch.split_at_mut(K::NK * kf);
    let mut s = 0;
    // SAFETY: forwarded; k holds NK decoded keys, heads NK × hp.
    unsafe {
        while s < n {
            let nk = (n - s).min(K::NK);
            for i in 0..nk {
                K::decode(
                    &codes[(s + i) * d..(s + i + 1) * d],
                    &mut k[i * kf..(i + 1) * kf],
                );
            }
            match nk {
                6 => K::heads::<6>(q, k, heads),
                5 => K::heads::<5>(q, k, heads),
                4 => K::heads::<4>(q, k, heads),
                3 => K::heads::<3>(q, k, heads),
                2 => K::heads::<2>(q, k, heads),
                _ => K::heads::<1>(q, k, heads),
            }
            for i in 0..nk {
                out[s + i] =
                    K::tree_sum(&mut heads[i * hp..(i + 1) * hp]) * (scales[s + i] * K::KEY_UNIT);
            }
            s += nk;
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

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{BlockKernel, Query};
    use std::arch::x86_64::*;

    /// 16 e4m3 codes as the f16 bit patterns whose values are code value / 256.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn e4m3_to_f16_bits(b: __m128i) -> __m256i {
        let w = _mm256_cvtepu8_epi16(b);
        let mag = _mm256_slli_epi16::<7>(_mm256_and_si256(w, _mm256_set1_epi16(0x7f)));
        let sign = _mm256_slli_epi16::<8>(_mm256_and_si256(w, _mm256_set1_epi16(0x80)));
        _mm256_or_si256(mag, sign)
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
    /// decoder and head blocks, forwarded.
    macro_rules! f16c_kernel {
        ($kernel:ident, $decode:ident, $heads:ident) => {
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
            }
        };
    }

    /// AVX2 + FMA + F16C: 6 keys × 16 heads per register block.
    struct Avx2;

    f16c_kernel!(Avx2, decode_avx2, heads_avx2);

    simd_entry!(
        /// AVX2 + FMA + F16C twin of `score_keys_scalar` (`Avx2` in the shared driver).
        score_keys_avx2,
        "avx2,fma,f16c",
        Avx2
    );

    /// Decode one key with AVX-512 (16 codes per conversion), scaled by 1/256.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,f16c")]
    unsafe fn decode_avx512(src: &[u8], dst: &mut [f32]) {
        for (c, o) in src.chunks_exact(16).zip(dst.chunks_exact_mut(16)) {
            // SAFETY: `c` has 16 bytes and `o` 16 floats.
            unsafe {
                let h = e4m3_to_f16_bits(_mm_loadu_si128(c.as_ptr().cast()));
                _mm512_storeu_ps(o.as_mut_ptr(), _mm512_cvtph_ps(h));
            }
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

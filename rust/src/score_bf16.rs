//! Indexer scoring with bfloat16 dot products (AVX512-BF16 `vdpbf16ps`): the bf16 twin of
//! `score.rs`, selected by `Query::pairs` (the queries rounded to bf16, in pairs).
//!
//! Numerics. FP8 e4m3 key values are exact in bf16 (and so are they / 256); the queries are
//! rounded to bf16 (round to nearest even; with `quantize_queries` they are FP8 values, exact, so
//! only the summation order changes). A lane holds one head; the instruction adds, per 32-bit
//! lane, the product of the high bf16 halves and then that of the low halves, each a single
//! rounding of an exact product (`vdpbf16ps`'s definition), so the sum over `d` runs in the order
//! 1, 0, 3, 2, 5, 4, … with one FMA per term. The scalar twin does exactly that. The instruction
//! treats denormal inputs and results as zero; query values below 2^-100 in magnitude are set to
//! zero when the pairs are built, so every nonzero product and partial sum is at least 2^-124 in
//! magnitude (a multiple of it), a normal float, and DAZ / FTZ never change a bit.
//! Then, as in `score.rs`: ReLU, × the head weight, the halving tree over heads, × the key scale.

use crate::cpu::Isa;
use crate::score::{score_each_key, Query};

/// Query values below this magnitude become 0 in the bf16 pairs (see the module notes).
pub const FLUSH_BELOW: f32 = 7.888_609e-31; // 2^-100

/// `x` rounded to bfloat16 (nearest, ties to even), as its 16 bits; values below `FLUSH_BELOW`
/// in magnitude give (signed) zero. `x` is finite.
pub fn to_bf16_bits(x: f32) -> u16 {
    if x.abs() < FLUSH_BELOW {
        return ((x.to_bits() >> 16) & 0x8000) as u16;
    }
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The query pairs of one row: `pairs[p · hp + h]` holds head `h`'s bf16 values of dimensions
/// `2p` (low half) and `2p + 1` (high half), from the transposed f32 queries `qt [d][hp]`; an odd
/// `d` is padded with a zero.
pub fn build_pairs(qt: &[f32], hp: usize, d: usize, pairs: &mut Vec<u32>) {
    let np = d.div_ceil(2);
    pairs.clear();
    pairs.resize(np * hp, 0);
    for p in 0..np {
        for h in 0..hp {
            let lo = u32::from(to_bf16_bits(qt[2 * p * hp + h]));
            let hi = if 2 * p + 1 < d {
                u32::from(to_bf16_bits(qt[(2 * p + 1) * hp + h]))
            } else {
                0
            };
            pairs[p * hp + h] = lo | (hi << 16);
        }
    }
}

fn bf16(bits: u32) -> f32 {
    f32::from_bits(bits << 16)
}

/// Whether the AVX512-BF16 kernel can run here (the instruction set and the shapes).
fn simd_ok(isa: Isa, d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa == Isa::Avx512
            && isa.supported()
            && std::is_x86_feature_detected!("avx512bf16")
            && d.is_multiple_of(32)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, d);
        false
    }
}

/// Whether the few-head bf16 kernels can run (beyond `simd_ok`): they decode keys with AVX512-VBMI
/// byte lookups (every AVX512-BF16 CPU but Cooper Lake has it; there the general kernel runs).
#[cfg(target_arch = "x86_64")]
fn few_head_ok() -> bool {
    std::is_x86_feature_detected!("avx512vbmi")
}

/// bf16 bits of e4m3 code `c` / 256 as `decode16` computes it (the 7 magnitude bits read as a
/// float16's exponent and mantissa, so also the NaN codes 0x7f / 0xff, which no cache holds, map
/// as it maps them), sign from bit 7. (For the few-head kernels' decode, as the tables below.)
#[cfg(target_arch = "x86_64")]
const fn code_bf16_bits(c: u8) -> u16 {
    let (e, m) = (((c >> 3) & 15) as u16, (c & 7) as u16);
    let mag = if e > 0 {
        ((e + 112) << 7) | (m << 4)
    } else if m == 0 {
        0
    } else {
        // float16 subnormal m · 2^-17: normalize (msb 0, 1 or 2).
        let msb = 15 - m.leading_zeros() as u16;
        ((110 + msb) << 7) | ((m - (1 << msb)) << (7 - msb))
    };
    mag | (((c & 0x80) as u16) << 8)
}

/// `code_bf16_bits` of codes 0 … 127: low bytes and high bytes (the sign is added separately).
#[cfg(target_arch = "x86_64")]
static CODE_BF16_LO: [u8; 128] = code_table(false);
#[cfg(target_arch = "x86_64")]
static CODE_BF16_HI: [u8; 128] = code_table(true);

#[cfg(target_arch = "x86_64")]
const fn code_table(high: bool) -> [u8; 128] {
    let mut t = [0u8; 128];
    let mut i = 0;
    while i < 128 {
        let b = code_bf16_bits(i as u8);
        t[i] = if high { (b >> 8) as u8 } else { b as u8 };
        i += 1;
    }
    t
}

/// Whether this CPU runs the bf16 scoring with `vdpbf16ps` on `isa` (otherwise the scalar twin).
pub fn has_bf16_kernel(isa: Isa) -> bool {
    simd_ok(isa, 128)
}

/// Whether `query_dtype="auto"` scores FP8-quantized queries (exact in bf16) with the bf16
/// kernel on this CPU: it has AVX512-BF16 and is an AMD core, where `vdpbf16ps` measured 1.2–1.8×
/// the float32 kernels (Zen 4, Zen 5); on Intel's Sapphire Rapids it ran at 0.77–0.96× (one port,
/// against two for FMA). A property of the CPU, not of the SIMD path in use, so pinning a path
/// (`cpu::set_active`) never changes a result: on a narrower path the bf16 twin runs.
pub fn auto_prefers_bf16() -> bool {
    has_bf16_kernel(crate::cpu::best()) && crate::cpu::is_amd()
}

/// Scores of `scales.len()` keys with the bf16 queries `q.pairs` (`q.qt` is not read); sizes
/// checked by the caller (`score::score_keys`).
pub fn score_keys_bf16(
    isa: Isa,
    q: Query<'_>,
    codes: &[u8],
    scales: &[f32],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    if simd_ok(isa, q.d) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has the features (checked in `simd_ok`); the sizes were checked by
        // `score::score_keys` (pairs `d/2 × hp`, codes `n × d`, out `n`).
        unsafe {
            if q.hp == 16 && few_head_ok() {
                let n = scales.len();
                x86::score_keys_rows_avx512bf16_h16(&[q], &[n], codes, scales, out, n, scratch)
            } else {
                x86::score_keys_avx512bf16(q, codes, scales, out, scratch)
            }
        }
    } else {
        score_keys_bf16_scalar(q, codes, scales, out, scratch)
    }
}

/// `score::score_keys_rows` with bf16 queries (every row's `pairs` set; sizes checked there): each
/// key decoded once for all the rows on AVX512-BF16, row by row with the scalar twin elsewhere.
/// Every row's scores are those `score_keys_bf16` gives it alone.
#[allow(clippy::too_many_arguments)]
pub fn score_keys_rows_bf16(
    isa: Isa,
    qs: &[Query<'_>],
    counts: &[usize],
    codes: &[u8],
    scales: &[f32],
    out: &mut [f32],
    stride: usize,
    scratch: &mut Vec<f32>,
) {
    let d = qs[0].d;
    #[cfg(target_arch = "x86_64")]
    {
        if simd_ok(isa, d) {
            // SAFETY: the CPU has the features (`simd_ok`); the sizes were checked by the caller
            // (`score::score_keys_rows`: every query against the keys, counts and outputs in range).
            unsafe {
                if qs[0].hp == 16 && few_head_ok() {
                    x86::score_keys_rows_avx512bf16_h16(
                        qs, counts, codes, scales, out, stride, scratch,
                    )
                } else {
                    x86::score_keys_rows_avx512bf16(qs, counts, codes, scales, out, stride, scratch)
                }
            }
            return;
        }
    }
    let _ = isa;
    for ((q, &m), r) in qs.iter().zip(counts).zip(0..) {
        if m > 0 {
            let o = &mut out[r * stride..r * stride + m];
            score_keys_bf16_scalar(*q, &codes[..m * d], &scales[..m], o, scratch);
        }
    }
}

/// The scalar twin: the instruction's order (high half, then low half, of each pair), in the
/// per-key loop of `score.rs` (keys / 256, exact in bf16; an odd `d` padded with a zero).
fn score_keys_bf16_scalar(
    q: Query<'_>,
    codes: &[u8],
    scales: &[f32],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let (np, hp) = (q.d.div_ceil(2), q.hp);
    score_each_key(q, codes, scales, out, scratch, 2 * np, 256.0, |h, k| {
        let mut acc = 0.0f32;
        for p in 0..np {
            let w = q.pairs[p * hp + h];
            acc = bf16(w >> 16).mul_add(k[2 * p + 1], acc);
            acc = bf16(w & 0xffff).mul_add(k[2 * p], acc);
        }
        acc
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Query, CODE_BF16_HI, CODE_BF16_LO};
    use crate::score::x86::{score_rows_h16, tree_sum_avx2, FewHeadKernel};
    use crate::score::{simd_entry, simd_rows_entry, BlockKernel};
    use std::arch::x86_64::*;

    /// 16 e4m3 codes as 16 bf16 values / 256 (through F16C: exact).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16,avx512vl,avx2,f16c")]
    fn decode16(b: __m128i) -> __m256bh {
        let w = _mm256_cvtepu8_epi16(b);
        let mag = _mm256_slli_epi16::<7>(_mm256_and_si256(w, _mm256_set1_epi16(0x7f)));
        let sign = _mm256_slli_epi16::<8>(_mm256_and_si256(w, _mm256_set1_epi16(0x80)));
        _mm512_cvtneps_pbh(_mm512_cvtph_ps(_mm256_or_si256(mag, sign)))
    }

    /// `HB` vectors of 16 heads from `h0` × `NK` keys (`kb`: `NK × d` bf16 as u16).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn block<const HB: usize, const NK: usize>(
        q: Query<'_>,
        h0: usize,
        kb: &[u16],
        heads: &mut [f32],
    ) {
        let (d, hp) = (q.d, q.hp);
        let np = d / 2;
        debug_assert!(h0 + HB * 16 <= hp && kb.len() >= NK * d && heads.len() >= NK * hp);
        let (qp, kp, hd) = (
            q.pairs.as_ptr().wrapping_add(h0),
            kb.as_ptr().cast::<u32>(),
            heads.as_mut_ptr(),
        );
        let mut acc = [[_mm512_setzero_ps(); NK]; HB];
        // SAFETY: pairs is np × hp, kb NK × d u16 (= NK × np u32, read unaligned), heads NK × hp.
        unsafe {
            for p in 0..np {
                let mut qv = [_mm512_setzero_si512(); HB];
                for (j, v) in qv.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(qp.add(p * hp + j * 16).cast());
                }
                for i in 0..NK {
                    let kv = _mm512_set1_epi32(kp.add(i * np + p).read_unaligned() as i32);
                    for j in 0..HB {
                        acc[j][i] = _mm512_dpbf16_ps(
                            acc[j][i],
                            std::mem::transmute::<__m512i, __m512bh>(qv[j]),
                            std::mem::transmute::<__m512i, __m512bh>(kv),
                        );
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
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn heads_block<const NK: usize>(q: Query<'_>, kb: &[u16], out: &mut [f32]) {
        // SAFETY: forwarded; hp is a power of two ≥ 16.
        unsafe {
            match q.hp {
                16 => block::<1, NK>(q, 0, kb, out),
                32 => block::<2, NK>(q, 0, kb, out),
                _ => {
                    for h0 in (0..q.hp).step_by(64) {
                        block::<4, NK>(q, h0, kb, out);
                    }
                }
            }
        }
    }

    /// AVX512-BF16: 6 keys × 64 heads per register block; a decoded key is `d` bf16 values (/ 256)
    /// in `d / 2` floats of scratch.
    struct Bf16Avx512;

    impl BlockKernel for Bf16Avx512 {
        const NK: usize = 6;
        const KEY_UNIT: f32 = 256.0;
        fn key_floats(d: usize) -> usize {
            d / 2
        }
        #[inline(always)]
        unsafe fn decode(codes: &[u8], dst: &mut [f32]) {
            let kb = dst.as_mut_ptr().cast::<u16>();
            // SAFETY: `codes` is d bytes, d a multiple of 32; `dst` holds d u16 (its f32 storage
            // reinterpreted: f32 is 4-aligned, u16 needs 2).
            unsafe {
                for c in 0..codes.len() / 16 {
                    let v = decode16(_mm_loadu_si128(codes.as_ptr().add(c * 16).cast()));
                    _mm256_storeu_si256(
                        kb.add(c * 16).cast(),
                        std::mem::transmute::<__m256bh, __m256i>(v),
                    );
                }
            }
        }
        #[inline(always)]
        unsafe fn heads<const N: usize>(q: Query<'_>, keys: &[f32], heads: &mut [f32]) {
            // SAFETY: `keys` holds NK × d u16 (as above); forwarded.
            unsafe {
                let kb = std::slice::from_raw_parts(keys.as_ptr().cast::<u16>(), 2 * keys.len());
                heads_block::<N>(q, kb, heads)
            }
        }
        #[inline(always)]
        unsafe fn tree_sum(heads: &mut [f32]) -> f32 {
            // SAFETY: forwarded.
            unsafe { tree_sum_avx2(heads) }
        }
    }

    simd_entry!(
        /// AVX512-BF16 twin of `score_keys_bf16_scalar` (`Bf16Avx512` in the driver of `score.rs`).
        score_keys_avx512bf16,
        "avx512f,avx512bf16,avx512vl,avx2,fma,f16c",
        Bf16Avx512
    );

    simd_rows_entry!(
        /// `score_keys_avx512bf16` for rows sharing keys: a chunk of keys decoded once for all rows.
        score_keys_rows_avx512bf16,
        "avx512f,avx512bf16,avx512vl,avx2,fma,f16c",
        Bf16Avx512
    );

    /// 64 codes at `src` decoded to 64 bf16 values (/ 256) at `dst`, the bits of `decode16`: two
    /// 128-entry byte lookups (`vpermi2b`) of the magnitude's low and high bytes, the sign or-ed in,
    /// the bytes interleaved (the codes' quadwords permuted first so the in-lane unpacks keep order).
    ///
    /// # Safety
    /// The features are enabled; `src` has 64 readable bytes, `dst` room for 64 `u16`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn decode64(src: *const u8, dst: *mut u16) {
        // SAFETY: the tables are 128 bytes each; the rest as the caller promises.
        unsafe {
            let t =
                |p: &[u8; 128], half: usize| _mm512_loadu_si512(p.as_ptr().add(64 * half).cast());
            let order = _mm512_setr_epi64(0, 4, 1, 5, 2, 6, 3, 7);
            let c = _mm512_permutexvar_epi64(order, _mm512_loadu_si512(src.cast()));
            let lo = _mm512_permutex2var_epi8(t(&CODE_BF16_LO, 0), c, t(&CODE_BF16_LO, 1));
            let hi = _mm512_permutex2var_epi8(t(&CODE_BF16_HI, 0), c, t(&CODE_BF16_HI, 1));
            // hi | (c & 0x80)
            let hi = _mm512_ternarylogic_epi32::<0xF8>(hi, c, _mm512_set1_epi8(0x80u8 as i8));
            _mm512_storeu_si512(dst.cast(), _mm512_unpacklo_epi8(lo, hi));
            _mm512_storeu_si512(dst.add(32).cast(), _mm512_unpackhi_epi8(lo, hi));
        }
    }

    /// One register block of the few-head kernels: 16 decoded keys at `kp` (`d / 2` pairs of bf16
    /// apart) against the 16 heads' query pairs, 16 `vdpbf16ps` chains in order of the pairs, so
    /// each head's sum is the twin's. (Decoding the next block inside this loop, as the float32
    /// few-head kernel does, ran at half the rate: the keys are decoded a chunk ahead instead.)
    ///
    /// # Safety
    /// The features are enabled; `q.pairs` holds `d / 2 × 16` words, `kp` 16 keys of `d / 2` words.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vbmi")]
    unsafe fn block16(q: Query<'_>, kp: *const u32) -> [__m512; 16] {
        let np = q.d / 2;
        let mut acc = [_mm512_setzero_ps(); 16];
        // SAFETY: as the caller promises.
        unsafe {
            for p in 0..np {
                let qv = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    q.pairs.as_ptr().add(p * 16).cast(),
                ));
                for (i, a) in acc.iter_mut().enumerate() {
                    let kv = _mm512_set1_epi32(*kp.add(i * np + p) as i32);
                    *a = _mm512_dpbf16_ps(*a, qv, std::mem::transmute::<__m512i, __m512bh>(kv));
                }
            }
        }
        acc
    }

    /// The bf16 few-head kernel in the rows driver of `score.rs` (`score_rows_h16`): keys decoded
    /// a chunk ahead to bf16 (`decode64`: `d / 2` floats of scratch per key), `block16`'s
    /// `vdpbf16ps` chains, the general bf16 kernel for a row's last keys.
    struct Bf16H16;

    impl FewHeadKernel for Bf16H16 {
        fn key_floats(d: usize) -> usize {
            d / 2
        }
        #[inline(always)]
        unsafe fn decode(codes: *const u8, keys: usize, d: usize, dst: *mut f32) {
            // SAFETY: as the trait promises (d % 32 == 0, so whole blocks of 16 keys are whole
            // groups of 64 codes); dst's floats hold the u16 (f32 is 4-aligned, u16 needs 2).
            unsafe {
                let kb = dst.cast::<u16>();
                for c in 0..keys * d / 64 {
                    decode64(codes.add(c * 64), kb.add(c * 64));
                }
            }
        }
        #[inline(always)]
        unsafe fn block16(q: Query<'_>, kp: *const f32) -> [__m512; 16] {
            // SAFETY: forwarded; the scratch holds bf16 pairs.
            unsafe { block16(q, kp.cast()) }
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
            unsafe { score_keys_avx512bf16(q, codes, scales, out, scratch) }
        }
    }

    simd_rows_entry!(
        /// `score_keys_rows_avx512bf16` for queries of up to 16 heads (`hp == 16`; also one row
        /// alone): `score_rows_h16` with the bf16 kernel, head sums in `tree_sum`'s order
        /// (`finish16`). Each row's scores are the scalar twin's bits. Safety: the CPU has
        /// AVX512-BF16, AVX512-VBMI and the rest of the features; `hp == 16`, `d % 32 == 0`, and
        /// the sizes were checked by `score::score_keys` / `score_keys_rows` (every query against
        /// the keys, counts ≤ n, outputs in range).
        score_keys_rows_avx512bf16_h16,
        "avx512f,avx512bw,avx512bf16,avx512vbmi,avx512vl,avx2,fma,f16c",
        Bf16H16,
        driver = score_rows_h16
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::DECODE_TABLE;
    use crate::score::{padded_heads, score_keys};
    use crate::test_rng as lcg;

    fn unit(next: &mut impl FnMut() -> u64) -> f32 {
        next() as f32 / (1u64 << 30) as f32 - 1.0
    }

    /// Transposed queries `[d][hp]` of `heads` heads (the rest zero) and their head weights: FP8
    /// values (the NaN codes as 0), or float32 values of magnitudes 2^-span … 2^span.
    fn random_query(
        next: &mut impl FnMut() -> u64,
        heads: usize,
        d: usize,
        fp8: bool,
        span: i32,
    ) -> (Vec<f32>, Vec<f32>) {
        let hp = padded_heads(heads);
        let mut qt = vec![0.0f32; d * hp];
        let mut hw = vec![0.0f32; hp];
        for h in 0..heads {
            for dd in 0..d {
                qt[dd * hp + h] = if fp8 {
                    let c = (next() % 256) as usize;
                    if c & 0x7f == 0x7f {
                        0.0
                    } else {
                        DECODE_TABLE[c]
                    }
                } else {
                    unit(next) * 2f32.powi((next() % (2 * span as u64 + 1)) as i32 - span)
                };
            }
            hw[h] = unit(next);
        }
        (qt, hw)
    }

    /// `n` keys of `d` random non-NaN e4m3 codes and power-of-two scales 2^-14 … 2^9.
    fn random_keys(next: &mut impl FnMut() -> u64, n: usize, d: usize) -> (Vec<u8>, Vec<f32>) {
        let codes = (0..n * d)
            .map(|_| (next() % 256) as u8)
            .map(|c| if c & 0x7f == 0x7f { c ^ 1 } else { c })
            .collect();
        let scales = (0..n)
            .map(|_| 2f32.powi((next() % 24) as i32 - 14))
            .collect();
        (codes, scales)
    }

    #[test]
    fn bf16_rounding_is_nearest_even_and_tiny_values_flush() {
        assert_eq!(to_bf16_bits(1.0), 0x3f80);
        assert_eq!(to_bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80); // tie → even
        assert_eq!(to_bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82); // tie → even
        assert_eq!(to_bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(to_bf16_bits(-1e-35), 0x8000);
        assert_eq!(to_bf16_bits(1e-35), 0);
        for (c, &v) in DECODE_TABLE.iter().enumerate() {
            if v.is_finite() && v.abs() >= FLUSH_BELOW {
                assert_eq!(
                    bf16(u32::from(to_bf16_bits(v))),
                    v,
                    "FP8 code {c:#x} is exact in bf16"
                );
            }
        }
    }

    /// The few-head kernels' byte-lookup decode gives every code's exact value / 256, and the SIMD
    /// lookup (where the CPU has AVX512-VBMI) the table's bits, in order, for all 256 codes.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_lookup_decode_is_exact_for_every_code() {
        for (c, &v) in DECODE_TABLE.iter().enumerate() {
            let got = bf16(u32::from(code_bf16_bits(c as u8)));
            if v.is_finite() {
                assert_eq!(got.to_bits(), (v / 256.0).to_bits(), "code {c:#x}");
            }
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512vbmi") && std::is_x86_feature_detected!("avx512bw")
        {
            let codes: Vec<u8> = (0..=255u8).rev().collect();
            let mut out = vec![0u16; 256];
            for i in 0..4 {
                // SAFETY: the CPU has the features; 64 codes in, 64 values out per call.
                unsafe { x86::decode64(codes.as_ptr().add(64 * i), out.as_mut_ptr().add(64 * i)) };
            }
            let want: Vec<u16> = codes.iter().map(|&c| code_bf16_bits(c)).collect();
            assert_eq!(out, want);
        }
    }

    /// The AVX512-BF16 kernel (where the CPU has it) equals its scalar twin bit for bit, on FP8 and on
    /// arbitrary float32 queries, across magnitudes and head counts; on every other path the twin runs.
    #[test]
    fn the_bf16_kernel_equals_its_scalar_twin_bit_for_bit() {
        let mut next = lcg(0xbf16);
        let mut compared = 0;
        for case in 0..60 {
            let heads = [1usize, 16, 32, 64, 100, 128][(next() % 6) as usize];
            let d = [32usize, 64, 128, 256, 16, 2][(next() % 6) as usize];
            let n = (next() % 40) as usize;
            let hp = padded_heads(heads);
            let (qt, hw) = random_query(&mut next, heads, d, case % 2 == 0, 20);
            let (codes, scales) = random_keys(&mut next, n, d);
            let mut pairs = Vec::new();
            build_pairs(&qt, hp, d, &mut pairs);
            let q = Query {
                qt: &qt,
                hw: &hw,
                hp,
                d,
                pairs: &pairs,
            };
            let mut want = vec![0.0; n];
            score_keys(Isa::Scalar, q, &codes, &scales, &mut want, &mut Vec::new()).unwrap();
            // The twin against an f64 evaluation of the same bf16 products (close, not equal).
            for (s, w) in want.iter().enumerate().take(3) {
                let exact: f64 = (0..hp)
                    .map(|h| {
                        let dot: f64 = (0..d)
                            .map(|dd| {
                                let pw = pairs[(dd / 2) * hp + h];
                                let qv = if dd % 2 == 0 {
                                    bf16(pw & 0xffff)
                                } else {
                                    bf16(pw >> 16)
                                };
                                f64::from(qv) * f64::from(DECODE_TABLE[codes[s * d + dd] as usize])
                            })
                            .sum();
                        dot.max(0.0) * f64::from(hw[h])
                    })
                    .sum::<f64>()
                    * f64::from(scales[s]);
                let mag: f64 = (0..hp)
                    .map(|h| {
                        (0..d)
                            .map(|dd| {
                                f64::from(qt[dd * hp + h].abs())
                                    * f64::from(DECODE_TABLE[codes[s * d + dd] as usize].abs())
                            })
                            .sum::<f64>()
                            * f64::from(hw[h].abs())
                    })
                    .sum::<f64>()
                    * f64::from(scales[s]);
                assert!(
                    (f64::from(*w) - exact).abs() <= 1e-5 * mag + 1e-30,
                    "{w} vs {exact}"
                );
            }
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; n];
                let mut scratch = vec![f32::NAN; (next() % 64) as usize];
                score_keys(isa, q, &codes, &scales, &mut got, &mut scratch).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{isa:?} heads={heads} d={d} n={n} case={case}"
                );
                compared += usize::from(simd_ok(isa, d));
            }
        }
        println!("compared the AVX512-BF16 kernel {compared} times"); // 0 without the instruction
    }

    /// The few-head kernel (16 keys per register block) and the rows kernels (keys decoded once for
    /// several rows) equal the scalar twin row by row, bit for bit: whole blocks, tails, rows whose
    /// counts differ or are 0, FP8 and float32 queries.
    #[test]
    fn few_head_and_rows_bf16_kernels_equal_the_scalar_twin() {
        use crate::score::score_keys_rows;
        let mut next = lcg(0x0b16_0016);
        let mut compared = 0;
        for &(heads, d, n) in &[
            (16, 64, 16),
            (16, 64, 17),
            (9, 64, 100),
            (16, 32, 33),
            (1, 128, 48),
            (16, 128, 257),
            (64, 64, 70),
            (20, 128, 31),
        ] {
            for fp8_queries in [true, false] {
                let hp = padded_heads(heads);
                let rows = 3;
                let mut all_pairs = Vec::new();
                let mut weights = Vec::new();
                for _ in 0..rows {
                    let (qt, hw) = random_query(&mut next, heads, d, fp8_queries, 10);
                    let mut pairs = Vec::new();
                    build_pairs(&qt, hp, d, &mut pairs);
                    all_pairs.push((qt, pairs));
                    weights.push(hw);
                }
                let qs: Vec<Query<'_>> = all_pairs
                    .iter()
                    .zip(&weights)
                    .map(|((qt, pairs), hw)| Query {
                        qt,
                        hw,
                        hp,
                        d,
                        pairs,
                    })
                    .collect();
                let (codes, scales) = random_keys(&mut next, n, d);
                let counts = [n, 0, (next() as usize) % (n + 1)];
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                for isa in Isa::available() {
                    let mut got = vec![f32::NAN; rows * n];
                    let mut scratch = vec![1.0f32; (next() % 64) as usize];
                    score_keys_rows(
                        isa,
                        &qs,
                        &counts,
                        &codes,
                        &scales,
                        &mut got,
                        n,
                        &mut scratch,
                    )
                    .unwrap();
                    for (r, q) in qs.iter().enumerate() {
                        let m = counts[r];
                        let mut want = vec![0.0f32; m];
                        let (c, sc) = (&codes[..m * d], &scales[..m]);
                        score_keys(Isa::Scalar, *q, c, sc, &mut want, &mut Vec::new()).unwrap();
                        let mut alone = vec![f32::NAN; m];
                        score_keys(isa, *q, c, sc, &mut alone, &mut vec![f32::NAN; 5]).unwrap();
                        let row = &got[r * n..(r + 1) * n];
                        let at = format!("{isa:?} heads={heads} d={d} n={n} row {r}");
                        assert_eq!(bits(&alone), bits(&want), "alone: {at}");
                        assert_eq!(bits(&row[..m]), bits(&want), "rows: {at}");
                        assert!(row[m..].iter().all(|x| x.is_nan()), "{at}");
                    }
                    compared += usize::from(simd_ok(isa, d));
                }
            }
        }
        println!("compared the AVX512-BF16 kernels {compared} times"); // 0 without the instruction
    }
}

//! Top-k over rows of f32 scores (dsa.md §5): the `k` largest of each row's
//! visible prefix, ties going to the lowest position, NaN refused.
//!
//! A row is reduced in three steps. A threshold is estimated from a random
//! sample (or, for rows not much longer than `k`, read off a radix histogram of
//! the order keys). One SIMD pass compares every score with it and compacts the
//! positions that pass, in ascending order; the same pass watches for NaN.
//! Selection then runs only over the survivors, on a 64-bit key (score order in
//! the high half, position reversed in the low half) that makes every element
//! distinct, so "lowest position wins ties" comes for free. A threshold that
//! leaves fewer than `k` survivors falls back to the radix threshold, which is
//! exact by construction.

use crate::cpu::Isa;
use crate::mem::{self, AllocError};

/// A visible score was NaN (a caller bug: dsa.md §5 says to refuse it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoundNan;

/// The longest row a top-k can rank: positions come back as int32 (and are kept as u32 inside).
pub const MAX_ROW_LEN: usize = 1 << 31;

/// The largest `k`: positions are int32, so no row can fill more than `i32::MAX` entries.
pub const MAX_K: usize = i32::MAX as usize;

/// Why `topk_rows` refused. Nothing is returned with one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopkError {
    /// Row `row` holds a NaN among its visible scores.
    Nan { row: usize },
    /// `k` is outside `[1, MAX_K]`.
    K { k: usize },
    /// Rows of `len` positions: more than `MAX_ROW_LEN`.
    RowTooLong { len: usize },
    /// The sizes do not agree (`scores`, `lengths`), or a length is past the row.
    Shape(String),
    /// The `[t, k]` output cannot be had.
    Alloc(AllocError),
}

impl std::fmt::Display for TopkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TopkError::Nan { row } => write!(f, "NaN in row {row} among its visible positions"),
            TopkError::K { k } => write!(f, "must be in [1, {MAX_K}], got {k}"),
            TopkError::RowTooLong { len } => write!(
                f,
                "rows of {len} positions are longer than the {MAX_ROW_LEN} an int32 position can index"
            ),
            TopkError::Shape(m) => f.write_str(m),
            TopkError::Alloc(e) => write!(f, "the [T, k] int32 output: {e}"),
        }
    }
}

impl std::error::Error for TopkError {}

/// Order-preserving u32 key of a non-NaN f32: `a < b` ⇔ `key(a) < key(b)`,
/// and −0.0 and +0.0 share a key (they are the same score).
#[inline]
pub fn order_key(x: f32) -> u32 {
    let b = (x + 0.0).to_bits(); // −0.0 + 0.0 = +0.0
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// The smallest f32 whose key is at least `key` (−inf when that would be a NaN pattern).
fn from_key(key: u32) -> f32 {
    let x = if key & 0x8000_0000 != 0 {
        f32::from_bits(key & 0x7fff_ffff)
    } else {
        f32::from_bits(!key)
    };
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x
    }
}

/// Distinct 64-bit rank: larger score first, then lower position first.
#[inline]
fn rank_of(key: u32, pos: u32) -> u64 {
    (u64::from(key) << 32) | u64::from(!pos)
}

#[inline]
fn rank_pos(r: u64) -> i32 {
    !(r as u32) as i32
}

/// Reusable buffers of one thread's top-k work.
#[derive(Default)]
pub struct Scratch {
    survivors: Vec<u32>,
    keys: Vec<u32>,
    ranks: Vec<u64>,
    sample: Vec<u32>,
    hist: Vec<u32>,
}

/// Rows this many times longer than `k` (or more) estimate the threshold from a sample.
const SAMPLE_FROM: usize = 16;
const RADIX_BITS: u32 = 11;

/// Top-`out.len()` positions of `row` into `out`: ascending by position, or,
/// with `by_score`, by descending score (ties: lower position first); −1 pads
/// the rest when the row is shorter than `out`. The row must be at most
/// `MAX_ROW_LEN` long (`topk_rows` checks; a longer one ranks only that prefix).
pub fn topk_row(
    isa: Isa,
    row: &[f32],
    out: &mut [i32],
    by_score: bool,
    sc: &mut Scratch,
) -> Result<(), FoundNan> {
    let row = &row[..row.len().min(MAX_ROW_LEN)];
    let n = row.len();
    let kk = out.len().min(n);
    out[kk..].fill(-1);
    if kk == 0 {
        return Ok(());
    }
    if kk == n {
        // Everything visible is selected; only NaN and (maybe) the order need a look.
        if filter_ge(isa, row, f32::INFINITY, &mut sc.survivors) {
            return Err(FoundNan);
        }
        if by_score {
            sc.survivors.clear();
            sc.survivors.extend(0..n as u32);
            select(row, kk, &mut out[..kk], true, sc);
        } else {
            for (o, p) in out[..kk].iter_mut().zip(0..) {
                *o = p;
            }
        }
        return Ok(());
    }
    if n >= SAMPLE_FROM * kk {
        if let Some(thr) = sampled_threshold(row, kk, &mut sc.sample) {
            if filter_ge(isa, row, thr, &mut sc.survivors) {
                return Err(FoundNan);
            }
            if sc.survivors.len() >= kk {
                select(row, kk, &mut out[..kk], by_score, sc);
                return Ok(());
            }
        }
    }
    let thr = radix_threshold(row, kk, &mut sc.hist).ok_or(FoundNan)?;
    if filter_ge(isa, row, thr, &mut sc.survivors) {
        return Err(FoundNan);
    }
    debug_assert!(sc.survivors.len() >= kk);
    select(row, kk, &mut out[..kk], by_score, sc);
    Ok(())
}

/// Top-`k` of each row of `scores` (`[t, l]`, row `r` visible up to
/// `lengths[r]`) on up to `threads` threads (0: all cores): `[t, k]` positions,
/// −1 padded (the work is bounded by the rows' lengths, however large `k` is).
/// Everything is checked first; errors: `Nan` (the first row holding a NaN among
/// its visible scores), `K`, `RowTooLong`, `Shape`, `Alloc` (an output past
/// `mem::MAX_OUTPUT_BYTES` or one the allocator refuses).
pub fn topk_rows(
    isa: Isa,
    scores: &[f32],
    l: usize,
    lengths: &[usize],
    k: usize,
    by_score: bool,
    threads: usize,
) -> Result<Vec<i32>, TopkError> {
    let t = lengths.len();
    if k == 0 || k > MAX_K {
        return Err(TopkError::K { k });
    }
    if l > MAX_ROW_LEN {
        return Err(TopkError::RowTooLong { len: l });
    }
    if t.checked_mul(l) != Some(scores.len()) {
        return Err(TopkError::Shape(format!(
            "scores: {} values are not {t} rows of {l}",
            scores.len()
        )));
    }
    if let Some((i, n)) = lengths.iter().enumerate().find(|(_, n)| **n > l) {
        return Err(TopkError::Shape(format!(
            "lengths: entry {i} is {n}, outside [0, {l}]"
        )));
    }
    let mut out = mem::try_matrix(t, k, -1i32).map_err(TopkError::Alloc)?;
    // Waking the pool costs microseconds: small batches stay on the calling thread.
    let workers = if t * l < 1 << 16 {
        crate::par::Workers::current()
    } else {
        crate::par::Workers::new(threads)
    };
    let threads = workers.count();
    workers.run(|| {
        crate::par::for_each_row_chunk(&mut out, k, threads, Scratch::default, |row0, chunk, sc| {
            for (i, o) in chunk.chunks_mut(k).enumerate() {
                let r = row0 + i;
                topk_row(isa, &scores[r * l..r * l + lengths[r]], o, by_score, sc)
                    .map_err(|_| TopkError::Nan { row: r })?;
            }
            Ok::<(), TopkError>(())
        })
    })?;
    Ok(out)
}

/// The `kk` best of `sc.survivors` (ascending positions, all ≥ the threshold) into `out`.
///
/// A histogram of the survivors' order keys, relative to the smallest, finds the bin holding the
/// `kk`-th best; only that bin's elements need an exact selection on the full rank.
fn select(row: &[f32], kk: usize, out: &mut [i32], by_score: bool, sc: &mut Scratch) {
    let Scratch {
        survivors,
        ranks,
        keys,
        hist,
        ..
    } = sc;
    keys.clear();
    keys.extend(survivors.iter().map(|&p| order_key(row[p as usize])));
    let (lo, hi) = keys
        .iter()
        .fold((u32::MAX, 0), |(lo, hi), &k| (lo.min(k), hi.max(k)));
    let shift = (32 - (hi - lo).leading_zeros()).saturating_sub(RADIX_BITS);
    hist.clear();
    hist.resize(1 << RADIX_BITS, 0);
    for &key in keys.iter() {
        hist[((key - lo) >> shift) as usize] += 1;
    }
    let (mut bin, mut above) = (hist.len() - 1, 0usize);
    while above + (hist[bin] as usize) < kk {
        above += hist[bin] as usize;
        bin -= 1;
    }
    let need = kk - above;
    ranks.clear();
    ranks.extend(
        keys.iter()
            .zip(survivors.iter())
            .filter(|(key, _)| ((**key - lo) >> shift) as usize == bin)
            .map(|(key, p)| rank_of(*key, *p)),
    );
    if ranks.len() > need {
        ranks.select_nth_unstable_by(need - 1, |a, b| b.cmp(a));
    }
    // Every key in a higher bin outranks the whole boundary bin, so "rank ≥ cut" is the selection.
    // Compact it in place, branch-free (about half the survivors pass: a branch would mispredict).
    let cut = *ranks[..need].iter().min().expect("need > 0");
    let mut n = 0;
    for i in 0..survivors.len() {
        let (key, p) = (keys[i], survivors[i]);
        survivors[n] = p;
        keys[n] = key;
        n += usize::from(rank_of(key, p) >= cut);
    }
    debug_assert_eq!(n, kk);
    if by_score {
        ranks.clear();
        ranks.extend(
            keys[..kk]
                .iter()
                .zip(&survivors[..kk])
                .map(|(k, p)| rank_of(*k, *p)),
        );
        ranks.sort_unstable_by(|a, b| b.cmp(a));
        for (o, r) in out.iter_mut().zip(ranks.iter()) {
            *o = rank_pos(*r);
        }
    } else {
        for (o, p) in out.iter_mut().zip(&survivors[..kk]) {
            *o = *p as i32;
        }
    }
}

/// A score that about `1.5 kk` to `3 kk` elements of `row` reach, from a
/// pseudo-random sample (fixed seed: results never depend on it, speed barely).
fn sampled_threshold(row: &[f32], kk: usize, sample: &mut Vec<u32>) -> Option<f32> {
    let n = row.len();
    let s = (n / 64).clamp(1024, 4096).min(n);
    let mean = s as f64 * kk as f64 / n as f64;
    // Aim three standard deviations above the expected count, so misses are rare.
    let r = (mean + 3.0 * mean.sqrt() + 2.0).ceil() as usize;
    if r >= s {
        return None;
    }
    sample.clear();
    // One element from each of `s` equal strata, at a pseudo-random offset: addresses ascend
    // (prefetch-friendly) and no periodic pattern of the scores can line up with the sample.
    let stride = n / s;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for j in 0..s {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let pos = j * stride + (((x >> 32) * stride as u64) >> 32) as usize;
        let v = row[pos];
        if v.is_nan() {
            return None; // the full pass reports it
        }
        sample.push(order_key(v));
    }
    sample.select_nth_unstable_by(r - 1, |a, b| b.cmp(a));
    Some(from_key(sample[r - 1]))
}

/// A score that at least `kk` non-NaN elements reach, from a histogram of the
/// top bits of the order keys; `None` if the row holds a NaN.
fn radix_threshold(row: &[f32], kk: usize, hist: &mut Vec<u32>) -> Option<f32> {
    hist.clear();
    hist.resize(1 << RADIX_BITS, 0);
    for &x in row {
        if x.is_nan() {
            return None;
        }
        hist[(order_key(x) >> (32 - RADIX_BITS)) as usize] += 1;
    }
    let mut seen = 0usize;
    for (bin, &count) in hist.iter().enumerate().rev() {
        seen += count as usize;
        if seen >= kk {
            return Some(from_key((bin as u32) << (32 - RADIX_BITS)));
        }
    }
    unreachable!("a NaN-free row of length >= kk fills the histogram");
}

/// Positions `i` (ascending) with `row[i] >= thr` into `out`; returns whether
/// any element of `row` is NaN. Dispatches to the SIMD kernel of `isa`.
pub fn filter_ge(isa: Isa, row: &[f32], thr: f32, out: &mut Vec<u32>) -> bool {
    out.clear();
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller picked an `Isa` the CPU supports (`cpu::active`, or tests check it).
        Isa::Avx512 if isa.supported() => unsafe { x86::filter_ge_avx512(row, thr, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 if isa.supported() => unsafe { x86::filter_ge_avx2(row, thr, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Isa::Neon if isa.supported() => unsafe { neon::filter_ge_neon(row, thr, out) },
        _ => filter_ge_scalar(row, thr, out, 0),
    }
}

/// The scalar twin of the SIMD filters; `base` is added to every position.
fn filter_ge_scalar(row: &[f32], thr: f32, out: &mut Vec<u32>, base: usize) -> bool {
    let mut nan = false;
    for (i, &x) in row.iter().enumerate() {
        nan |= x.is_nan();
        if x >= thr {
            out.push((base + i) as u32);
        }
    }
    nan
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::filter_ge_scalar;
    use std::arch::x86_64::*;

    /// Set-bit positions of each 8-bit mask, lowest first (the rest zero): the AVX2 compaction table.
    static COMPACT8: [[u32; 8]; 256] = {
        let mut t = [[0u32; 8]; 256];
        let mut m = 0;
        while m < 256 {
            let (mut bit, mut n) = (0, 0);
            while bit < 8 {
                if m & (1 << bit) != 0 {
                    t[m][n] = bit as u32;
                    n += 1;
                }
                bit += 1;
            }
            m += 1;
        }
        t
    };

    /// AVX2 twin of `filter_ge_scalar`. Branch-free compaction: every 8 scores store 8 candidate
    /// positions (from `COMPACT8`) at the end of `out` and advance it by the number that passed.
    #[target_feature(enable = "avx2,popcnt")]
    pub unsafe fn filter_ge_avx2(row: &[f32], thr: f32, pos: &mut Vec<u32>) -> bool {
        let (n, p) = (row.len(), row.as_ptr());
        pos.reserve(n + 8);
        let dst = pos.as_mut_ptr();
        let t = _mm256_set1_ps(thr);
        let mut nan = _mm256_setzero_ps();
        let (mut i, mut len) = (0usize, 0usize);
        while i + 32 <= n {
            // SAFETY: i + 32 <= n, so the loads are inside `row`; each store writes 8 u32 at
            // `len ≤ i + 24`, inside the `n + 8` reserved; `COMPACT8` has 256 rows of 8.
            unsafe {
                let v = [
                    _mm256_loadu_ps(p.add(i)),
                    _mm256_loadu_ps(p.add(i + 8)),
                    _mm256_loadu_ps(p.add(i + 16)),
                    _mm256_loadu_ps(p.add(i + 24)),
                ];
                // UNORD(a, b) is true where either is NaN.
                let u = _mm256_or_ps(
                    _mm256_cmp_ps::<_CMP_UNORD_Q>(v[0], v[1]),
                    _mm256_cmp_ps::<_CMP_UNORD_Q>(v[2], v[3]),
                );
                nan = _mm256_or_ps(nan, u);
                for (j, vj) in v.iter().enumerate() {
                    let m = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(*vj, t)) as usize;
                    let lanes = _mm256_loadu_si256(COMPACT8[m].as_ptr().cast());
                    let idx = _mm256_add_epi32(lanes, _mm256_set1_epi32((i + 8 * j) as i32));
                    _mm256_storeu_si256(dst.add(len).cast(), idx);
                    len += m.count_ones() as usize;
                }
            }
            i += 32;
        }
        // SAFETY: the first `len` entries were written above (u32 needs no drop).
        unsafe { pos.set_len(len) };
        let tail_nan = filter_ge_scalar(&row[i..], thr, pos, i);
        tail_nan || _mm256_movemask_ps(nan) != 0
    }

    /// AVX-512 twin of `filter_ge_scalar`: compare into masks, compact positions with `vpcompressd`
    /// into a register (the memory form is slow on some cores) and store all 16 lanes, branch-free.
    #[target_feature(enable = "avx512f,popcnt")]
    pub unsafe fn filter_ge_avx512(row: &[f32], thr: f32, pos: &mut Vec<u32>) -> bool {
        let (n, p) = (row.len(), row.as_ptr());
        pos.reserve(n + 16);
        let dst = pos.as_mut_ptr();
        let t = _mm512_set1_ps(thr);
        let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let mut nan: u16 = 0;
        let (mut i, mut len) = (0usize, 0usize);
        while i + 64 <= n {
            // SAFETY: i + 64 <= n, so the loads are inside `row`; each store writes 16 u32 at
            // `len ≤ i + 48`, inside the `n + 16` reserved.
            unsafe {
                let v = [
                    _mm512_loadu_ps(p.add(i)),
                    _mm512_loadu_ps(p.add(i + 16)),
                    _mm512_loadu_ps(p.add(i + 32)),
                    _mm512_loadu_ps(p.add(i + 48)),
                ];
                nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v[0], v[1])
                    | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v[2], v[3]);
                for (j, vj) in v.iter().enumerate() {
                    let m = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(*vj, t);
                    let idx = _mm512_add_epi32(lane, _mm512_set1_epi32((i + 16 * j) as i32));
                    _mm512_storeu_si512(dst.add(len).cast(), _mm512_maskz_compress_epi32(m, idx));
                    len += m.count_ones() as usize;
                }
            }
            i += 64;
        }
        // SAFETY: the first `len` entries were written above (u32 needs no drop).
        unsafe { pos.set_len(len) };
        let tail_nan = filter_ge_scalar(&row[i..], thr, pos, i);
        tail_nan || nan != 0
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::filter_ge_scalar;
    use std::arch::aarch64::*;

    /// Push `base + b` for every set bit `b` of `mask`, lowest first.
    #[inline(always)]
    fn push_bits(out: &mut Vec<u32>, base: usize, mut mask: u64) {
        while mask != 0 {
            out.push(base as u32 + mask.trailing_zeros());
            mask &= mask - 1;
        }
    }

    /// NEON twin of `filter_ge_scalar`: 4 scores per compare, lane bits summed into a mask.
    #[target_feature(enable = "neon")]
    pub unsafe fn filter_ge_neon(row: &[f32], thr: f32, out: &mut Vec<u32>) -> bool {
        let (n, p) = (row.len(), row.as_ptr());
        let t = vdupq_n_f32(thr);
        let lane_bits: [u32; 4] = [1, 2, 4, 8];
        // SAFETY: reads 4 u32 from a 4-element array.
        let bits = unsafe { vld1q_u32(lane_bits.as_ptr()) };
        let mut nan = vdupq_n_u32(0);
        let mut i = 0;
        while i + 16 <= n {
            let mut mask = 0u64;
            for j in 0..4 {
                // SAFETY: i + 16 <= n, so the load is inside `row`.
                let v = unsafe { vld1q_f32(p.add(i + 4 * j)) };
                nan = vorrq_u32(nan, vmvnq_u32(vceqq_f32(v, v)));
                let m = vaddvq_u32(vandq_u32(vcgeq_f32(v, t), bits));
                mask |= u64::from(m) << (4 * j);
            }
            if mask != 0 {
                push_bits(out, i, mask);
            }
            i += 16;
        }
        let tail_nan = filter_ge_scalar(&row[i..], thr, out, i);
        tail_nan || vmaxvq_u32(nan) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng as lcg;

    /// The plain definition: sort by (score desc, position asc), take k, sort by position.
    fn naive(row: &[f32], k: usize) -> Vec<i32> {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|&a, &b| order_key(row[b]).cmp(&order_key(row[a])).then(a.cmp(&b)));
        let mut top: Vec<i32> = idx.into_iter().take(k).map(|i| i as i32).collect();
        top.sort_unstable();
        top.resize(k, -1);
        top
    }

    fn rows() -> Vec<Vec<f32>> {
        let mut next = lcg(7);
        let mut rows = Vec::new();
        for &n in &[0usize, 1, 5, 31, 64, 100, 1000, 5000, 40_000] {
            rows.push((0..n).map(|_| next() as f32 / 1e6 - 1000.0).collect());
            // Heavy ties: ReLU-like rows, mostly exact zeros, a few levels.
            rows.push(
                (0..n)
                    .map(|_| match next() % 10 {
                        0 => 1.5,
                        1 => -0.0,
                        2..=6 => 0.0,
                        _ => (next() % 4) as f32,
                    })
                    .collect(),
            );
            // Sorted ascending (the sample sees a skewed picture) and infinities.
            let mut r: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
            if n > 3 {
                r[1] = f32::INFINITY;
                r[2] = f32::NEG_INFINITY;
            }
            rows.push(r);
        }
        rows
    }

    #[test]
    fn order_key_is_monotone_and_merges_signed_zeros() {
        let xs = [
            f32::NEG_INFINITY,
            -3.0,
            -1e-40,
            -0.0,
            0.0,
            1e-40,
            2.0,
            f32::INFINITY,
        ];
        for w in xs.windows(2) {
            assert!(order_key(w[0]) <= order_key(w[1]));
        }
        assert_eq!(order_key(-0.0), order_key(0.0));
        for x in xs {
            assert_eq!(order_key(from_key(order_key(x))), order_key(x));
        }
    }

    #[test]
    fn matches_the_definition_on_every_path() {
        let mut sc = Scratch::default();
        for isa in Isa::available() {
            for row in rows() {
                for &k in &[1usize, 3, 64, 2048] {
                    let mut out = vec![0i32; k];
                    topk_row(isa, &row, &mut out, false, &mut sc).unwrap();
                    assert_eq!(out, naive(&row, k), "{isa:?} n={} k={k}", row.len());
                    let mut by_score = vec![0i32; k];
                    topk_row(isa, &row, &mut by_score, true, &mut sc).unwrap();
                    let mut sorted = by_score.clone();
                    sorted.sort_unstable_by_key(|p| if *p < 0 { i32::MAX } else { *p });
                    assert_eq!(sorted, out);
                    let scores: Vec<u32> = by_score
                        .iter()
                        .take_while(|p| **p >= 0)
                        .map(|&p| order_key(row[p as usize]))
                        .collect();
                    assert!(scores.windows(2).all(|w| w[0] >= w[1]));
                }
            }
        }
    }

    #[test]
    fn batches_match_row_by_row_at_every_thread_count() {
        let (t, l, k) = (9usize, 30_000usize, 100usize);
        let mut next = lcg(3);
        let mut scores: Vec<f32> = (0..t * l).map(|_| (next() % 5000) as f32).collect();
        let lengths: Vec<usize> = (0..t).map(|r| (r * 7919) % (l + 1)).collect();
        for threads in [1, 2, 4] {
            let got = topk_rows(Isa::Scalar, &scores, l, &lengths, k, false, threads).unwrap();
            for r in 0..t {
                assert_eq!(
                    &got[r * k..(r + 1) * k],
                    &naive(&scores[r * l..r * l + lengths[r]], k)[..]
                );
            }
        }
        // A NaN past a row's visible length is ignored; one inside is reported with its row.
        scores[4 * l + lengths[4]] = f32::NAN;
        assert!(topk_rows(Isa::Scalar, &scores, l, &lengths, k, false, 2).is_ok());
        scores[6 * l] = f32::NAN;
        scores[8 * l] = f32::NAN;
        assert_eq!(
            topk_rows(Isa::Scalar, &scores, l, &lengths, k, false, 2),
            Err(TopkError::Nan { row: 6 })
        );
    }

    #[test]
    fn nan_is_refused_on_every_path() {
        let mut sc = Scratch::default();
        for isa in Isa::available() {
            for &n in &[1usize, 40, 3000, 70_000] {
                for at in [0, n / 2, n - 1] {
                    let mut row: Vec<f32> = (0..n).map(|i| (i % 97) as f32).collect();
                    row[at] = f32::NAN;
                    for &k in &[1usize, 16, 2048] {
                        let mut out = vec![0i32; k];
                        assert_eq!(
                            topk_row(isa, &row, &mut out, false, &mut sc),
                            Err(FoundNan),
                            "{isa:?} n={n} at={at} k={k}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn simd_filters_equal_their_scalar_twin() {
        let mut next = lcg(11);
        for isa in Isa::available() {
            for n in [0usize, 7, 8, 33, 64, 65, 127, 1000, 4099] {
                let mut row: Vec<f32> = (0..n).map(|_| (next() % 200) as f32 - 100.0).collect();
                if n > 50 {
                    row[n - 3] = f32::NAN;
                }
                for thr in [-1000.0, -0.0, 0.0, 17.0, 99.0, f32::INFINITY] {
                    let (mut a, mut b) = (Vec::new(), Vec::new());
                    let nan_a = filter_ge(isa, &row, thr, &mut a);
                    let nan_b = filter_ge_scalar(&row, thr, &mut b, 0);
                    assert_eq!((nan_a, &a), (nan_b, &b), "{isa:?} n={n} thr={thr}");
                }
            }
        }
    }

    /// A random row: values on a random grid (ties), signed zeros, infinities and NaNs mixed in.
    fn random_row(next: &mut impl FnMut() -> u64, n: usize, nan: bool) -> Vec<f32> {
        let levels = 1 + next() % 1000;
        let mut row: Vec<f32> = (0..n)
            .map(|_| match next() % 50 {
                0 => f32::INFINITY,
                1 => f32::NEG_INFINITY,
                2 => -0.0,
                _ => (next() % levels) as f32 - (levels / 2) as f32,
            })
            .collect();
        if nan && n > 0 {
            let at = (next() as usize) % n;
            row[at] = f32::NAN;
        }
        row
    }

    /// Issue 19: every SIMD filter (AVX2, AVX-512; NEON under qemu) against its scalar twin on
    /// random rows, lengths (every remainder of the vector loop) and thresholds (±inf, ±0, grid
    /// values, NaN), and every path's whole top-k against the scalar path's.
    #[test]
    fn every_simd_filter_and_topk_equals_the_scalar_path_on_random_rows() {
        let mut next = lcg(0x0019_f11e);
        let paths: Vec<Isa> = Isa::available()
            .into_iter()
            .filter(|i| *i != Isa::Scalar)
            .collect();
        // Under qemu-aarch64 too: the NEON kernels must be the ones compared, not skipped.
        #[cfg(target_arch = "aarch64")]
        assert!(paths.contains(&Isa::Neon), "{paths:?}");
        let mut sc = Scratch::default();
        for case in 0..300 {
            let n = match case % 3 {
                0 => (next() % 70) as usize,
                1 => (next() % 300) as usize,
                _ => (next() % 5000) as usize,
            };
            let nan = next().is_multiple_of(4);
            let row = random_row(&mut next, n, nan);
            let thr = match next() % 6 {
                0 => f32::INFINITY,
                1 => f32::NEG_INFINITY,
                2 => -0.0,
                3 => f32::NAN,
                _ => (next() % 1000) as f32 - 500.0,
            };
            let mut want = Vec::new();
            let want_nan = filter_ge_scalar(&row, thr, &mut want, 0);
            let k = 1 + (next() as usize) % (n + 3);
            let by_score = next().is_multiple_of(2);
            let mut want_top = vec![0i32; k];
            let want_res = topk_row(Isa::Scalar, &row, &mut want_top, by_score, &mut sc);
            for &isa in &paths {
                let mut got = vec![7u32; (next() % 9) as usize]; // a used buffer is cleared
                let got_nan = filter_ge(isa, &row, thr, &mut got);
                assert_eq!(
                    (got_nan, &got),
                    (want_nan, &want),
                    "{isa:?} n={n} thr={thr}"
                );
                let mut top = vec![0i32; k];
                let res = topk_row(isa, &row, &mut top, by_score, &mut sc);
                assert_eq!(res, want_res, "{isa:?} n={n} k={k}");
                if res.is_ok() {
                    assert_eq!(top, want_top, "{isa:?} n={n} k={k} by_score={by_score}");
                }
            }
        }
    }

    #[test]
    fn bad_sizes_are_errors_not_panics() {
        let s = [1.0f32, 2.0, 3.0, 4.0];
        let run = |l, lens: &[usize], k| topk_rows(Isa::Scalar, &s, l, lens, k, false, 1);
        assert_eq!(run(2, &[2, 2], 0), Err(TopkError::K { k: 0 }));
        assert_eq!(
            run(2, &[2, 2], MAX_K + 1),
            Err(TopkError::K { k: MAX_K + 1 })
        );
        assert!(matches!(run(3, &[2, 2], 1), Err(TopkError::Shape(_))));
        assert!(matches!(run(2, &[2, 3], 1), Err(TopkError::Shape(_))));
        assert!(matches!(
            run(usize::MAX, &[0, 0], 1),
            Err(TopkError::RowTooLong { .. })
        ));
        assert!(matches!(
            topk_rows(Isa::Scalar, &[], MAX_ROW_LEN + 1, &[], 1, false, 1),
            Err(TopkError::RowTooLong { .. })
        ));
        // An output past the 2^40-byte limit is refused before anything is allocated.
        let lens = vec![0usize; 1024];
        assert!(matches!(
            topk_rows(Isa::Scalar, &[], 0, &lens, MAX_K, false, 1),
            Err(TopkError::Alloc(e)) if e.over_limit
        ));
        // k far past the row: the work is the row's, the output is [t, k], −1 padded.
        let got = topk_rows(Isa::Scalar, &s, 2, &[2, 1], 5, false, 1).unwrap();
        assert_eq!(got, [0, 1, -1, -1, -1, 0, -1, -1, -1, -1]);
    }
}

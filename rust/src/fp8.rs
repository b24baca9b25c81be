//! FP8 e4m3fn encoding and power-of-two ("ue8m0") scales, bit-exact with
//! `docs/dsa.md` §4 and `dsa_hybrid.reference`.
//!
//! Everything is computed in f64 in the same order as the float64 oracle, so
//! the codes are identical by construction, not just close.

/// Largest finite e4m3fn magnitude.
pub const E4M3_MAX: f64 = 448.0;
/// Lower bound on a vector's amax before the scale is taken (dsa.md §4).
pub const AMAX_FLOOR: f64 = 1e-4;

/// Decode one e4m3fn code (1 sign, 4 exponent bits with bias 7, 3 mantissa
/// bits; no infinities; 0x7F and 0xFF are NaN).
pub const fn decode(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0f32 } else { 1.0f32 };
    let exp = ((code >> 3) & 0x0F) as i32;
    let man = (code & 0x07) as f32;
    if exp == 0x0F && (code & 0x07) == 0x07 {
        return f32::NAN;
    }
    let mag = if exp == 0 {
        // Subnormal: m/8 * 2^-6.
        man / 8.0 / 64.0
    } else {
        (1.0 + man / 8.0) * pow2_f32(exp - 7)
    };
    sign * mag
}

const fn pow2_f32(e: i32) -> f32 {
    // e is in [-6, 8] here; both loops are bounded and exact.
    let mut v = 1.0f32;
    let mut i = 0;
    if e >= 0 {
        while i < e {
            v *= 2.0;
            i += 1;
        }
    } else {
        while i < -e {
            v /= 2.0;
            i += 1;
        }
    }
    v
}

/// All 256 codes decoded, indexable by the code.
pub static DECODE_TABLE: [f32; 256] = {
    let mut t = [0.0f32; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = decode(c as u8);
        c += 1;
    }
    t
};

/// `2^k` for `k` in the normal f64 exponent range, built from its bits (exact, no libm call).
#[inline]
fn exp2i(k: i32) -> f64 {
    debug_assert!((-1022..=1023).contains(&k));
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// Encode `x` as e4m3fn: saturate to ±448, round to nearest, ties to even.
/// NaN encodes as 0x7F (callers reject NaN before quantizing).
///
/// Branch-light and libm-free (it runs for every element of every query and
/// key): normals are rounded by integer arithmetic on the f64 bits, subnormals
/// by the add-and-subtract-2^52 trick. Both give exactly the round-half-even
/// result of the definition (`encode_by_definition` in the tests).
#[inline]
pub fn encode(x: f64) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs().min(E4M3_MAX);
    let code = if a >= exp2i(-6) {
        // Keep the 11 exponent bits and the top 3 mantissa bits, rounding the 49 dropped bits
        // half to even; a carry out of the mantissa bumps the exponent, as e4m3's own rounding
        // does (a <= 448 never rounds past 448, so the NaN code cannot come out).
        let bits = a.to_bits();
        let lsb = (bits >> 49) & 1;
        let kept = (bits + (1u64 << 48) - 1 + lsb) >> 49;
        (kept - ((1023 - 7) << 3)) as u8
    } else {
        // Subnormals are multiples of 2^-9: a·2^9 < 8 rounded to an integer, ties to even, by
        // the f64 addition itself (8 is the smallest normal, code 0x08).
        const TWO_52: f64 = 4_503_599_627_370_496.0;
        ((a * 512.0 + TWO_52) - TWO_52) as u8
    };
    sign | code
}

/// The power-of-two scale of a vector with maximum magnitude `amax`:
/// `2^ceil(log2(max(amax, 1e-4) / 448))`, computed exactly as the smallest
/// `k` with `448 * 2^k >= amax`.
pub fn pow2_scale(amax: f64) -> f32 {
    let amax = amax.max(AMAX_FLOOR);
    // Exponent of amax / 448 read from its bits, then corrected by exact comparisons.
    let mut k = (((amax / E4M3_MAX).to_bits() >> 52) & 0x7FF) as i32 - 1023;
    while E4M3_MAX * exp2i(k) < amax {
        k += 1;
    }
    while E4M3_MAX * exp2i(k - 1) >= amax {
        k -= 1;
    }
    exp2i(k) as f32
}

/// `quantize` was given an output of another length than its input (nothing was written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LengthMismatch {
    pub values: usize,
    pub codes: usize,
}

impl std::fmt::Display for LengthMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "quantize: {} values for {} codes",
            self.values, self.codes
        )
    }
}

impl std::error::Error for LengthMismatch {}

/// Quantize one vector with its own power-of-two scale; returns the scale
/// (infinite when the vector is beyond float32's range: callers check).
/// `out.len()` must equal `v.len()` (an error otherwise, nothing written).
pub fn quantize(v: &[f64], out: &mut [u8]) -> Result<f32, LengthMismatch> {
    if v.len() != out.len() {
        return Err(LengthMismatch {
            values: v.len(),
            codes: out.len(),
        });
    }
    let amax = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let scale = pow2_scale(amax);
    // `x / s` exactly: s is a power of two, so its inverse is exact and the product rounds alike.
    let inv = 1.0 / f64::from(scale);
    for (o, x) in out.iter_mut().zip(v) {
        *o = encode((x * inv).clamp(-E4M3_MAX, E4M3_MAX));
    }
    Ok(scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_known_codes() {
        assert_eq!(decode(0x00), 0.0);
        assert_eq!(decode(0x01), 2f32.powi(-9));
        assert_eq!(decode(0x08), 2f32.powi(-6));
        assert_eq!(decode(0x38), 1.0);
        assert_eq!(decode(0x7E), 448.0);
        assert_eq!(decode(0xFE), -448.0);
        assert!(decode(0x7F).is_nan());
        assert!(decode(0xFF).is_nan());
        assert!(decode(0x80) == 0.0 && decode(0x80).is_sign_negative());
    }

    #[test]
    fn encode_inverts_decode_for_every_finite_code() {
        for c in 0u16..256 {
            let c = c as u8;
            if c & 0x7F == 0x7F {
                continue;
            }
            assert_eq!(
                encode(f64::from(DECODE_TABLE[c as usize])),
                c,
                "code {c:#04x}"
            );
        }
    }

    /// The definition `encode` used to compute literally: exponent from the bits, the mantissa
    /// scaled to [8, 16] and rounded with `round_ties_even`.
    fn encode_by_definition(x: f64) -> u8 {
        if x.is_nan() {
            return 0x7F;
        }
        let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
        let a = x.abs().min(E4M3_MAX);
        let code = if a >= exp2i(-6) {
            let mut e = ((a.to_bits() >> 52) & 0x7FF) as i32 - 1023;
            let mut q = (a * exp2i(3 - e)).round_ties_even() as i32;
            if q == 16 {
                e += 1;
                q = 8;
            }
            (((e + 7) << 3) | (q - 8)) as u8
        } else {
            (a * 512.0).round_ties_even() as u8
        };
        sign | code
    }

    #[test]
    fn encode_equals_the_definition_at_every_code_midpoint_and_at_random() {
        let mut xs = Vec::new();
        // Every code value, every midpoint between neighbours, and their f64 neighbours.
        let mut values: Vec<f64> = (0u16..0x7F)
            .map(|c| f64::from(DECODE_TABLE[c as usize]))
            .collect();
        values.push(480.0);
        for w in values.windows(2) {
            let mid = (w[0] + w[1]) / 2.0;
            for v in [w[0], mid] {
                xs.extend([
                    v,
                    f64::from_bits(v.to_bits() + 1),
                    f64::from_bits(v.to_bits().saturating_sub(1)),
                ]);
            }
        }
        let mut next = crate::test_rng(3);
        for _ in 0..200_000 {
            let e = (next() % 40) as i32 - 25; // 2^-25 .. 2^14
            let m = 1.0 + (next() as f64) / f64::from(1u32 << 31);
            xs.push(m * exp2i(e));
        }
        xs.extend([
            0.0,
            f64::MIN_POSITIVE,
            1e-300,
            1e300,
            f64::INFINITY,
            448.0,
            464.0,
            465.0,
        ]);
        for x in xs {
            for x in [x, -x] {
                assert_eq!(encode(x), encode_by_definition(x), "{x:e}");
            }
        }
    }

    #[test]
    fn encode_rounds_to_nearest_even_and_saturates() {
        // 1.0 (0x38) and 1.125 (0x39): the midpoint goes to the even mantissa.
        assert_eq!(encode(1.0625), 0x38);
        // 1.125 and 1.25 (0x3A): midpoint 1.1875 goes to 0x3A (even).
        assert_eq!(encode(1.1875), 0x3A);
        assert_eq!(encode(1.06), 0x38);
        assert_eq!(encode(1.07), 0x39);
        assert_eq!(encode(1.1), 0x39);
        // Subnormal midpoint between 0 and 2^-9 goes to 0.
        assert_eq!(encode(2f64.powi(-10)), 0x00);
        assert_eq!(encode(3.0 * 2f64.powi(-10)), 0x02);
        assert_eq!(encode(1e6), 0x7E);
        assert_eq!(encode(-1e6), 0xFE);
        assert_eq!(encode(460.0), 0x7E);
    }

    #[test]
    fn scales_are_exact_powers_of_two() {
        assert_eq!(pow2_scale(448.0), 1.0);
        assert_eq!(pow2_scale(448.0000001), 2.0);
        assert_eq!(pow2_scale(224.0), 0.5);
        assert_eq!(pow2_scale(0.0), pow2_scale(1e-4));
        let mut x = 1e-3f64;
        while x < 1e6 {
            let s = f64::from(pow2_scale(x));
            assert!(x / s <= E4M3_MAX && x / s > E4M3_MAX / 2.0, "amax {x}");
            assert_eq!(s.log2().fract(), 0.0);
            x *= 1.37;
        }
    }

    #[test]
    fn quantize_bounds_error() {
        let v: Vec<f64> = (0..128)
            .map(|i| ((i * 37 % 101) as f64 - 50.0) * 0.731)
            .collect();
        let mut out = vec![0u8; 128];
        let s = f64::from(quantize(&v, &mut out).unwrap());
        for (x, c) in v.iter().zip(&out) {
            let y = f64::from(DECODE_TABLE[*c as usize]) * s;
            // e4m3 has 3 mantissa bits: relative error <= 2^-4 for normals,
            // absolute error <= 2^-10 * s for subnormals.
            assert!(
                (x - y).abs() <= x.abs() / 16.0 + s * 2f64.powi(-10),
                "{x} vs {y}"
            );
        }
    }
}

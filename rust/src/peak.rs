//! The core's FMA peak, measured: independent chains of fused multiply-adds on the SIMD path in
//! use, so a benchmark can state its kernels' speed as a fraction of what this core can do with
//! the same instructions (a BLAS matmul may use narrower ones: OpenBLAS picks AVX2 kernels on
//! some AVX-512 CPUs).
//!
//! Every path computes the same values (lane `i` of chain `c` runs `x = x · m + b` `iters`
//! times, one FMA each), so the SIMD loops are compared with their scalar twin.

use crate::cpu::Isa;

/// Independent accumulator vectors: enough to cover the FMA latency on every core we know.
pub const CHAINS: usize = 12;

/// Lanes of one chain (the widest vector, 16 f32); narrower paths run several vectors per chain.
pub const LANES: usize = 16;

const M: f32 = 0.999_999_9;
const B: f32 = 1e-7;

/// Run the chains `iters` times on `isa` (a path the CPU lacks runs the scalar twin); returns
/// the final values (`CHAINS × LANES`) and the number of floating-point operations done.
pub fn fma_loop(isa: Isa, iters: u64) -> (Vec<f32>, u64) {
    let mut x: Vec<f32> = (0..CHAINS * LANES).map(|i| 1.0 + i as f32 / 64.0).collect();
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has the features (checked); the buffer holds CHAINS × LANES values.
        Isa::Avx512 if isa.supported() => unsafe { x86::loop_avx512(&mut x, iters) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 if isa.supported() => unsafe { x86::loop_avx2(&mut x, iters) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Isa::Neon if isa.supported() => unsafe { neon::loop_neon(&mut x, iters) },
        _ => {
            for _ in 0..iters {
                for v in x.iter_mut() {
                    *v = v.mul_add(M, B);
                }
            }
        }
    }
    (x, iters * (CHAINS * LANES) as u64 * 2)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{B, CHAINS, LANES, M};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn loop_avx512(x: &mut [f32], iters: u64) {
        assert!(x.len() >= CHAINS * LANES);
        // SAFETY: CHAINS vectors of 16 floats are in bounds (asserted).
        unsafe {
            let p = x.as_mut_ptr();
            let mut v = [_mm512_setzero_ps(); CHAINS];
            for (c, r) in v.iter_mut().enumerate() {
                *r = _mm512_loadu_ps(p.add(c * LANES));
            }
            let (m, b) = (_mm512_set1_ps(M), _mm512_set1_ps(B));
            for _ in 0..iters {
                for r in v.iter_mut() {
                    *r = _mm512_fmadd_ps(*r, m, b);
                }
            }
            for (c, r) in v.iter().enumerate() {
                _mm512_storeu_ps(p.add(c * LANES), *r);
            }
        }
    }

    /// The AVX2 loop: 12 of the 16 ymm registers at a time, the chains in two halves.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn loop_avx2(x: &mut [f32], iters: u64) {
        const V: usize = CHAINS * LANES / 8 / 2;
        assert!(x.len() >= 2 * V * 8);
        // SAFETY: 2 · V vectors of 8 floats are in bounds (asserted).
        unsafe {
            for half in 0..2 {
                let p = x.as_mut_ptr().add(half * V * 8);
                let mut v = [_mm256_setzero_ps(); V];
                for (c, r) in v.iter_mut().enumerate() {
                    *r = _mm256_loadu_ps(p.add(c * 8));
                }
                let (m, b) = (_mm256_set1_ps(M), _mm256_set1_ps(B));
                for _ in 0..iters {
                    for r in v.iter_mut() {
                        *r = _mm256_fmadd_ps(*r, m, b);
                    }
                }
                for (c, r) in v.iter().enumerate() {
                    _mm256_storeu_ps(p.add(c * 8), *r);
                }
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{B, CHAINS, LANES, M};
    use std::arch::aarch64::*;

    #[target_feature(enable = "neon")]
    pub unsafe fn loop_neon(x: &mut [f32], iters: u64) {
        const V: usize = CHAINS * LANES / 4;
        assert!(x.len() >= V * 4);
        // SAFETY: V vectors of 4 floats are in bounds (asserted).
        unsafe {
            let p = x.as_mut_ptr();
            let mut v = [vdupq_n_f32(0.0); V];
            for (c, r) in v.iter_mut().enumerate() {
                *r = vld1q_f32(p.add(c * 4));
            }
            let (m, b) = (vdupq_n_f32(M), vdupq_n_f32(B));
            for _ in 0..iters {
                for r in v.iter_mut() {
                    *r = vfmaq_f32(b, *r, m);
                }
            }
            for (c, r) in v.iter().enumerate() {
                vst1q_f32(p.add(c * 4), *r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_computes_the_scalar_twins_values() {
        let (want, flops) = fma_loop(Isa::Scalar, 1000);
        assert_eq!(flops, 1000 * (CHAINS * LANES) as u64 * 2);
        assert!(want.iter().all(|v| v.is_finite() && *v != 0.0));
        for isa in Isa::available() {
            assert_eq!(fma_loop(isa, 1000).0, want, "{isa:?}");
        }
    }
}

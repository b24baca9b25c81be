//! Runtime CPU-feature detection and the choice of SIMD path for the kernels.
//!
//! The kernels (`topk`, `score`) ask `active()` which instruction set to use.
//! It is the widest one the CPU has, unless the environment variable
//! `DSA_HYBRID_SIMD` or `set_active` asks for a narrower one (to benchmark the
//! AVX2 path on an AVX-512 machine, or to run the scalar twins).

use std::sync::atomic::{AtomicU8, Ordering};

/// The SIMD-relevant features of the running CPU, as `(name, present)` pairs, detected at run
/// time by `std::arch`. On aarch64 the names are Linux's (`/proc/cpuinfo`): `asimddp` is the dot
/// product extension (Rust's `dotprod`). Only `neon` picks a kernel; the rest are reported.
pub fn features() -> Vec<(&'static str, bool)> {
    #[cfg(target_arch = "x86_64")]
    {
        vec![
            ("sse4.2", std::is_x86_feature_detected!("sse4.2")),
            ("avx2", std::is_x86_feature_detected!("avx2")),
            ("fma", std::is_x86_feature_detected!("fma")),
            ("f16c", std::is_x86_feature_detected!("f16c")),
            ("avx512f", std::is_x86_feature_detected!("avx512f")),
            ("avx512bw", std::is_x86_feature_detected!("avx512bw")),
            ("avx512bf16", std::is_x86_feature_detected!("avx512bf16")),
        ]
    }
    #[cfg(target_arch = "aarch64")]
    {
        use std::arch::is_aarch64_feature_detected as has;
        vec![
            ("neon", has!("neon")),
            ("asimddp", has!("dotprod")),
            ("fp16", has!("fp16")),
            ("bf16", has!("bf16")),
            ("i8mm", has!("i8mm")),
            ("sve", has!("sve")),
            ("sve2", has!("sve2")),
        ]
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        Vec::new()
    }
}

/// Whether the CPU is an AMD one (x86-64 CPUID vendor "AuthenticAMD"); false elsewhere.
pub fn is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID leaf 0 exists on every x86-64 CPU; the vendor string is in EBX, EDX, ECX.
        let r = std::arch::x86_64::__cpuid(0);
        let mut v = [0u8; 12];
        for (i, w) in [r.ebx, r.edx, r.ecx].into_iter().enumerate() {
            v[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        &v == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// An instruction set a kernel can be compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust: the reference twin of every SIMD kernel.
    Scalar,
    /// AVX2 + FMA + F16C + POPCNT (x86-64).
    Avx2,
    /// AVX-512 F + BW (x86-64); the FP8 decode still uses the F16C route.
    Avx512,
    /// NEON (aarch64).
    Neon,
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == name)
    }

    /// Whether this CPU can run kernels compiled for `self`.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("popcnt")
                    && std::is_x86_feature_detected!("fma")
                    && std::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.supported()
                    && std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every instruction set this CPU can run, narrowest first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.supported()).collect()
    }

    fn code(self) -> u8 {
        self as u8 + 1
    }

    fn from_code(c: u8) -> Option<Isa> {
        Isa::ALL.get(usize::from(c).checked_sub(1)?).copied()
    }
}

/// The widest instruction set this CPU supports.
pub fn best() -> Isa {
    *Isa::available().last().expect("scalar is always available")
}

/// 0: not chosen yet; otherwise `Isa::code`.
static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// The instruction set the kernels use now.
pub fn active() -> Isa {
    if let Some(isa) = Isa::from_code(ACTIVE.load(Ordering::Relaxed)) {
        return isa;
    }
    let chosen = std::env::var("DSA_HYBRID_SIMD")
        .ok()
        .and_then(|v| Isa::from_name(v.trim()))
        .filter(|i| i.supported())
        .unwrap_or_else(best);
    ACTIVE.store(chosen.code(), Ordering::Relaxed);
    chosen
}

/// Make the kernels use `isa` (`None`: the widest available). Refused when the CPU lacks it.
pub fn set_active(isa: Option<Isa>) -> Result<Isa, String> {
    let isa = isa.unwrap_or_else(best);
    if !isa.supported() {
        return Err(format!(
            "this CPU cannot run the {} path (available: {})",
            isa.name(),
            Isa::available()
                .iter()
                .map(|i| i.name())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    ACTIVE.store(isa.code(), Ordering::Relaxed);
    Ok(isa)
}

/// The name of the SIMD path the kernels dispatch to now.
pub fn simd_path() -> &'static str {
    active().name()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_scalar_is_always_there() {
        for isa in Isa::ALL {
            assert_eq!(Isa::from_name(isa.name()), Some(isa));
            assert_eq!(Isa::from_code(isa.code()), Some(isa));
        }
        assert!(Isa::available().contains(&Isa::Scalar));
        assert!(best().supported());
        assert_eq!(Isa::from_name("sve"), None);
    }

    /// What each architecture reports, and that its native path is the one it finds.
    #[test]
    fn features_name_the_native_simd_of_each_architecture() {
        let f = features();
        println!("features: {f:?}, widest path: {}", best().name()); // shown with --nocapture
        let has = |name: &str| f.iter().find(|(n, _)| *n == name).map(|(_, p)| *p);
        #[cfg(target_arch = "x86_64")]
        {
            for name in ["sse4.2", "avx2", "fma", "f16c", "avx512f", "avx512bw"] {
                assert!(has(name).is_some(), "{name} missing from {f:?}");
            }
            if Isa::Avx2.supported() {
                assert_eq!(has("avx2"), Some(true));
            }
            if Isa::Avx512.supported() {
                assert_eq!((has("avx512f"), has("avx512bw")), (Some(true), Some(true)));
            }
            assert!(!Isa::Neon.supported());
        }
        #[cfg(target_arch = "aarch64")]
        {
            for name in ["neon", "asimddp", "fp16", "bf16", "i8mm", "sve", "sve2"] {
                assert!(has(name).is_some(), "{name} missing from {f:?}");
            }
            // Every aarch64 Linux CPU has NEON (Advanced SIMD is mandatory in ARMv8-A).
            assert_eq!(has("neon"), Some(true));
            assert!(Isa::Neon.supported() && best() == Isa::Neon);
            assert!(!Isa::Avx2.supported() && !Isa::Avx512.supported());
        }
        let _ = has;
    }

    /// `set_active` on every architecture: "scalar" and the native path pin, a path the CPU lacks is
    /// refused naming it, and `None` restores the widest. (The kernels' tests pass their `Isa`
    /// explicitly, so pinning here does not disturb them.)
    #[test]
    fn the_simd_path_can_be_pinned_and_restored() {
        let native = best();
        assert_eq!(set_active(Some(Isa::Scalar)), Ok(Isa::Scalar));
        assert_eq!(active(), Isa::Scalar);
        assert_eq!(simd_path(), "scalar");
        assert_eq!(set_active(Some(native)), Ok(native));
        assert_eq!(active(), native);
        for isa in Isa::ALL.into_iter().filter(|i| !i.supported()) {
            let err = set_active(Some(isa)).unwrap_err();
            assert!(err.contains(isa.name()), "{err}");
            assert_eq!(active(), native, "a refused path changes nothing");
        }
        assert_eq!(set_active(None), Ok(native));
    }
}

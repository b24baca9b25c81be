//! Runtime CPU-feature detection: which SIMD paths this machine can run.

/// The SIMD-relevant features of the running CPU, as `(name, present)` pairs.
pub fn features() -> Vec<(&'static str, bool)> {
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    {
        vec![
            ("sse4.2", std::is_x86_feature_detected!("sse4.2")),
            ("avx2", std::is_x86_feature_detected!("avx2")),
            ("fma", std::is_x86_feature_detected!("fma")),
            ("f16c", std::is_x86_feature_detected!("f16c")),
            ("avx512f", std::is_x86_feature_detected!("avx512f")),
            ("avx512bw", std::is_x86_feature_detected!("avx512bw")),
        ]
    }
    #[cfg(target_arch = "aarch64")]
    {
        vec![("neon", std::arch::is_aarch64_feature_detected!("neon"))]
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "x86", target_arch = "aarch64")))]
    {
        Vec::new()
    }
}

/// The widest SIMD path the kernels would dispatch to on this CPU.
pub fn simd_path() -> &'static str {
    let has = |name: &str| features().iter().any(|(n, p)| *n == name && *p);
    if has("avx512f") && has("avx512bw") {
        "avx512"
    } else if has("avx2") && has("fma") && has("f16c") {
        "avx2+fma+f16c"
    } else if has("neon") {
        "neon"
    } else {
        "scalar"
    }
}

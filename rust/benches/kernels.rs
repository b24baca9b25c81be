//! `cargo bench --manifest-path rust/Cargo.toml`: the host kernels on every SIMD path this CPU has,
//! one thread. Prints absolute figures and ratios against the scalar twin, measured in this run.
//! (The comparisons against numpy, torch and jax are in `bench/`.)

use std::hint::black_box;

use dsa_hybrid_core::cpu::Isa;
use dsa_hybrid_core::fp8::DECODE_TABLE;
use dsa_hybrid_core::score::{padded_heads, score_keys, score_keys_rows, Query};
use dsa_hybrid_core::score_bf16::{build_pairs, has_bf16_kernel};
use dsa_hybrid_core::topk::{topk_row, Scratch};

/// This thread's CPU time in seconds (Linux; wall time elsewhere), so that a loaded machine's
/// preemptions do not count.
#[cfg(target_os = "linux")]
fn cpu_seconds() -> f64 {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut t = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `t` is a valid timespec for the call to fill.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime");
    t.sec as f64 + t.nsec as f64 * 1e-9
}

#[cfg(not(target_os = "linux"))]
fn cpu_seconds() -> f64 {
    use std::sync::OnceLock;
    use std::time::Instant;
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// Best of `reps` timings of `f` (this thread's CPU time), in seconds.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = cpu_seconds();
            f();
            cpu_seconds() - t
        })
        .fold(f64::INFINITY, f64::min)
}

fn lcg(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        x >> 33
    }
}

fn bench_score(heads: usize, d: usize) {
    let n = 16_384usize;
    let hp = padded_heads(heads);
    let mut next = lcg(1);
    let qt: Vec<f32> = (0..d * hp)
        .map(|_| DECODE_TABLE[(next() % 0x7e) as usize])
        .collect();
    let hw: Vec<f32> = (0..hp).map(|_| (next() % 100) as f32 / 100.0).collect();
    let codes: Vec<u8> = (0..n * d).map(|_| (next() % 0x7e) as u8).collect();
    let scales = vec![0.01f32; n];
    let q = Query {
        qt: &qt,
        hw: &hw,
        hp,
        d,
        pairs: &[],
    };
    let mut pairs = Vec::new();
    build_pairs(&qt, hp, d, &mut pairs);
    let qb = Query { pairs: &pairs, ..q };
    let mut out = vec![0f32; n];
    let mut scratch = Vec::new();
    let flops = 2.0 * (heads * d * n) as f64;
    println!("indexer scoring, H_I={heads}, D_I={d}, {n} keys in pages of 64:");
    let mut scalar = None;
    let best = *Isa::available().last().unwrap();
    let bf16_runs = if has_bf16_kernel(best) {
        vec![(best, true)]
    } else {
        vec![]
    };
    let runs: Vec<(Isa, bool)> = Isa::available()
        .into_iter()
        .map(|i| (i, false))
        .chain(bf16_runs)
        .collect();
    for (isa, bf16) in runs {
        let q = if bf16 { qb } else { q };
        let name = if bf16 { "bf16" } else { isa.name() };
        let reps = if isa == Isa::Scalar { 1 } else { 40 };
        let t = best_of(reps, || {
            for (c, (s, o)) in codes
                .chunks(64 * d)
                .zip(scales.chunks(64).zip(out.chunks_mut(64)))
            {
                score_keys(isa, q, c, s, o, &mut scratch).unwrap();
            }
            black_box(&out);
        });
        let base = *scalar.get_or_insert(t);
        println!(
            "  {:7} {:8.2} ms  {:6.1} GFLOP/s  {:5.1}x scalar",
            name,
            t * 1e3,
            flops / t / 1e9,
            base / t
        );
        if isa == Isa::Scalar {
            continue;
        }
        // A prefill block: 8 rows over the same pages, each page decoded once for all of them.
        let rows = 8;
        let qs = vec![q; rows];
        let counts = vec![64usize; rows];
        let mut outs = vec![0f32; rows * n];
        let t = best_of(reps, || {
            for (p, (c, s)) in codes.chunks(64 * d).zip(scales.chunks(64)).enumerate() {
                let o = &mut outs[p * 64..];
                score_keys_rows(isa, &qs, &counts, c, s, o, n, &mut scratch).unwrap();
            }
            black_box(&outs);
        });
        println!(
            "  {:7} {:8.2} ms  {:6.1} GFLOP/s  ({rows} rows sharing the pages)",
            name,
            t * 1e3,
            rows as f64 * flops / t / 1e9,
        );
    }
}

fn bench_topk() {
    let k = 2048;
    for &n in &[32_768usize, 131_072, 1_048_576] {
        let mut next = lcg(n as u64);
        let row: Vec<f32> = (0..n).map(|_| (next() % 1_000_000) as f32 / 1e3).collect();
        // One streaming read: an OR over the bits, which the compiler vectorizes (a float max or
        // sum stays serial: floating-point reductions may not be reordered).
        let read = best_of(20, || {
            let mut acc = [0u32; 16];
            for c in row.chunks_exact(16) {
                for (a, x) in acc.iter_mut().zip(c) {
                    *a |= x.to_bits();
                }
            }
            black_box(acc);
        });
        println!(
            "top-{k} of {n} f32 (one read of the row: {:.1} us, {:.1} GB/s):",
            read * 1e6,
            4.0 * n as f64 / read / 1e9
        );
        let mut out = vec![0i32; k];
        let mut sc = Scratch::default();
        for isa in Isa::available() {
            let t = best_of(20, || {
                topk_row(isa, &row, &mut out, false, &mut sc).unwrap();
                black_box(&out);
            });
            println!(
                "  {:7} {:8.1} us  {:5.2}x the read",
                isa.name(),
                t * 1e6,
                t / read
            );
        }
    }
}

fn main() {
    // `cargo bench -- score` runs only the scoring benchmarks.
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if only.as_deref().is_none_or(|o| "score".contains(o)) {
        bench_score(16, 64);
        bench_score(64, 128);
    }
    if only.as_deref().is_none_or(|o| "topk".contains(o)) {
        bench_topk();
    }
}

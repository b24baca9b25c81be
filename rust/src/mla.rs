//! Sparse MLA attention on the CPU (dsa.md §3): for each query row `t` and head `h`, attend to
//! the latent rows named by `indices[t, :]` (entries < 0 or >= N skipped; duplicates count once
//! each), scores `q · kv` over the full latent width `D`, softmax with `scale`, output over the
//! first `d_v` columns, and the natural-log LSE. A row with no valid index gets output 0 and LSE
//! +inf, as `reference.sparse_mla`.
//!
//! One fused pass per (row, group of heads): the valid rows are gathered in tiles of `TILE` rows
//! (converted to f32 once, for every head of the group: the reuse that makes it compute-bound),
//! then per tile
//!   1. scores `S[r][h] = scale · Σ_d q[h][d] · kv[r][d]`, one FMA per `d` in order (SIMD: lanes
//!      over heads, the row value broadcast),
//!   2. an online-softmax update shared by every path (`softmax_tile`: plain multiplies and adds,
//!      no FMA, so it is the same bits whatever the compiler vectorises),
//!   3. `acc[h][v] = acc[h][v] · α[h] + Σ_r p[r][h] · kv[r][v]`, one FMA per row in order (SIMD:
//!      lanes over value columns, `p` broadcast).
//!
//! The SIMD kernels (AVX2, AVX-512, NEON) of steps 1 and 3 do exactly the scalar twin's
//! operations in the same order, so every path gives the same bits (tested). A query row or a
//! selected latent row holding inf/NaN makes that row's output and LSE NaN (no silent clamping).

use rayon::prelude::*;

use crate::cpu::Isa;
use crate::mem::{self, AllocError};
use crate::par::Workers;

/// Latent rows gathered per tile (a multiple of the kernels' 6-row blocks).
pub const TILE: usize = 60;

/// Rows of the score kernels' register blocks; tiles are padded to a multiple of it.
const NK: usize = 6;

/// The cached latent rows `[N, D]`.
#[derive(Clone, Copy)]
pub enum Latent<'a> {
    /// float32 values.
    F32(&'a [f32]),
    /// bfloat16 values as their 16-bit patterns (the high half of a float32).
    Bf16(&'a [u16]),
}

impl Latent<'_> {
    fn len(&self) -> usize {
        match self {
            Latent::F32(v) => v.len(),
            Latent::Bf16(v) => v.len(),
        }
    }

    /// Ask the CPU to start loading row `row` (`d` wide) into L1 (a hint: no effect on results;
    /// the gather of the next tile then finds its rows in cache instead of waiting on memory).
    #[inline(always)]
    fn prefetch_row(&self, row: usize, d: usize) {
        let (ptr, bytes) = match self {
            Latent::F32(v) => (v[row * d..(row + 1) * d].as_ptr().cast::<u8>(), d * 4),
            Latent::Bf16(v) => (v[row * d..(row + 1) * d].as_ptr().cast::<u8>(), d * 2),
        };
        #[cfg(target_arch = "x86_64")]
        for off in (0..bytes).step_by(64) {
            // SAFETY: a prefetch never faults and reads nothing; the address is inside the row
            // (bounds-checked by the slice above). SSE is part of every x86-64 CPU.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    ptr.add(off).cast::<i8>(),
                )
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (ptr, bytes);
    }

    /// Row `row` (`d` wide) as f32 into `dst`; whether every value is finite.
    #[inline(always)]
    fn load_row(&self, row: usize, d: usize, dst: &mut [f32]) -> bool {
        match self {
            Latent::F32(v) => {
                let src = &v[row * d..(row + 1) * d];
                dst.copy_from_slice(src);
                let bad = src.iter().fold(0u32, |a, x| {
                    a | u32::from(x.to_bits() & 0x7f80_0000 == 0x7f80_0000)
                });
                bad == 0
            }
            Latent::Bf16(v) => {
                let src = &v[row * d..(row + 1) * d];
                for (o, b) in dst.iter_mut().zip(src) {
                    *o = f32::from_bits(u32::from(*b) << 16);
                }
                let bad = src
                    .iter()
                    .fold(0u16, |a, b| a | u16::from(*b & 0x7f80 == 0x7f80));
                bad == 0
            }
        }
    }
}

/// Row indices `[T, K]`, as the caller has them.
#[derive(Clone, Copy)]
pub enum Indices<'a> {
    I32(&'a [i32]),
    I64(&'a [i64]),
}

impl Indices<'_> {
    fn len(&self) -> usize {
        match self {
            Indices::I32(v) => v.len(),
            Indices::I64(v) => v.len(),
        }
    }

    #[inline(always)]
    fn get(&self, i: usize) -> i64 {
        match self {
            Indices::I32(v) => i64::from(v[i]),
            Indices::I64(v) => v[i],
        }
    }
}

/// One call's inputs: `q [T, h, D]` float32, `kv [N, D]`, `indices [T, K]`.
#[derive(Clone, Copy)]
pub struct Problem<'a> {
    pub q: &'a [f32],
    pub kv: Latent<'a>,
    pub indices: Indices<'a>,
    pub t: usize,
    pub h: usize,
    pub d: usize,
    pub d_v: usize,
    pub k: usize,
    pub scale: f32,
}

/// Why a call was refused (nothing computed); each names the argument at fault.
#[derive(Debug, Clone, PartialEq)]
pub enum MlaError {
    /// Sizes that do not agree; the message starts with the argument's name.
    Shape(String),
    /// The output could not be allocated.
    Alloc(AllocError),
}

impl std::fmt::Display for MlaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MlaError::Shape(m) => f.write_str(m),
            MlaError::Alloc(e) => write!(f, "the output: {e}"),
        }
    }
}

impl std::error::Error for MlaError {}

impl Problem<'_> {
    /// Rows of `kv`.
    pub fn n(&self) -> usize {
        self.kv.len().checked_div(self.d).unwrap_or(0)
    }

    fn check(&self) -> Result<(), MlaError> {
        let shape = |m: String| Err(MlaError::Shape(m));
        if self.d == 0 {
            return shape("q: the latent width D must be at least 1".into());
        }
        if !(1..=self.d).contains(&self.d_v) {
            return shape(format!(
                "d_v: must be in [1, {}] (the latent width), got {}",
                self.d, self.d_v
            ));
        }
        let qn = self
            .t
            .checked_mul(self.h)
            .and_then(|x| x.checked_mul(self.d));
        if qn != Some(self.q.len()) {
            return shape(format!(
                "q: {} values for [{}, {}, {}]",
                self.q.len(),
                self.t,
                self.h,
                self.d
            ));
        }
        if !self.kv.len().is_multiple_of(self.d) {
            return shape(format!(
                "kv: {} values are not whole rows of {}",
                self.kv.len(),
                self.d
            ));
        }
        if self.t.checked_mul(self.k) != Some(self.indices.len()) {
            return shape(format!(
                "indices: {} entries for [{}, {}]",
                self.indices.len(),
                self.t,
                self.k
            ));
        }
        if !self.scale.is_finite() {
            return shape(format!("scale: must be finite, got {}", self.scale));
        }
        Ok(())
    }
}

/// `out [T, h, d_v]` and `lse [T, h]`, float32.
pub struct Output {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
}

/// Heads padded to a multiple of 16 (the score kernels' lanes); padded heads have zero queries.
fn padded(g: usize) -> usize {
    g.div_ceil(16) * 16
}

/// Per-worker buffers, reused from unit to unit.
#[derive(Default)]
struct Scratch {
    /// `[D][gp]` the group's queries, transposed.
    qt: Vec<f32>,
    /// `[TILE][D]` gathered rows as f32.
    tile: Vec<f32>,
    /// `[TILE][gp]` scaled scores, then probabilities.
    s: Vec<f32>,
    /// `[gp]` each: running max, running sum, this tile's rescale factor.
    m: Vec<f32>,
    l: Vec<f32>,
    alpha: Vec<f32>,
    /// `[gp]` each: the tile's max, the tile's sum.
    mx: Vec<f32>,
    sum: Vec<f32>,
    /// Valid row numbers of the current tile.
    rows: Vec<usize>,
}

/// Sparse MLA attention of `p` on up to `threads` workers (par.rs convention), with the kernels of
/// `isa` (a path the CPU lacks runs the scalar twin). Checks every size before any work.
pub fn sparse_mla(isa: Isa, p: &Problem<'_>, threads: usize) -> Result<Output, MlaError> {
    p.check()?;
    let (t, h, d_v) = (p.t, p.h, p.d_v);
    let mut out = mem::try_zeroed::<f32>(
        mem::check_size::<f32>(t.saturating_mul(h), d_v).map_err(MlaError::Alloc)?,
    )
    .map_err(MlaError::Alloc)?;
    let mut lse = mem::try_filled(t * h, f32::INFINITY).map_err(MlaError::Alloc)?;
    attend_into(isa, p, threads, &mut out, &mut lse);
    Ok(Output { out, lse })
}

/// `sparse_mla` into caller-owned outputs (the XLA FFI handler writes XLA's result buffers in
/// place): `out` must hold `T · h · d_v` values and `lse` `T · h` (any contents: both are
/// overwritten). Checks every size, the outputs' included, before any work; same results as
/// `sparse_mla`.
pub fn sparse_mla_into(
    isa: Isa,
    p: &Problem<'_>,
    threads: usize,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<(), MlaError> {
    p.check()?;
    let th = p.t.checked_mul(p.h);
    if th.and_then(|x| x.checked_mul(p.d_v)) != Some(out.len()) {
        return Err(MlaError::Shape(format!(
            "out: {} values for [{}, {}, {}]",
            out.len(),
            p.t,
            p.h,
            p.d_v
        )));
    }
    if th != Some(lse.len()) {
        return Err(MlaError::Shape(format!(
            "lse: {} values for [{}, {}]",
            lse.len(),
            p.t,
            p.h
        )));
    }
    out.fill(0.0);
    lse.fill(f32::INFINITY);
    attend_into(isa, p, threads, out, lse);
    Ok(())
}

/// The work of both entry points, on checked sizes: `out` zero and `lse` +inf on entry.
fn attend_into(isa: Isa, p: &Problem<'_>, threads: usize, out: &mut [f32], lse: &mut [f32]) {
    let (t, h, d_v) = (p.t, p.h, p.d_v);
    if t * h == 0 {
        return;
    }
    let isa = if isa.supported() { isa } else { Isa::Scalar };
    let workers = if threads == 1 {
        Workers::current()
    } else {
        Workers::new(threads)
    };
    let n_workers = workers.count();
    // Split each row's heads into `split` groups when there are too few rows to feed the workers
    // (decode); each group gathers its rows itself. Groups of at least 16 heads, dividing h.
    let want = if n_workers > 1 && t < 2 * n_workers {
        (2 * n_workers).div_ceil(t)
    } else {
        1
    };
    let split = (1..=want.min(h / 16).max(1))
        .rev()
        .find(|s| h.is_multiple_of(*s))
        .unwrap_or(1);
    let g = h / split;
    let unit = |i: usize, o: &mut [f32], l: &mut [f32], sc: &mut Scratch| {
        attend_group(isa, p, i / split, (i % split) * g, g, o, l, sc);
    };
    if n_workers == 1 {
        let mut sc = Scratch::default();
        for (i, (o, l)) in out.chunks_mut(g * d_v).zip(lse.chunks_mut(g)).enumerate() {
            unit(i, o, l, &mut sc);
        }
    } else {
        workers.run(|| {
            out.par_chunks_mut(g * d_v)
                .zip(lse.par_chunks_mut(g))
                .enumerate()
                .for_each_init(Scratch::default, |sc, (i, (o, l))| unit(i, o, l, sc));
        });
    }
}

/// Heads `h0 .. h0 + g` of query row `t`: `out [g, d_v]` (zero on entry), `lse [g]` (+inf on entry).
#[allow(clippy::too_many_arguments)]
fn attend_group(
    isa: Isa,
    p: &Problem<'_>,
    t: usize,
    h0: usize,
    g: usize,
    out: &mut [f32],
    lse: &mut [f32],
    sc: &mut Scratch,
) {
    let (d, d_v, gp) = (p.d, p.d_v, padded(g));
    let n = p.n();
    sc.qt.clear();
    sc.qt.resize(d * gp, 0.0);
    let mut finite = true;
    for j in 0..g {
        let row = &p.q[(t * p.h + h0 + j) * d..(t * p.h + h0 + j + 1) * d];
        for (dd, v) in row.iter().enumerate() {
            sc.qt[dd * gp + j] = *v;
            finite &= v.is_finite();
        }
    }
    sc.tile.clear();
    sc.tile.resize(TILE * d, 0.0);
    sc.s.clear();
    sc.s.resize(TILE * gp, 0.0);
    sc.m.clear();
    sc.m.resize(gp, f32::NEG_INFINITY);
    sc.l.clear();
    sc.l.resize(gp, 0.0);
    sc.alpha.clear();
    sc.alpha.resize(gp, 0.0);
    sc.mx.resize(gp, 0.0);
    sc.sum.resize(gp, 0.0);
    sc.rows.clear();
    let mut any = false;
    let idx = &p.indices;
    let mut j = 0;
    while j < p.k {
        // The next tile of valid rows.
        sc.rows.clear();
        while j < p.k && sc.rows.len() < TILE {
            let v = idx.get(t * p.k + j);
            if v >= 0 && (v as u64) < n as u64 {
                sc.rows.push(v as usize);
            }
            j += 1;
        }
        let nr = sc.rows.len();
        if nr == 0 {
            break;
        }
        any = true;
        for (r, &row) in sc.rows.iter().enumerate() {
            finite &= p.kv.load_row(row, d, &mut sc.tile[r * d..(r + 1) * d]);
        }
        // Start loading the next tile's rows while this one is computed.
        let (mut ahead, mut found) = (j, 0);
        while ahead < p.k && found < TILE {
            let v = idx.get(t * p.k + ahead);
            if v >= 0 && (v as u64) < n as u64 {
                p.kv.prefetch_row(v as usize, d);
                found += 1;
            }
            ahead += 1;
        }
        let nr_pad = nr.div_ceil(NK) * NK;
        scores(isa, &sc.qt, gp, d, &sc.tile, nr_pad, p.scale, &mut sc.s);
        softmax_tile(
            isa,
            &mut sc.s,
            nr,
            gp,
            &mut sc.m,
            &mut sc.l,
            &mut sc.alpha,
            &mut sc.mx,
            &mut sc.sum,
        );
        accumulate(isa, out, g, d_v, &sc.alpha, &sc.s, gp, &sc.tile, d, nr);
    }
    if !any {
        return; // out 0, lse +inf
    }
    if !finite {
        out.fill(f32::NAN);
        lse.fill(f32::NAN);
        return;
    }
    for (hh, (o, l)) in out.chunks_mut(d_v).zip(lse.iter_mut()).enumerate() {
        let denom = sc.l[hh];
        for x in o.iter_mut() {
            *x /= denom;
        }
        *l = (f64::from(denom).ln() + f64::from(sc.m[hh])) as f32;
    }
}

/// `e^x` for `x <= 0` (finite or -inf), 0 below -87; plain multiplies and adds only (Cephes'
/// `expf`: Cody–Waite reduction, degree-6 polynomial; 2^n built from the bits of the rounding
/// addition, no float-to-int conversion), so every compilation of it gives the same bits.
/// Relative error about 2e-7.
#[inline(always)]
#[allow(clippy::manual_clamp)] // NaN passes through either way; the comparisons are explicit
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let xc = if x < -87.0 {
        -87.0
    } else if x > 0.0 {
        0.0
    } else {
        x
    };
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * C1) - n * C2;
    let mut y = 1.987_569_1e-4_f32;
    y = y * r + 1.398_199_9e-3;
    y = y * r + 8.333_452e-3;
    y = y * r + 4.166_579_6e-2;
    y = y * r + 1.666_666_5e-1;
    y = y * r + 0.5;
    y = y * r * r + r + 1.0;
    // t's bits are those of 1.5 · 2^23 plus n (n in [-126, 0]).
    let n_int = (t.to_bits() as i32).wrapping_sub(0x4b40_0000);
    let pow2 = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        y * pow2
    }
}

/// The online-softmax update of one tile (`s [nr][gp]`, scaled scores in, probabilities out):
/// `m` the running max, `alpha = e^(m_old − m_new)`, `l = l · alpha + Σ_r p` (rows in order).
/// `mx` and `sum` are `gp`-long scratch. Every loop runs along contiguous heads.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn softmax_body(
    s: &mut [f32],
    nr: usize,
    gp: usize,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
    mx: &mut [f32],
    sum: &mut [f32],
) {
    let (m, l, alpha, mx, sum) = (
        &mut m[..gp],
        &mut l[..gp],
        &mut alpha[..gp],
        &mut mx[..gp],
        &mut sum[..gp],
    );
    mx.copy_from_slice(m);
    for row in s.chunks_exact(gp).take(nr) {
        for (x, v) in mx.iter_mut().zip(row) {
            *x = if *v > *x { *v } else { *x };
        }
    }
    for ((a, mo), mn) in alpha.iter_mut().zip(m.iter()).zip(mx.iter()) {
        *a = exp_nonpositive(*mo - *mn);
    }
    sum.fill(0.0);
    for row in s.chunks_exact_mut(gp).take(nr) {
        for ((v, mn), su) in row.iter_mut().zip(mx.iter()).zip(sum.iter_mut()) {
            let e = exp_nonpositive(*v - *mn);
            *v = e;
            *su += e;
        }
    }
    for (((li, a), su), (mi, mn)) in l
        .iter_mut()
        .zip(alpha.iter())
        .zip(sum.iter())
        .zip(m.iter_mut().zip(mx.iter()))
    {
        *li = *li * *a + *su;
        *mi = *mn;
    }
}

/// `softmax_body`, compiled for the SIMD path in use (the same bits on every path).
#[allow(clippy::too_many_arguments)]
fn softmax_tile(
    isa: Isa,
    s: &mut [f32],
    nr: usize,
    gp: usize,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
    mx: &mut [f32],
    sum: &mut [f32],
) {
    assert!(s.len() >= nr * gp && m.len() >= gp && l.len() >= gp && alpha.len() >= gp);
    assert!(mx.len() >= gp && sum.len() >= gp);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `sparse_mla` only passes a path the CPU supports.
        Isa::Avx512 => unsafe { x86::softmax_avx512(s, nr, gp, m, l, alpha, mx, sum) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::softmax_avx2(s, nr, gp, m, l, alpha, mx, sum) },
        _ => softmax_body(s, nr, gp, m, l, alpha, mx, sum),
    }
}

/// Scores of the tile's first `nr` rows (a multiple of `NK`) for the `gp` heads of `qt`, scaled,
/// into `s[r · gp + h]`.
#[allow(clippy::too_many_arguments)]
fn scores(
    isa: Isa,
    qt: &[f32],
    gp: usize,
    d: usize,
    tile: &[f32],
    nr: usize,
    scale: f32,
    s: &mut [f32],
) {
    assert!(
        gp.is_multiple_of(16)
            && qt.len() >= d * gp
            && tile.len() >= nr * d
            && s.len() >= nr * gp
            && nr.is_multiple_of(NK)
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has the features (`sparse_mla` checked `supported`); sizes asserted above.
        Isa::Avx512 => unsafe { x86::scores_avx512(qt, gp, d, tile, nr, scale, s) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::scores_avx2(qt, gp, d, tile, nr, scale, s) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Isa::Neon => unsafe { neon::scores_neon(qt, gp, d, tile, nr, scale, s) },
        _ => scores_scalar(qt, gp, d, tile, nr, scale, s),
    }
}

/// The scalar twin of the score kernels.
fn scores_scalar(
    qt: &[f32],
    gp: usize,
    d: usize,
    tile: &[f32],
    nr: usize,
    scale: f32,
    s: &mut [f32],
) {
    for r in 0..nr {
        let row = &tile[r * d..(r + 1) * d];
        for h in 0..gp {
            let mut acc = 0.0f32;
            for (dd, kv) in row.iter().enumerate() {
                acc = qt[dd * gp + h].mul_add(*kv, acc);
            }
            s[r * gp + h] = acc * scale;
        }
    }
}

/// `out[h][v] = out[h][v] · alpha[h] + Σ_{r < nr} p[r][h] · tile[r][v]` for the group's `g` heads.
#[allow(clippy::too_many_arguments)]
fn accumulate(
    isa: Isa,
    out: &mut [f32],
    g: usize,
    d_v: usize,
    alpha: &[f32],
    p: &[f32],
    gp: usize,
    tile: &[f32],
    d: usize,
    nr: usize,
) {
    assert!(
        out.len() == g * d_v
            && alpha.len() >= g
            && p.len() >= nr * gp
            && g <= gp
            && d_v <= d
            && tile.len() >= nr * d
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has the features; sizes asserted above, widths checked here.
        Isa::Avx512 if d_v.is_multiple_of(16) => unsafe {
            x86::accumulate_avx512(out, g, d_v, alpha, p, gp, tile, d, nr)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 | Isa::Avx512 if d_v.is_multiple_of(8) => unsafe {
            x86::accumulate_avx2(out, g, d_v, alpha, p, gp, tile, d, nr)
        },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Isa::Neon if d_v.is_multiple_of(4) => unsafe {
            neon::accumulate_neon(out, g, d_v, alpha, p, gp, tile, d, nr)
        },
        _ => accumulate_scalar(out, g, d_v, alpha, p, gp, tile, d, nr),
    }
}

/// The scalar twin of the accumulate kernels.
#[allow(clippy::too_many_arguments)]
fn accumulate_scalar(
    out: &mut [f32],
    g: usize,
    d_v: usize,
    alpha: &[f32],
    p: &[f32],
    gp: usize,
    tile: &[f32],
    d: usize,
    nr: usize,
) {
    for h in 0..g {
        for v in 0..d_v {
            let mut a = out[h * d_v + v] * alpha[h];
            for r in 0..nr {
                a = p[r * gp + h].mul_add(tile[r * d + v], a);
            }
            out[h * d_v + v] = a;
        }
    }
}

/// Generates `match (a, b) { (1, 1) => f::<1, 1>(..), ... }` over the given const values.
macro_rules! dispatch2 {
    ($a:expr, $b:expr, $f:ident, [$($x:literal),*], $ys:tt, $args:tt) => {
        match $a {
            $($x => dispatch2!(@inner $x, $b, $f, $ys, $args),)*
            _ => unreachable!(),
        }
    };
    (@inner $x:literal, $b:expr, $f:ident, [$($y:literal),*], $args:tt) => {
        match $b {
            $($y => $f::<$x, $y> $args,)*
            _ => unreachable!(),
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::NK;
    use std::arch::x86_64::*;

    /// `softmax_body` compiled for AVX2 (no FMA contraction in Rust: the same bits as the scalar body).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn softmax_avx2(
        s: &mut [f32],
        nr: usize,
        gp: usize,
        m: &mut [f32],
        l: &mut [f32],
        alpha: &mut [f32],
        mx: &mut [f32],
        sum: &mut [f32],
    ) {
        super::softmax_body(s, nr, gp, m, l, alpha, mx, sum)
    }

    /// `softmax_body` compiled for AVX-512.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn softmax_avx512(
        s: &mut [f32],
        nr: usize,
        gp: usize,
        m: &mut [f32],
        l: &mut [f32],
        alpha: &mut [f32],
        mx: &mut [f32],
        sum: &mut [f32],
    ) {
        super::softmax_body(s, nr, gp, m, l, alpha, mx, sum)
    }

    /// `HB` vectors of 16 heads from `h0` × `NK` rows from `r0`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
    unsafe fn score_block_avx512<const HB: usize>(
        qt: &[f32],
        gp: usize,
        d: usize,
        tile: &[f32],
        r0: usize,
        h0: usize,
        scale: f32,
        s: &mut [f32],
    ) {
        let (qp, kp, sp) = (
            qt.as_ptr().wrapping_add(h0),
            tile.as_ptr().wrapping_add(r0 * d),
            s.as_mut_ptr(),
        );
        let mut acc = [[_mm512_setzero_ps(); NK]; HB];
        // SAFETY: qt is d × gp, the tile holds rows r0 .. r0 + NK, s holds (r0 + NK) × gp (asserted).
        unsafe {
            for dd in 0..d {
                let mut qv = [_mm512_setzero_ps(); HB];
                for (j, v) in qv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(qp.add(dd * gp + j * 16));
                }
                for i in 0..NK {
                    let kb = _mm512_set1_ps(*kp.add(i * d + dd));
                    for j in 0..HB {
                        acc[j][i] = _mm512_fmadd_ps(qv[j], kb, acc[j][i]);
                    }
                }
            }
            let sv = _mm512_set1_ps(scale);
            for j in 0..HB {
                for i in 0..NK {
                    _mm512_storeu_ps(
                        sp.add((r0 + i) * gp + h0 + j * 16),
                        _mm512_mul_ps(acc[j][i], sv),
                    );
                }
            }
        }
    }

    /// AVX-512 twin of `scores_scalar`: 64 heads × 6 rows per register block.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scores_avx512(
        qt: &[f32],
        gp: usize,
        d: usize,
        tile: &[f32],
        nr: usize,
        scale: f32,
        s: &mut [f32],
    ) {
        // SAFETY: forwarded bounds; gp is a multiple of 16, nr of NK.
        unsafe {
            for r0 in (0..nr).step_by(NK) {
                let mut h0 = 0;
                while h0 < gp {
                    let hb = ((gp - h0) / 16).min(4);
                    match hb {
                        4 => score_block_avx512::<4>(qt, gp, d, tile, r0, h0, scale, s),
                        3 => score_block_avx512::<3>(qt, gp, d, tile, r0, h0, scale, s),
                        2 => score_block_avx512::<2>(qt, gp, d, tile, r0, h0, scale, s),
                        _ => score_block_avx512::<1>(qt, gp, d, tile, r0, h0, scale, s),
                    }
                    h0 += hb * 16;
                }
            }
        }
    }

    /// AVX2 twin of `scores_scalar`: 16 heads × 6 rows per register block.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)]
    pub unsafe fn scores_avx2(
        qt: &[f32],
        gp: usize,
        d: usize,
        tile: &[f32],
        nr: usize,
        scale: f32,
        s: &mut [f32],
    ) {
        const HB: usize = 2;
        // SAFETY: as in the AVX-512 kernel.
        unsafe {
            for r0 in (0..nr).step_by(NK) {
                for h0 in (0..gp).step_by(16) {
                    let (qp, kp, sp) = (
                        qt.as_ptr().add(h0),
                        tile.as_ptr().add(r0 * d),
                        s.as_mut_ptr(),
                    );
                    let mut acc = [[_mm256_setzero_ps(); NK]; HB];
                    for dd in 0..d {
                        let q0 = _mm256_loadu_ps(qp.add(dd * gp));
                        let q1 = _mm256_loadu_ps(qp.add(dd * gp + 8));
                        for i in 0..NK {
                            let kb = _mm256_broadcast_ss(&*kp.add(i * d + dd));
                            acc[0][i] = _mm256_fmadd_ps(q0, kb, acc[0][i]);
                            acc[1][i] = _mm256_fmadd_ps(q1, kb, acc[1][i]);
                        }
                    }
                    let sv = _mm256_set1_ps(scale);
                    for j in 0..HB {
                        for i in 0..NK {
                            _mm256_storeu_ps(
                                sp.add((r0 + i) * gp + h0 + j * 8),
                                _mm256_mul_ps(acc[j][i], sv),
                            );
                        }
                    }
                }
            }
        }
    }

    /// `NH` heads from `h0` × `VB` vectors of 16 value columns from `v0`, over `nr` rows.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
    unsafe fn acc_block_avx512<const VB: usize, const NH: usize>(
        out: &mut [f32],
        d_v: usize,
        alpha: &[f32],
        p: &[f32],
        gp: usize,
        tile: &[f32],
        d: usize,
        nr: usize,
        h0: usize,
        v0: usize,
    ) {
        let op = out.as_mut_ptr();
        // SAFETY: heads h0 .. h0 + NH ≤ g, columns v0 .. v0 + 16·VB ≤ d_v, rows < nr (asserted by
        // the caller, `accumulate`).
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); VB]; NH];
            for hh in 0..NH {
                let a = _mm512_set1_ps(*alpha.get_unchecked(h0 + hh));
                for i in 0..VB {
                    acc[hh][i] =
                        _mm512_mul_ps(_mm512_loadu_ps(op.add((h0 + hh) * d_v + v0 + i * 16)), a);
                }
            }
            let (pp, tp) = (p.as_ptr().add(h0), tile.as_ptr().add(v0));
            for r in 0..nr {
                let mut vv = [_mm512_setzero_ps(); VB];
                for (i, v) in vv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(tp.add(r * d + i * 16));
                }
                for hh in 0..NH {
                    let pb = _mm512_set1_ps(*pp.add(r * gp + hh));
                    for i in 0..VB {
                        acc[hh][i] = _mm512_fmadd_ps(pb, vv[i], acc[hh][i]);
                    }
                }
            }
            for hh in 0..NH {
                for i in 0..VB {
                    _mm512_storeu_ps(op.add((h0 + hh) * d_v + v0 + i * 16), acc[hh][i]);
                }
            }
        }
    }

    /// AVX-512 twin of `accumulate_scalar` (`d_v % 16 == 0`): 6 heads × 64 columns per block.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn accumulate_avx512(
        out: &mut [f32],
        g: usize,
        d_v: usize,
        alpha: &[f32],
        p: &[f32],
        gp: usize,
        tile: &[f32],
        d: usize,
        nr: usize,
    ) {
        let mut v0 = 0;
        while v0 < d_v {
            let vb = ((d_v - v0) / 16).min(4);
            let mut h0 = 0;
            while h0 < g {
                let nh = (g - h0).min(6);
                // SAFETY: forwarded.
                unsafe {
                    dispatch2!(
                        vb,
                        nh,
                        acc_block_avx512,
                        [1, 2, 3, 4],
                        [1, 2, 3, 4, 5, 6],
                        (out, d_v, alpha, p, gp, tile, d, nr, h0, v0)
                    )
                }
                h0 += nh;
            }
            v0 += vb * 16;
        }
    }

    /// `NH` heads × `VB` vectors of 8 columns (see `acc_block_avx512`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
    unsafe fn acc_block_avx2<const VB: usize, const NH: usize>(
        out: &mut [f32],
        d_v: usize,
        alpha: &[f32],
        p: &[f32],
        gp: usize,
        tile: &[f32],
        d: usize,
        nr: usize,
        h0: usize,
        v0: usize,
    ) {
        let op = out.as_mut_ptr();
        // SAFETY: as in `acc_block_avx512`.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); VB]; NH];
            for hh in 0..NH {
                let a = _mm256_set1_ps(*alpha.get_unchecked(h0 + hh));
                for i in 0..VB {
                    acc[hh][i] =
                        _mm256_mul_ps(_mm256_loadu_ps(op.add((h0 + hh) * d_v + v0 + i * 8)), a);
                }
            }
            let (pp, tp) = (p.as_ptr().add(h0), tile.as_ptr().add(v0));
            for r in 0..nr {
                let mut vv = [_mm256_setzero_ps(); VB];
                for (i, v) in vv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(tp.add(r * d + i * 8));
                }
                for hh in 0..NH {
                    let pb = _mm256_broadcast_ss(&*pp.add(r * gp + hh));
                    for i in 0..VB {
                        acc[hh][i] = _mm256_fmadd_ps(pb, vv[i], acc[hh][i]);
                    }
                }
            }
            for hh in 0..NH {
                for i in 0..VB {
                    _mm256_storeu_ps(op.add((h0 + hh) * d_v + v0 + i * 8), acc[hh][i]);
                }
            }
        }
    }

    /// AVX2 twin of `accumulate_scalar` (`d_v % 8 == 0`): 6 heads × 16 columns per block.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn accumulate_avx2(
        out: &mut [f32],
        g: usize,
        d_v: usize,
        alpha: &[f32],
        p: &[f32],
        gp: usize,
        tile: &[f32],
        d: usize,
        nr: usize,
    ) {
        let mut v0 = 0;
        while v0 < d_v {
            let vb = ((d_v - v0) / 8).min(2);
            let mut h0 = 0;
            while h0 < g {
                let nh = (g - h0).min(6);
                // SAFETY: forwarded.
                unsafe {
                    dispatch2!(
                        vb,
                        nh,
                        acc_block_avx2,
                        [1, 2],
                        [1, 2, 3, 4, 5, 6],
                        (out, d_v, alpha, p, gp, tile, d, nr, h0, v0)
                    )
                }
                h0 += nh;
            }
            v0 += vb * 8;
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::NK;
    use std::arch::aarch64::*;

    /// NEON twin of `scores_scalar`: 16 heads × 6 rows per register block.
    #[target_feature(enable = "neon")]
    #[allow(clippy::needless_range_loop)]
    pub unsafe fn scores_neon(
        qt: &[f32],
        gp: usize,
        d: usize,
        tile: &[f32],
        nr: usize,
        scale: f32,
        s: &mut [f32],
    ) {
        const HB: usize = 4;
        // SAFETY: as in the x86 kernels.
        unsafe {
            for r0 in (0..nr).step_by(NK) {
                for h0 in (0..gp).step_by(16) {
                    let (qp, kp, sp) = (
                        qt.as_ptr().add(h0),
                        tile.as_ptr().add(r0 * d),
                        s.as_mut_ptr(),
                    );
                    let mut acc = [[vdupq_n_f32(0.0); NK]; HB];
                    for dd in 0..d {
                        let mut qv = [vdupq_n_f32(0.0); HB];
                        for (j, v) in qv.iter_mut().enumerate() {
                            *v = vld1q_f32(qp.add(dd * gp + j * 4));
                        }
                        for i in 0..NK {
                            let kb = vdupq_n_f32(*kp.add(i * d + dd));
                            for j in 0..HB {
                                acc[j][i] = vfmaq_f32(acc[j][i], qv[j], kb);
                            }
                        }
                    }
                    let sv = vdupq_n_f32(scale);
                    for j in 0..HB {
                        for i in 0..NK {
                            vst1q_f32(sp.add((r0 + i) * gp + h0 + j * 4), vmulq_f32(acc[j][i], sv));
                        }
                    }
                }
            }
        }
    }

    /// `NH` heads × `VB` vectors of 4 columns.
    #[inline]
    #[target_feature(enable = "neon")]
    #[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
    unsafe fn acc_block_neon<const VB: usize, const NH: usize>(
        out: &mut [f32],
        d_v: usize,
        alpha: &[f32],
        p: &[f32],
        gp: usize,
        tile: &[f32],
        d: usize,
        nr: usize,
        h0: usize,
        v0: usize,
    ) {
        let op = out.as_mut_ptr();
        // SAFETY: as in the x86 kernels.
        unsafe {
            let mut acc = [[vdupq_n_f32(0.0); VB]; NH];
            for hh in 0..NH {
                let a = vdupq_n_f32(*alpha.get_unchecked(h0 + hh));
                for i in 0..VB {
                    acc[hh][i] = vmulq_f32(vld1q_f32(op.add((h0 + hh) * d_v + v0 + i * 4)), a);
                }
            }
            let (pp, tp) = (p.as_ptr().add(h0), tile.as_ptr().add(v0));
            for r in 0..nr {
                let mut vv = [vdupq_n_f32(0.0); VB];
                for (i, v) in vv.iter_mut().enumerate() {
                    *v = vld1q_f32(tp.add(r * d + i * 4));
                }
                for hh in 0..NH {
                    let pb = vdupq_n_f32(*pp.add(r * gp + hh));
                    for i in 0..VB {
                        acc[hh][i] = vfmaq_f32(acc[hh][i], pb, vv[i]);
                    }
                }
            }
            for hh in 0..NH {
                for i in 0..VB {
                    vst1q_f32(op.add((h0 + hh) * d_v + v0 + i * 4), acc[hh][i]);
                }
            }
        }
    }

    /// NEON twin of `accumulate_scalar` (`d_v % 4 == 0`): 6 heads × 16 columns per block.
    #[target_feature(enable = "neon")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn accumulate_neon(
        out: &mut [f32],
        g: usize,
        d_v: usize,
        alpha: &[f32],
        p: &[f32],
        gp: usize,
        tile: &[f32],
        d: usize,
        nr: usize,
    ) {
        let mut v0 = 0;
        while v0 < d_v {
            let vb = ((d_v - v0) / 4).min(4);
            let mut h0 = 0;
            while h0 < g {
                let nh = (g - h0).min(6);
                // SAFETY: forwarded.
                unsafe {
                    dispatch2!(
                        vb,
                        nh,
                        acc_block_neon,
                        [1, 2, 3, 4],
                        [1, 2, 3, 4, 5, 6],
                        (out, d_v, alpha, p, gp, tile, d, nr, h0, v0)
                    )
                }
                h0 += nh;
            }
            v0 += vb * 4;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng as lcg;

    fn unit(next: &mut impl FnMut() -> u64) -> f32 {
        next() as f32 / (1u64 << 30) as f32 - 1.0
    }

    /// f64 definition of one (row, head): what `reference.sparse_mla` computes.
    #[allow(clippy::too_many_arguments)]
    fn oracle(
        q: &[f32],
        kv: &[f32],
        idx: &[i64],
        n: usize,
        d: usize,
        d_v: usize,
        scale: f64,
    ) -> (Vec<f64>, f64) {
        let rows: Vec<usize> = idx
            .iter()
            .filter(|v| **v >= 0 && (**v as usize) < n)
            .map(|v| *v as usize)
            .collect();
        if rows.is_empty() {
            return (vec![0.0; d_v], f64::INFINITY);
        }
        let logits: Vec<f64> = rows
            .iter()
            .map(|r| {
                scale
                    * (0..d)
                        .map(|dd| f64::from(q[dd]) * f64::from(kv[r * d + dd]))
                        .sum::<f64>()
            })
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let p: Vec<f64> = logits.iter().map(|x| (x - m).exp()).collect();
        let l: f64 = p.iter().sum();
        let out = (0..d_v)
            .map(|v| {
                rows.iter()
                    .zip(&p)
                    .map(|(r, pp)| pp * f64::from(kv[r * d + v]))
                    .sum::<f64>()
                    / l
            })
            .collect();
        (out, l.ln() + m)
    }

    struct Case {
        t: usize,
        h: usize,
        d: usize,
        d_v: usize,
        k: usize,
        q: Vec<f32>,
        kv: Vec<f32>,
        idx: Vec<i64>,
    }

    fn case(
        next: &mut impl FnMut() -> u64,
        t: usize,
        h: usize,
        d: usize,
        d_v: usize,
        k: usize,
        n: usize,
    ) -> Case {
        let q = (0..t * h * d).map(|_| unit(next)).collect();
        // bf16-representable values, so the f32 and bf16 latents are the same numbers.
        let kv = (0..n * d)
            .map(|_| f32::from_bits(unit(next).to_bits() & 0xffff_0000))
            .collect();
        let idx = (0..t * k)
            .map(|_| match next() % 10 {
                0 => -1,
                1 => n as i64 + (next() % 3) as i64,
                _ => (next() % n.max(1) as u64) as i64,
            })
            .collect();
        Case {
            t,
            h,
            d,
            d_v,
            k,
            q,
            kv,
            idx,
        }
    }

    fn run(isa: Isa, c: &Case, bf16: bool, threads: usize) -> Output {
        let kv16: Vec<u16> = c.kv.iter().map(|x| (x.to_bits() >> 16) as u16).collect();
        let p = Problem {
            q: &c.q,
            kv: if bf16 {
                Latent::Bf16(&kv16)
            } else {
                Latent::F32(&c.kv)
            },
            indices: Indices::I64(&c.idx),
            t: c.t,
            h: c.h,
            d: c.d,
            d_v: c.d_v,
            k: c.k,
            scale: 0.3,
        };
        sparse_mla(isa, &p, threads).unwrap()
    }

    #[test]
    fn scalar_twin_matches_the_f64_definition() {
        let mut next = lcg(17);
        for &(t, h, d, d_v, k, n) in &[
            (3, 5, 40, 24, 130, 50),
            (2, 20, 16, 16, 7, 9),
            (1, 1, 3, 1, 1, 1),
        ] {
            let c = case(&mut next, t, h, d, d_v, k, n);
            let o = run(Isa::Scalar, &c, false, 1);
            for tt in 0..t {
                for hh in 0..h {
                    let qr = &c.q[(tt * h + hh) * d..(tt * h + hh + 1) * d];
                    let (want, lse) =
                        oracle(qr, &c.kv, &c.idx[tt * k..(tt + 1) * k], n, d, d_v, 0.3);
                    let got = &o.out[(tt * h + hh) * d_v..(tt * h + hh + 1) * d_v];
                    for (g, w) in got.iter().zip(&want) {
                        assert!((f64::from(*g) - w).abs() < 1e-5, "{g} vs {w}");
                    }
                    let gl = f64::from(o.lse[tt * h + hh]);
                    assert!(gl == lse || (gl - lse).abs() < 1e-5, "{gl} vs {lse}");
                }
            }
        }
    }

    #[test]
    fn simd_kernels_equal_their_scalar_twin_bit_for_bit() {
        let mut next = lcg(0x3a11);
        let paths: Vec<Isa> = Isa::available()
            .into_iter()
            .filter(|i| *i != Isa::Scalar)
            .collect();
        #[cfg(target_arch = "aarch64")]
        assert!(paths.contains(&Isa::Neon), "{paths:?}");
        for case_no in 0..40 {
            let t = 1 + (next() % 3) as usize;
            let h = [1usize, 5, 16, 17, 33, 64, 128][(next() % 7) as usize];
            let d = [4usize, 16, 24, 64, 72][(next() % 5) as usize];
            let d_v = [1usize, 4, 8, 16, 48, 64, d][(next() % 7) as usize].min(d);
            let k = (next() % 150) as usize;
            let n = 1 + (next() % 80) as usize;
            let c = case(&mut next, t, h, d, d_v, k, n);
            let bf16 = case_no % 2 == 1;
            let want = run(Isa::Scalar, &c, bf16, 1);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for &isa in &paths {
                for threads in [1, 3] {
                    let got = run(isa, &c, bf16, threads);
                    assert_eq!(
                        bits(&got.out),
                        bits(&want.out),
                        "{isa:?} t={t} h={h} d={d} d_v={d_v} k={k}"
                    );
                    assert_eq!(bits(&got.lse), bits(&want.lse), "{isa:?} lse");
                }
            }
            // The thread count and the bf16 / f32 latent never change a bit either.
            let other = run(Isa::Scalar, &c, !bf16, 2);
            assert_eq!(bits(&other.out), bits(&want.out));
        }
    }

    #[test]
    fn empty_rows_non_finite_values_and_bad_shapes() {
        let mut next = lcg(5);
        let mut c = case(&mut next, 2, 3, 8, 8, 4, 6);
        c.idx[..4].copy_from_slice(&[-1, 6, 99, -7]);
        for isa in Isa::available() {
            let o = run(isa, &c, false, 1);
            assert!(o.out[..3 * 8].iter().all(|x| *x == 0.0));
            assert!(o.lse[..3].iter().all(|x| *x == f32::INFINITY));
            assert!(o.lse[3..].iter().all(|x| x.is_finite()));
        }
        let selected = c.idx[4] as usize;
        c.kv[selected * 8 + 2] = f32::INFINITY;
        let o = run(Isa::Scalar, &c, false, 1);
        assert!(o.lse[3..].iter().all(|x| x.is_nan()) && o.out[24..].iter().all(|x| x.is_nan()));
        let base = Problem {
            q: &c.q,
            kv: Latent::F32(&c.kv),
            indices: Indices::I64(&c.idx),
            t: 2,
            h: 3,
            d: 8,
            d_v: 8,
            k: 4,
            scale: 1.0,
        };
        let err = |p: Problem<'_>| match sparse_mla(Isa::Scalar, &p, 1) {
            Err(MlaError::Shape(m)) => m,
            _ => panic!("accepted"),
        };
        assert!(err(Problem { d_v: 9, ..base }).starts_with("d_v:"));
        assert!(err(Problem { d_v: 0, ..base }).starts_with("d_v:"));
        assert!(err(Problem { h: 4, ..base }).starts_with("q:"));
        assert!(err(Problem { k: 5, ..base }).starts_with("indices:"));
        assert!(err(Problem {
            kv: Latent::F32(&c.kv[..47]),
            ..base
        })
        .starts_with("kv:"));
        assert!(err(Problem {
            scale: f32::NAN,
            ..base
        })
        .starts_with("scale:"));
        assert!(err(Problem { d: 0, ..base }).starts_with("q:"));
        let none = sparse_mla(
            Isa::Scalar,
            &Problem {
                t: 0,
                q: &[],
                indices: Indices::I64(&[]),
                ..base
            },
            1,
        )
        .unwrap();
        assert!(none.out.is_empty() && none.lse.is_empty());
    }

    #[test]
    fn into_caller_buffers_equals_the_allocating_call_and_checks_their_sizes() {
        let mut next = lcg(0x1470);
        let c = case(&mut next, 3, 17, 24, 16, 70, 40);
        let want = run(Isa::Scalar, &c, false, 1);
        let p = Problem {
            q: &c.q,
            kv: Latent::F32(&c.kv),
            indices: Indices::I64(&c.idx),
            t: c.t,
            h: c.h,
            d: c.d,
            d_v: c.d_v,
            k: c.k,
            scale: 0.3,
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for threads in [1, 2] {
            // Garbage on entry (XLA's result buffers are uninitialised): all of it is overwritten.
            let mut out = vec![f32::NAN; c.t * c.h * c.d_v];
            let mut lse = vec![-7.0f32; c.t * c.h];
            sparse_mla_into(crate::cpu::active(), &p, threads, &mut out, &mut lse).unwrap();
            assert_eq!(bits(&out), bits(&want.out));
            assert_eq!(bits(&lse), bits(&want.lse));
        }
        let mut out = vec![0.0f32; c.t * c.h * c.d_v];
        let mut lse = vec![0.0f32; c.t * c.h];
        let e = sparse_mla_into(Isa::Scalar, &p, 1, &mut out[1..], &mut lse).unwrap_err();
        assert!(e.to_string().starts_with("out:"), "{e}");
        let e = sparse_mla_into(Isa::Scalar, &p, 1, &mut out, &mut lse[1..]).unwrap_err();
        assert!(e.to_string().starts_with("lse:"), "{e}");
        let bad = Problem { d_v: 0, ..p };
        let e = sparse_mla_into(Isa::Scalar, &bad, 1, &mut out, &mut lse).unwrap_err();
        assert!(e.to_string().starts_with("d_v:"), "{e}");
        assert!(
            lse.iter().all(|x| *x == 0.0),
            "a refused call writes nothing"
        );
    }

    #[test]
    fn exp_is_accurate_and_zero_far_below() {
        for i in 0..=1740 {
            let x = -(i as f32) * 0.05;
            let (got, want) = (f64::from(exp_nonpositive(x)), f64::from(x).exp());
            assert!(
                (got - want).abs() <= 4e-7 * want + 1e-38,
                "{x}: {got} vs {want}"
            );
        }
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-88.0), 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }
}

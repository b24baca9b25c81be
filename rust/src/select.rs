//! The host indexer (spec §4, §5): for each query token, score every visible
//! key of its sequence straight from the FP8 pages and keep the top-k. Scores
//! live in one row buffer per thread; no `[T, L]` array is built unless the
//! caller asks for the scores themselves.

use crate::cpu::Isa;
use crate::indexer_cache::{CacheError, IndexerKeyCache, SeqId};
use crate::score::{self, padded_heads, Query, MAX_HEADS};
use crate::topk::{self, topk_row};
use crate::{fp8, hadamard, par};

/// Indexer queries in the kernels' layout: Hadamard-rotated, FP8-quantized per
/// head (or kept in f32), transposed to `[T][head_dim][hp]`, with the head
/// weights `w · D^-0.5 · s_q` alongside.
pub struct Queries {
    qt: Vec<f32>,
    hw: Vec<f32>,
    t: usize,
    hp: usize,
    d: usize,
}

impl Queries {
    /// `q`: `[t, heads, d]` post-RoPE indexer queries; `w`: `[t, heads]` head
    /// weights (already × heads^-0.5). With `quantize`, each head is rotated and
    /// quantized to e4m3fn with its own power-of-two scale, as deployed (spec §4);
    /// otherwise it is only rotated (the keys in the cache are rotated too).
    /// Errors name the argument (`q` or `weights`).
    pub fn new(
        q: &[f32],
        w: &[f32],
        t: usize,
        heads: usize,
        d: usize,
        quantize: bool,
    ) -> Result<Self, String> {
        if heads == 0 || heads > MAX_HEADS {
            return Err(format!(
                "q: between 1 and {MAX_HEADS} heads are supported, got {heads}"
            ));
        }
        if !d.is_power_of_two() {
            return Err(format!("q: head_dim must be a power of two, got {d}"));
        }
        if q.len() != t * heads * d || w.len() != t * heads {
            return Err(format!(
                "weights: expected [{t}, {heads}] for q of [{t}, {heads}, {d}]"
            ));
        }
        if let Some(i) = q.iter().position(|x| !x.is_finite()) {
            return Err(format!("q: non-finite value at flat index {i}"));
        }
        if let Some(i) = w.iter().position(|x| !x.is_finite()) {
            return Err(format!("weights: non-finite value at flat index {i}"));
        }
        let hp = padded_heads(heads);
        let mut qt = vec![0.0f32; t * d * hp];
        let mut hw = vec![0.0f32; t * hp];
        let mut buf = vec![0.0f64; d];
        let mut codes = vec![0u8; d];
        let inv_sqrt_d = (d as f64).powf(-0.5);
        for (r, row) in q.chunks_exact(d).enumerate() {
            let (tok, h) = (r / heads, r % heads);
            for (b, x) in buf.iter_mut().zip(row) {
                *b = f64::from(*x);
            }
            hadamard::fwht(&mut buf);
            let scale = if quantize {
                let s = fp8::quantize(&buf, &mut codes);
                for (b, c) in buf.iter_mut().zip(&codes) {
                    *b = f64::from(fp8::DECODE_TABLE[*c as usize]);
                }
                f64::from(s)
            } else {
                1.0
            };
            let base = tok * d * hp;
            for (dd, b) in buf.iter().enumerate() {
                qt[base + dd * hp + h] = *b as f32;
            }
            hw[tok * hp + h] = (f64::from(w[r]) * inv_sqrt_d * scale) as f32;
        }
        Ok(Queries { qt, hw, t, hp, d })
    }

    pub fn rows(&self) -> usize {
        self.t
    }

    fn query(&self, row: usize) -> Query<'_> {
        let (d, hp) = (self.d, self.hp);
        Query {
            qt: &self.qt[row * d * hp..(row + 1) * d * hp],
            hw: &self.hw[row * hp..(row + 1) * hp],
            hp,
            d,
        }
    }
}

/// How `select` runs.
#[derive(Debug, Clone, Copy)]
pub struct SelectOptions {
    /// Entries per row (`K`); rows with fewer visible keys are padded with −1.
    pub k: usize,
    /// Return cache slots (`block · block_size + offset`) instead of positions.
    pub as_slots: bool,
    /// Order each row by descending score (ties: lower position first) instead of ascending position.
    pub by_score: bool,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    pub isa: Isa,
}

/// A row: its sequence's block table and its number of visible keys.
type Row<'a> = (&'a [u32], usize);

/// Check every row before any work: known sequence, position inside it, matching widths.
fn check_rows<'a>(
    cache: &'a IndexerKeyCache,
    q: &Queries,
    seq_ids: &[SeqId],
    positions: &[i64],
) -> Result<Vec<Row<'a>>, CacheError> {
    if q.d != cache.head_dim() {
        return Err(CacheError::Shape(format!(
            "q: head_dim {} does not match the cache's {}",
            q.d,
            cache.head_dim()
        )));
    }
    if seq_ids.len() != q.t || positions.len() != q.t {
        return Err(CacheError::Shape(format!(
            "seq_ids and positions: {} and {} entries for {} query rows",
            seq_ids.len(),
            positions.len(),
            q.t
        )));
    }
    seq_ids
        .iter()
        .zip(positions)
        .enumerate()
        .map(|(index, (&id, &p))| {
            let length = cache.length(id)?;
            if p < 0 || p as usize >= length {
                return Err(CacheError::Position {
                    index,
                    position: p,
                    length,
                });
            }
            Ok((cache.block_table(id)?, p as usize + 1))
        })
        .collect()
}

/// Per-thread buffers.
#[derive(Default)]
struct Work {
    scores: Vec<f32>,
    kernel: Vec<f32>,
    scales: Vec<f32>,
    topk: topk::Scratch,
}

/// Scores of positions `first..first + out.len()` (`first` a multiple of the block size).
#[allow(clippy::too_many_arguments)]
fn score_span(
    isa: Isa,
    cache: &IndexerKeyCache,
    pages: &[u8],
    blocks: &[u32],
    q: Query<'_>,
    first: usize,
    out: &mut [f32],
    kernel: &mut Vec<f32>,
    scales: &mut Vec<f32>,
) {
    let (bs, d, page_bytes) = (cache.block_size(), cache.head_dim(), cache.page_bytes());
    debug_assert!(first.is_multiple_of(bs));
    for (i, chunk) in out.chunks_mut(bs).enumerate() {
        let page = &pages[blocks[first / bs + i] as usize * page_bytes..][..page_bytes];
        let m = chunk.len();
        scales.clear();
        scales.extend(
            page[bs * d..bs * d + 4 * m]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        score::score_keys(isa, q, &page[..m * d], scales, chunk, kernel);
    }
}

/// Scores of a whole row, its pages split over `threads` when it is long.
#[allow(clippy::too_many_arguments)]
fn score_row(
    isa: Isa,
    cache: &IndexerKeyCache,
    pages: &[u8],
    blocks: &[u32],
    q: Query<'_>,
    out: &mut [f32],
    threads: usize,
    w: &mut Work,
) {
    let bs = cache.block_size();
    let per_thread = out.len().div_ceil(threads.max(1)).div_ceil(bs) * bs;
    if threads <= 1 || out.len() < 8192 {
        return score_span(
            isa,
            cache,
            pages,
            blocks,
            q,
            0,
            out,
            &mut w.kernel,
            &mut w.scales,
        );
    }
    std::thread::scope(|s| {
        for (i, part) in out.chunks_mut(per_thread).enumerate() {
            s.spawn(move || {
                let (mut kernel, mut scales) = (Vec::new(), Vec::new());
                score_span(
                    isa,
                    cache,
                    pages,
                    blocks,
                    q,
                    i * per_thread,
                    part,
                    &mut kernel,
                    &mut scales,
                );
            });
        }
    });
}

/// Threads for a batch: one per row chunk, or, when there are fewer rows than
/// threads (decode), split inside each row. Small batches stay on one thread.
fn plan_threads(rows: &[Row<'_>], q: &Queries, threads: usize) -> (usize, usize) {
    let threads = par::resolve_threads(threads);
    let flops: usize = rows.iter().map(|(_, n)| n * q.hp * q.d * 2).sum();
    if threads == 1 || flops < 8_000_000 {
        (1, 1)
    } else if rows.len() < threads {
        (1, threads)
    } else {
        (threads, 1)
    }
}

/// The top-`k` keys of each query row (spec §5), as `[T, k]` int32 positions
/// or slots, −1 padded. Rows whose visible keys all fit in `k` are not scored.
pub fn select(
    cache: &IndexerKeyCache,
    pages: &[u8],
    q: &Queries,
    seq_ids: &[SeqId],
    positions: &[i64],
    opts: SelectOptions,
) -> Result<Vec<i32>, CacheError> {
    if opts.k == 0 {
        return Err(CacheError::Shape("k: must be at least 1".into()));
    }
    if pages.len() != cache.buffer_bytes() {
        return Err(CacheError::Shape(
            "pages: buffer does not match the cache".into(),
        ));
    }
    let rows = check_rows(cache, q, seq_ids, positions)?;
    let (row_threads, inner) = plan_threads(&rows, q, opts.threads);
    let (k, bs, isa) = (opts.k, cache.block_size(), opts.isa);
    let mut out = vec![-1i32; q.t * k];
    par::for_each_row_chunk(&mut out, k, row_threads, Work::default, |row0, chunk, w| {
        for (i, o) in chunk.chunks_mut(k).enumerate() {
            let r = row0 + i;
            let (blocks, n) = rows[r];
            if n <= k && !opts.by_score {
                for (o, p) in o.iter_mut().zip(0..n as i32) {
                    *o = p;
                }
            } else {
                w.scores.resize(n, 0.0);
                let mut scores = std::mem::take(&mut w.scores);
                score_row(isa, cache, pages, blocks, q.query(r), &mut scores, inner, w);
                let res = topk_row(isa, &scores, o, opts.by_score, &mut w.topk);
                w.scores = scores;
                res.map_err(|_| CacheError::NonFiniteScore { row: r })?;
            }
            if opts.as_slots {
                for p in o.iter_mut().filter(|p| **p >= 0) {
                    let pos = *p as usize;
                    *p = (blocks[pos / bs] as usize * bs + pos % bs) as i32;
                }
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// The full scores, `[T, L]` f32 with `L` the longest row's visible length;
/// entries past a row's own visible length are −inf.
pub fn scores(
    cache: &IndexerKeyCache,
    pages: &[u8],
    q: &Queries,
    seq_ids: &[SeqId],
    positions: &[i64],
    threads: usize,
    isa: Isa,
) -> Result<(Vec<f32>, usize), CacheError> {
    if pages.len() != cache.buffer_bytes() {
        return Err(CacheError::Shape(
            "pages: buffer does not match the cache".into(),
        ));
    }
    let rows = check_rows(cache, q, seq_ids, positions)?;
    let l = rows.iter().map(|(_, n)| *n).max().unwrap_or(0);
    let (row_threads, inner) = plan_threads(&rows, q, threads);
    let mut out = vec![f32::NEG_INFINITY; q.t * l];
    par::for_each_row_chunk(&mut out, l, row_threads, Work::default, |row0, chunk, w| {
        for (i, o) in chunk.chunks_mut(l).enumerate() {
            let (blocks, n) = rows[row0 + i];
            score_row(
                isa,
                cache,
                pages,
                blocks,
                q.query(row0 + i),
                &mut o[..n],
                inner,
                w,
            );
        }
        Ok::<(), CacheError>(())
    })?;
    Ok((out, l))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uniform f32 in [-1, 1).
    fn lcg(seed: u64) -> impl FnMut() -> f32 {
        let mut bits = crate::test_rng(seed);
        move || (bits() >> 7) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    fn setup(lens: &[usize], heads: usize, d: usize) -> (IndexerKeyCache, Vec<u8>, Vec<Vec<f32>>) {
        let mut next = lcg(5);
        let mut cache = IndexerKeyCache::new(256, 16, d).unwrap();
        let mut pages = vec![0u8; cache.buffer_bytes()];
        let mut keys = Vec::new();
        for (id, &n) in lens.iter().enumerate() {
            cache.add_sequence(id as i64).unwrap();
            let k: Vec<f32> = (0..n * d).map(|_| next()).collect();
            cache.append(&mut pages, id as i64, &k).unwrap();
            keys.push(k);
        }
        let _ = heads;
        (cache, pages, keys)
    }

    #[test]
    fn select_equals_topk_of_scores_on_every_path_and_thread_count() {
        let (heads, d) = (8, 32);
        let lens = [300usize, 5, 1000];
        let (cache, pages, _) = setup(&lens, heads, d);
        let mut next = lcg(9);
        let seq_ids = [0i64, 1, 2, 2, 0];
        let positions = [299i64, 4, 999, 17, 150];
        let t = seq_ids.len();
        let qv: Vec<f32> = (0..t * heads * d).map(|_| next()).collect();
        let wv: Vec<f32> = (0..t * heads).map(|_| next()).collect();
        let q = Queries::new(&qv, &wv, t, heads, d, true).unwrap();
        let (all, l) = scores(&cache, &pages, &q, &seq_ids, &positions, 1, Isa::Scalar).unwrap();
        assert_eq!(l, 1000);
        for isa in Isa::available() {
            for threads in [1, 2, 3] {
                let opts = SelectOptions {
                    k: 64,
                    as_slots: false,
                    by_score: false,
                    threads,
                    isa,
                };
                let got = select(&cache, &pages, &q, &seq_ids, &positions, opts).unwrap();
                for r in 0..t {
                    let n = positions[r] as usize + 1;
                    let mut want = vec![0i32; 64];
                    topk_row(
                        Isa::Scalar,
                        &all[r * l..r * l + n],
                        &mut want,
                        false,
                        &mut Default::default(),
                    )
                    .unwrap();
                    assert_eq!(
                        &got[r * 64..(r + 1) * 64],
                        &want[..],
                        "{isa:?} threads={threads} row {r}"
                    );
                    assert!(all[r * l + n..(r + 1) * l]
                        .iter()
                        .all(|x| *x == f32::NEG_INFINITY));
                }
            }
        }
    }

    #[test]
    fn bad_rows_are_refused_before_any_work() {
        let (cache, pages, _) = setup(&[10], 4, 16);
        let q = Queries::new(&[0.5; 4 * 16], &[1.0; 4], 1, 4, 16, true).unwrap();
        let opts = SelectOptions {
            k: 4,
            as_slots: false,
            by_score: false,
            threads: 1,
            isa: Isa::Scalar,
        };
        assert_eq!(
            select(&cache, &pages, &q, &[7], &[0], opts).unwrap_err(),
            CacheError::UnknownSequence(7)
        );
        assert!(matches!(
            select(&cache, &pages, &q, &[0], &[10], opts).unwrap_err(),
            CacheError::Position {
                index: 0,
                position: 10,
                length: 10
            }
        ));
        assert!(Queries::new(&[f32::NAN; 4 * 16], &[1.0; 4], 1, 4, 16, true).is_err());
        assert!(Queries::new(&[0.5; 4 * 16], &[f32::INFINITY; 4], 1, 4, 16, true).is_err());
    }
}

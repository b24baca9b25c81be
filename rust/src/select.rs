//! The host indexer (dsa.md §4, §5): for each query token, score every visible
//! key straight from the FP8 pages and keep the top-k. Scores live in one row
//! buffer per worker; no `[T, L]` array is built unless the caller asks for the
//! scores themselves.
//!
//! One core, two ways in: a row is a block table and a count of visible keys
//! (`Row`). `select` / `scores` take the rows' block tables from a `RowSource`:
//! the cache's own sequences, or the caller's `[T, W]` tables (the serving
//! engine's, one per request). Either is checked into rows, then the same
//! `select_rows` / `scores_rows` run, so a sequence's `select` is exactly the
//! paged one over its block table.
//!
//! Consecutive rows that read the same pages (a prefill chunk's rows of one
//! request: one block table, rising positions) are scored together, up to
//! `MAX_GROUP` at a time, each page decoded once for all of them
//! (`score::score_keys_rows`); a row's scores are the same bits as alone.

use rayon::prelude::*;

use crate::cpu::Isa;
use crate::indexer_cache::{CacheError, IndexerKeyCache, PageGeometry, SeqId};
use crate::par::{self, Workers};
use crate::score::{self, padded_heads, Query, MAX_HEADS};
use crate::topk::{self, topk_row, MAX_K};
use crate::{fp8, hadamard, mem};

/// Batches below this many scoring FLOPs stay on the calling thread (waking workers would cost more).
/// (The unit tests use tiny thresholds, so their small problems take every parallel path.)
#[cfg(not(test))]
const MIN_PARALLEL_FLOPS: usize = 8_000_000;
#[cfg(test)]
const MIN_PARALLEL_FLOPS: usize = 1;
/// A row's keys are split over workers in spans of at least this many FLOPs.
#[cfg(not(test))]
const MIN_SPAN_FLOPS: usize = 4_000_000;
#[cfg(test)]
const MIN_SPAN_FLOPS: usize = 20_000;

/// Indexer queries, checked: `[t, heads, d]` post-RoPE queries and `[t, heads]`
/// head weights, borrowed. Each row is put in the kernels' layout
/// (Hadamard-rotated, FP8-quantized per head or kept in f32, transposed to
/// `[head_dim][hp]`, with the head weights `w · D^-0.5 · s_q` alongside) by the
/// worker that scores it, and only if it is scored at all.
pub struct Queries<'a> {
    q: &'a [f32],
    w: &'a [f32],
    t: usize,
    heads: usize,
    hp: usize,
    d: usize,
    quantize: bool,
    bf16: bool,
}

/// A worker's buffers for one query row in the kernels' layout.
#[derive(Default)]
struct QueryBuf {
    qt: Vec<f32>,
    pairs: Vec<u32>,
    hw: Vec<f32>,
    rot: Vec<f64>,
    codes: Vec<u8>,
}

impl<'a> Queries<'a> {
    /// `q`: `[t, heads, d]` post-RoPE indexer queries; `w`: `[t, heads]` head
    /// weights (already × heads^-0.5). With `quantize`, each head is rotated and
    /// quantized to e4m3fn with its own power-of-two scale, as deployed (dsa.md §4);
    /// otherwise it is only rotated (the keys in the cache are rotated too).
    /// Errors name the argument (`q` or `weights`).
    pub fn new(
        q: &'a [f32],
        w: &'a [f32],
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
        Ok(Queries {
            q,
            w,
            t,
            heads,
            hp: padded_heads(heads),
            d,
            quantize,
            bf16: false,
        })
    }

    /// Score with the queries rounded to bfloat16 (`score_bf16`: AVX512-BF16 `vdpbf16ps` where the
    /// CPU has it, its exact scalar twin elsewhere) instead of float32.
    pub fn with_bf16(self, bf16: bool) -> Self {
        Queries { bf16, ..self }
    }

    pub fn rows(&self) -> usize {
        self.t
    }

    pub fn head_dim(&self) -> usize {
        self.d
    }

    /// Scoring FLOPs of one key for one query row (saturating: only compared with thresholds).
    fn flops_per_key(&self) -> usize {
        self.hp.saturating_mul(self.d).saturating_mul(2)
    }

    /// Query row `row` in the kernels' layout, built in `buf`.
    fn prepare<'b>(&self, row: usize, buf: &'b mut QueryBuf) -> Result<Query<'b>, CacheError> {
        let shape = |e: String| CacheError::Shape(format!("q: {e}"));
        let (heads, hp, d) = (self.heads, self.hp, self.d);
        buf.qt.clear();
        buf.qt.resize(d * hp, 0.0);
        buf.hw.clear();
        buf.hw.resize(hp, 0.0);
        buf.rot.resize(d, 0.0);
        buf.codes.resize(d, 0);
        let inv_sqrt_d = (d as f64).powf(-0.5);
        for h in 0..heads {
            let r = row * heads + h;
            for (b, x) in buf.rot.iter_mut().zip(&self.q[r * d..(r + 1) * d]) {
                *b = f64::from(*x);
            }
            hadamard::fwht(&mut buf.rot).map_err(|e| shape(e.to_string()))?;
            let scale = if self.quantize {
                let s =
                    fp8::quantize(&buf.rot, &mut buf.codes).map_err(|e| shape(e.to_string()))?;
                for (b, c) in buf.rot.iter_mut().zip(&buf.codes) {
                    *b = f64::from(fp8::DECODE_TABLE[*c as usize]);
                }
                f64::from(s)
            } else {
                1.0
            };
            for (dd, b) in buf.rot.iter().enumerate() {
                buf.qt[dd * hp + h] = *b as f32;
            }
            buf.hw[h] = (f64::from(self.w[r]) * inv_sqrt_d * scale) as f32;
        }
        if self.bf16 {
            crate::score_bf16::build_pairs(&buf.qt, hp, d, &mut buf.pairs);
        } else {
            buf.pairs.clear();
        }
        Ok(Query {
            pairs: &buf.pairs,
            qt: &buf.qt,
            hw: &buf.hw,
            hp,
            d,
        })
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
    /// Worker threads; 0 means one per core, 1 the calling thread alone.
    pub threads: usize,
    pub isa: Isa,
}

/// One query row, checked: the block of each of its pages and how many keys it sees.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    /// At least `visible.div_ceil(block_size)` block ids, each in `[0, num_blocks)`.
    pub blocks: &'a [u32],
    /// Keys `0 .. visible` are visible (`position + 1`).
    pub visible: usize,
}

fn check_head_dim(geom: PageGeometry, q: &Queries<'_>) -> Result<(), CacheError> {
    if q.d != geom.head_dim {
        return Err(CacheError::Shape(format!(
            "q: head_dim {} does not match the cache's {}",
            q.d, geom.head_dim
        )));
    }
    Ok(())
}

fn check_pages(geom: PageGeometry, pages: &[u8]) -> Result<(), CacheError> {
    Pages::Host(pages).check(geom)
}

/// Where the blocks' FP8 codes and scales are: the host cache's one buffer (per page, the codes
/// then the little-endian float32 scales, dsa.md §6) or the two arrays of the device's pages
/// (`ops.indexer.IndexerPages`: codes `[num_blocks, block_size, d]`, scales `[num_blocks,
/// block_size]`), which hold the same values. The kernels read either in place.
#[derive(Debug, Clone, Copy)]
pub enum Pages<'a> {
    /// `num_blocks × page_bytes` bytes.
    Host(&'a [u8]),
    /// `num_blocks × block_size × d` codes and `num_blocks × block_size` scales.
    Split { codes: &'a [u8], scales: &'a [f32] },
}

impl<'a> Pages<'a> {
    /// The buffers' sizes against the geometry.
    pub fn check(&self, geom: PageGeometry) -> Result<(), CacheError> {
        let ok = match *self {
            Pages::Host(b) => b.len() == geom.buffer_bytes(),
            Pages::Split { codes, scales } => {
                Some(codes.len()) == geom.num_slots().checked_mul(geom.head_dim)
                    && scales.len() == geom.num_slots()
            }
        };
        if ok {
            Ok(())
        } else {
            Err(CacheError::Shape(
                "pages: buffer does not match the cache".into(),
            ))
        }
    }

    /// The first `m` keys' codes of block `b` (`m × d` bytes; `m ≤ block_size`, `b` in range).
    fn codes(&self, geom: PageGeometry, b: u32, m: usize) -> &'a [u8] {
        let (bs, d, b) = (geom.block_size, geom.head_dim, b as usize);
        match *self {
            Pages::Host(buf) => &buf[b * geom.page_bytes()..][..m * d],
            Pages::Split { codes, .. } => &codes[b * bs * d..][..m * d],
        }
    }

    /// The first `m` keys' scales of block `b`: read from the host page's bytes into `buf`, or the
    /// device array's own floats.
    fn scales<'s>(&self, geom: PageGeometry, b: u32, m: usize, buf: &'s mut Vec<f32>) -> &'s [f32]
    where
        'a: 's,
    {
        let (bs, d, b) = (geom.block_size, geom.head_dim, b as usize);
        match *self {
            Pages::Host(page) => {
                let at = b * geom.page_bytes() + bs * d;
                buf.clear();
                buf.extend(
                    page[at..at + 4 * m]
                        .chunks_exact(4)
                        .map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]])),
                );
                buf
            }
            Pages::Split { scales, .. } => &scales[b * bs..][..m],
        }
    }
}

/// The rows of queries into the cache's own sequences: known sequence, position inside it.
pub fn sequence_rows<'a>(
    cache: &'a IndexerKeyCache,
    q: &Queries<'_>,
    seq_ids: &[SeqId],
    positions: &[i64],
) -> Result<Vec<Row<'a>>, CacheError> {
    check_head_dim(cache.geometry(), q)?;
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
            Ok(Row {
                blocks: cache.block_table(id)?,
                visible: p as usize + 1,
            })
        })
        .collect()
}

/// `ids` as block ids (the caller checked every entry is in `[0, num_blocks)`).
fn as_block_ids(ids: &[i32]) -> &[u32] {
    debug_assert!(ids.iter().all(|b| *b >= 0));
    // SAFETY: i32 and u32 have the same size and alignment, and every bit pattern is a valid u32.
    unsafe { std::slice::from_raw_parts(ids.as_ptr().cast::<u32>(), ids.len()) }
}

/// The rows of queries through external block tables: `tables` is `[T, width]` (row-major,
/// −1 padded), row `t` sees positions `0 ..= positions[t]` and page `j` of it is block
/// `tables[t, j]`. Every page a row needs must be a block in `[0, num_blocks)`.
pub fn paged_rows<'a>(
    geom: PageGeometry,
    q: &Queries<'_>,
    tables: &'a [i32],
    width: usize,
    positions: &[i64],
) -> Result<Vec<Row<'a>>, CacheError> {
    check_paged(geom, q, tables, width, positions)?;
    (0..q.t)
        .map(|row| paged_row(geom, tables, width, row, positions[row]))
        .collect()
}

/// `paged_rows` where a padding row sees no key and so selects nothing (all −1), as on the device
/// path (`ops.indexer.select_topk_device`, whose −1 pages hold no visible key): a row at a negative
/// position, or one whose table starts with −1 (the engine pads a step's rows with position 0 and
/// an all −1 table). A −1 page after a valid one that the row needs is still an error.
pub fn paged_rows_padded<'a>(
    geom: PageGeometry,
    q: &Queries<'_>,
    tables: &'a [i32],
    width: usize,
    positions: &[i64],
) -> Result<Vec<Row<'a>>, CacheError> {
    check_paged(geom, q, tables, width, positions)?;
    (0..q.t)
        .map(|row| match positions[row] {
            p if p < 0 || (width > 0 && tables[row * width] < 0) => Ok(Row {
                blocks: &[],
                visible: 0,
            }),
            p => paged_row(geom, tables, width, row, p),
        })
        .collect()
}

fn check_paged(
    geom: PageGeometry,
    q: &Queries<'_>,
    tables: &[i32],
    width: usize,
    positions: &[i64],
) -> Result<(), CacheError> {
    check_head_dim(geom, q)?;
    if positions.len() != q.t || tables.len() != q.t * width {
        return Err(CacheError::Shape(format!(
            "block_tables and positions: {} rows of {width} and {} entries for {} query rows",
            tables.len().checked_div(width).unwrap_or(0),
            positions.len(),
            q.t
        )));
    }
    Ok(())
}

/// Row `row` at position `p` through its table, checked.
fn paged_row(
    geom: PageGeometry,
    tables: &[i32],
    width: usize,
    row: usize,
    p: i64,
) -> Result<Row<'_>, CacheError> {
    if p < 0 {
        return Err(CacheError::NegativePosition {
            index: row,
            position: p,
        });
    }
    // Row `row` sees `p + 1` keys, ranked as int32 positions.
    if p > i64::from(i32::MAX) {
        return Err(CacheError::PositionTooLarge {
            index: row,
            position: p,
        });
    }
    let pages = p as usize / geom.block_size + 1;
    if pages > width {
        return Err(CacheError::TableTooNarrow {
            row,
            position: p,
            pages,
            width,
        });
    }
    let table = &tables[row * width..row * width + pages];
    if let Some((page, &b)) = table
        .iter()
        .enumerate()
        .find(|(_, b)| **b < 0 || **b as usize >= geom.num_blocks)
    {
        return Err(CacheError::BadPage {
            row,
            page,
            block: i64::from(b),
            num_blocks: geom.num_blocks,
        });
    }
    Ok(Row {
        blocks: as_block_ids(table),
        visible: p as usize + 1,
    })
}

/// Per-worker buffers.
#[derive(Default)]
struct Work {
    scores: Vec<f32>,
    query: QueryBuf,
    span: SpanBuf,
    topk: topk::Scratch,
    /// The queries of a group of rows scored together (`group_len`).
    group: Vec<QueryBuf>,
}

/// Most rows scored together over the same pages (each page decoded once for all of them).
const MAX_GROUP: usize = 8;

/// How many rows from `first` (before `end`) read the same pages and can be scored together: each
/// needs scores (`needs`) and its pages are the same blocks as the longest row's so far (a
/// prefill chunk's rows of one request: one block table, different visible lengths). At least 1.
fn group_len(
    rows: &[Row<'_>],
    first: usize,
    end: usize,
    bs: usize,
    needs: impl Fn(&Row<'_>) -> bool,
) -> usize {
    let pages = |r: &Row<'_>| r.visible.div_ceil(bs);
    let mut longest = rows[first];
    let mut g = 1;
    while g < MAX_GROUP && first + g < end {
        let c = rows[first + g];
        let common = pages(&c).min(pages(&longest));
        if !needs(&c) || c.blocks[..common] != longest.blocks[..common] {
            break;
        }
        if c.visible > longest.visible {
            longest = c;
        }
        g += 1;
    }
    g
}

/// Scores of a group of rows that read the same pages (`blocks`: the longest row's): row `r` sees
/// `visible[r]` keys and its scores go to `out[r · stride ..]`. Each page is decoded once for all
/// the rows (`score::score_keys_rows`); every row's scores are those `score_span` gives it alone.
#[allow(clippy::too_many_arguments)]
fn score_group(
    isa: Isa,
    geom: PageGeometry,
    pages: Pages<'_>,
    blocks: &[u32],
    qs: &[Query<'_>],
    visible: &[usize],
    out: &mut [f32],
    stride: usize,
    buf: &mut SpanBuf,
) -> Result<(), CacheError> {
    let bs = geom.block_size;
    let n = visible.iter().copied().max().unwrap_or(0);
    let mut counts = [0usize; MAX_GROUP];
    let counts = &mut counts[..visible.len()];
    for (p, &b) in blocks.iter().enumerate().take(n.div_ceil(bs)) {
        for (c, v) in counts.iter_mut().zip(visible) {
            *c = v.saturating_sub(p * bs).min(bs);
        }
        let m = counts.iter().copied().max().unwrap_or(0);
        let scales = pages.scales(geom, b, m, &mut buf.scales);
        let o = &mut out[p * bs..];
        score::score_keys_rows(
            isa,
            qs,
            counts,
            pages.codes(geom, b, m),
            scales,
            o,
            stride,
            &mut buf.kernel,
        )
        .map_err(|e| CacheError::Shape(e.to_string()))?;
    }
    Ok(())
}

/// The queries of rows `first..first + g` in the kernels' layout, in `bufs`.
fn prepare_group<'b>(
    q: &Queries<'_>,
    first: usize,
    g: usize,
    bufs: &'b mut Vec<QueryBuf>,
) -> Result<Vec<Query<'b>>, CacheError> {
    if bufs.len() < g {
        bufs.resize_with(g, QueryBuf::default);
    }
    bufs.iter_mut()
        .take(g)
        .enumerate()
        .map(|(i, b)| q.prepare(first + i, b))
        .collect()
}

/// Buffers of one span of a row's keys.
#[derive(Default)]
struct SpanBuf {
    kernel: Vec<f32>,
    scales: Vec<f32>,
}

/// Scores of positions `first..first + out.len()` (`first` a multiple of the block size).
#[allow(clippy::too_many_arguments)]
fn score_span(
    isa: Isa,
    geom: PageGeometry,
    pages: Pages<'_>,
    blocks: &[u32],
    q: Query<'_>,
    first: usize,
    out: &mut [f32],
    buf: &mut SpanBuf,
) -> Result<(), CacheError> {
    let bs = geom.block_size;
    debug_assert!(first.is_multiple_of(bs));
    for (i, chunk) in out.chunks_mut(bs).enumerate() {
        let (b, m) = (blocks[first / bs + i], chunk.len());
        let scales = pages.scales(geom, b, m, &mut buf.scales);
        let codes = pages.codes(geom, b, m);
        score::score_keys(isa, q, codes, scales, chunk, &mut buf.kernel)
            .map_err(|e| CacheError::Shape(e.to_string()))?;
    }
    Ok(())
}

/// Scores of a whole row; a long one is split in spans over up to `threads` workers of the
/// pool this runs in (with `threads <= 1`, no parallel iterator is touched).
#[allow(clippy::too_many_arguments)]
fn score_row(
    isa: Isa,
    geom: PageGeometry,
    pages: Pages<'_>,
    blocks: &[u32],
    q: Query<'_>,
    out: &mut [f32],
    threads: usize,
    buf: &mut SpanBuf,
) -> Result<(), CacheError> {
    let spans = if threads <= 1 {
        1
    } else {
        let flops = out
            .len()
            .saturating_mul(q.hp)
            .saturating_mul(q.d)
            .saturating_mul(2);
        (flops / MIN_SPAN_FLOPS).clamp(1, threads)
    };
    if spans == 1 {
        return score_span(isa, geom, pages, blocks, q, 0, out, buf);
    }
    let bs = geom.block_size;
    let span = out.len().div_ceil(spans).div_ceil(bs) * bs;
    out.par_chunks_mut(span)
        .enumerate()
        .try_for_each_init(SpanBuf::default, |b, (i, part)| {
            score_span(isa, geom, pages, blocks, q, i * span, part, b)
        })
}

/// The workers for a batch of `scored` rows totalling `flops`, and how many of them may split
/// one row's keys (all of them when there are too few rows to keep them busy).
fn plan(threads: usize, scored: usize, flops: usize) -> (Workers, usize, usize) {
    let workers = if flops < MIN_PARALLEL_FLOPS {
        Workers::current()
    } else {
        Workers::new(threads)
    };
    let n = workers.count();
    let inner = if scored >= 2 * n { 1 } else { n };
    (workers, n, inner)
}

/// The top-`k` keys of each checked row (dsa.md §5), as `[T, k]` int32 positions or slots,
/// −1 padded. Rows whose visible keys all fit in `k` are not scored (unless sorted by score).
pub fn select_rows(
    geom: PageGeometry,
    pages: Pages<'_>,
    q: &Queries<'_>,
    rows: &[Row<'_>],
    opts: SelectOptions,
) -> Result<Vec<i32>, CacheError> {
    let (k, bs, isa) = (opts.k, geom.block_size, opts.isa);
    check_k(k)?;
    pages.check(geom)?;
    if rows.len() != q.t {
        return Err(CacheError::Shape(format!(
            "{} rows for {} query rows",
            rows.len(),
            q.t
        )));
    }
    let needs_scores = |r: &Row<'_>| r.visible > k || opts.by_score;
    let scored = rows.iter().filter(|r| needs_scores(r));
    let flops = visible_flops(scored.clone(), q);
    let (workers, threads, inner) = plan(opts.threads, scored.count(), flops);
    let mut out = mem::try_matrix(q.t, k, -1i32)
        .map_err(CacheError::alloc("k", "the [T, k] int32 output"))?;
    workers.run(|| {
        par::for_each_row_chunk(&mut out, k, threads, Work::default, |row0, chunk, w| {
            let end = row0 + chunk.len() / k;
            let mut r = row0;
            while r < end {
                let row = rows[r];
                // Rows that read the same pages, scored together (when a row's keys are not
                // split over workers).
                let g = if inner == 1 && needs_scores(&row) {
                    group_len(rows, r, end, bs, needs_scores)
                } else {
                    1
                };
                if g > 1 {
                    let group = &rows[r..r + g];
                    let longest = group.iter().max_by_key(|x| x.visible).unwrap_or(&row);
                    let stride = longest.visible;
                    let mut visible = [0usize; MAX_GROUP];
                    for (v, x) in visible.iter_mut().zip(group) {
                        *v = x.visible;
                    }
                    mem::try_resize(&mut w.scores, g * stride, 0.0)
                        .map_err(CacheError::alloc("positions", "a row of scores"))?;
                    let qs = prepare_group(q, r, g, &mut w.group)?;
                    score_group(
                        isa,
                        geom,
                        pages,
                        longest.blocks,
                        &qs,
                        &visible[..g],
                        &mut w.scores[..g * stride],
                        stride,
                        &mut w.span,
                    )?;
                    for (j, x) in group.iter().enumerate() {
                        let o = &mut chunk[(r + j - row0) * k..(r + j - row0 + 1) * k];
                        let sc = &w.scores[j * stride..j * stride + x.visible];
                        topk_row(isa, sc, o, opts.by_score, &mut w.topk)
                            .map_err(|_| CacheError::NonFiniteScore { row: r + j })?;
                    }
                }
                for (i, o) in chunk[(r - row0) * k..(r - row0 + g) * k]
                    .chunks_mut(k)
                    .enumerate()
                {
                    let r = r + i;
                    let row = rows[r];
                    let n = row.visible;
                    if g > 1 {
                        // Selected above.
                    } else if !needs_scores(&row) {
                        for (o, p) in o.iter_mut().zip(0..n as i32) {
                            *o = p;
                        }
                    } else {
                        let Work {
                            scores,
                            query,
                            span,
                            topk,
                            ..
                        } = w;
                        mem::try_resize(scores, n, 0.0)
                            .map_err(CacheError::alloc("positions", "a row of scores"))?;
                        let qr = q.prepare(r, query)?;
                        score_row(
                            isa,
                            geom,
                            pages,
                            row.blocks,
                            qr,
                            &mut scores[..n],
                            inner,
                            span,
                        )?;
                        topk_row(isa, &scores[..n], o, opts.by_score, topk)
                            .map_err(|_| CacheError::NonFiniteScore { row: r })?;
                    }
                    if opts.as_slots {
                        for p in o.iter_mut().filter(|p| **p >= 0) {
                            let pos = *p as usize;
                            *p = (row.blocks[pos / bs] as usize * bs + pos % bs) as i32;
                        }
                    }
                }
                r += g;
            }
            Ok::<(), CacheError>(())
        })
    })?;
    Ok(out)
}

/// The full scores of checked rows, `[T, L]` f32 with `L` the longest row's visible length;
/// entries past a row's own visible length are −inf.
pub fn scores_rows(
    geom: PageGeometry,
    pages: Pages<'_>,
    q: &Queries<'_>,
    rows: &[Row<'_>],
    threads: usize,
    isa: Isa,
) -> Result<(Vec<f32>, usize), CacheError> {
    pages.check(geom)?;
    if rows.len() != q.t {
        return Err(CacheError::Shape(format!(
            "{} rows for {} query rows",
            rows.len(),
            q.t
        )));
    }
    let l = rows.iter().map(|r| r.visible).max().unwrap_or(0);
    let flops = visible_flops(rows.iter(), q);
    let (workers, threads, inner) = plan(threads, rows.len(), flops);
    let mut out = mem::try_matrix(q.t, l, f32::NEG_INFINITY).map_err(CacheError::alloc(
        "positions",
        "the [T, max(positions) + 1] float32 scores",
    ))?;
    workers.run(|| {
        par::for_each_row_chunk(&mut out, l, threads, Work::default, |row0, chunk, w| {
            let end = row0 + chunk.len().checked_div(l).unwrap_or(0);
            let mut r = row0;
            while r < end {
                let g = if inner == 1 {
                    group_len(rows, r, end, geom.block_size, |_| true)
                } else {
                    1
                };
                let group = &rows[r..r + g];
                let o = &mut chunk[(r - row0) * l..(r - row0 + g) * l];
                if g > 1 {
                    let longest = group.iter().max_by_key(|x| x.visible).unwrap_or(&rows[r]);
                    let mut visible = [0usize; MAX_GROUP];
                    for (v, x) in visible.iter_mut().zip(group) {
                        *v = x.visible;
                    }
                    let qs = prepare_group(q, r, g, &mut w.group)?;
                    score_group(
                        isa,
                        geom,
                        pages,
                        longest.blocks,
                        &qs,
                        &visible[..g],
                        o,
                        l,
                        &mut w.span,
                    )?;
                } else {
                    let qr = q.prepare(r, &mut w.query)?;
                    let o = &mut o[..group[0].visible];
                    score_row(isa, geom, pages, group[0].blocks, qr, o, inner, &mut w.span)?;
                }
                // As `select` refuses them: a NaN score (infinite products) is no score.
                for (j, x) in group.iter().enumerate() {
                    if o[j * l..j * l + x.visible].iter().any(|x| x.is_nan()) {
                        return Err(CacheError::NonFiniteScore { row: r + j });
                    }
                }
                r += g;
            }
            Ok::<(), CacheError>(())
        })
    })?;
    Ok((out, l))
}

/// `k` in `[1, MAX_K]` (positions are int32).
fn check_k(k: usize) -> Result<(), CacheError> {
    if k == 0 || k > MAX_K {
        return Err(CacheError::Shape(format!(
            "k: must be in [1, {MAX_K}], got {k}"
        )));
    }
    Ok(())
}

/// Scoring FLOPs of `rows` (saturating: only compared with thresholds).
fn visible_flops<'r, 'a: 'r>(rows: impl Iterator<Item = &'r Row<'a>>, q: &Queries<'_>) -> usize {
    rows.fold(0usize, |acc, r| acc.saturating_add(r.visible))
        .saturating_mul(q.flops_per_key())
}

/// Where the query rows' block tables come from: the two ways into `select` / `scores`.
#[derive(Debug, Clone, Copy)]
pub enum RowSource<'a> {
    /// The cache's own sequences: row `t` is query `t` of sequence `seq_ids[t]` at `positions[t]`
    /// (it sees keys `0 ..= positions[t]`; see `sequence_rows`).
    Sequences {
        seq_ids: &'a [SeqId],
        positions: &'a [i64],
    },
    /// The caller's block tables, `tables` `[T, width]` row-major, −1 padded (see `paged_rows`).
    Paged {
        tables: &'a [i32],
        width: usize,
        positions: &'a [i64],
    },
}

impl<'a> RowSource<'a> {
    /// The rows, checked (`sequence_rows` or `paged_rows`).
    pub fn rows<'r>(
        self,
        cache: &'r IndexerKeyCache,
        q: &Queries<'_>,
    ) -> Result<Vec<Row<'r>>, CacheError>
    where
        'a: 'r,
    {
        match self {
            RowSource::Sequences { seq_ids, positions } => {
                sequence_rows(cache, q, seq_ids, positions)
            }
            RowSource::Paged {
                tables,
                width,
                positions,
            } => paged_rows(cache.geometry(), q, tables, width, positions),
        }
    }
}

/// `select_rows` over the rows of `src`: a sequence's `select` is exactly the paged one over its
/// block table. `k` and the page buffer are checked before the rows.
pub fn select(
    cache: &IndexerKeyCache,
    pages: &[u8],
    q: &Queries<'_>,
    src: RowSource<'_>,
    opts: SelectOptions,
) -> Result<Vec<i32>, CacheError> {
    check_k(opts.k)?;
    check_pages(cache.geometry(), pages)?;
    let rows = src.rows(cache, q)?;
    select_rows(cache.geometry(), Pages::Host(pages), q, &rows, opts)
}

/// `scores_rows` over the rows of `src` (as `select`).
pub fn scores(
    cache: &IndexerKeyCache,
    pages: &[u8],
    q: &Queries<'_>,
    src: RowSource<'_>,
    threads: usize,
    isa: Isa,
) -> Result<(Vec<f32>, usize), CacheError> {
    check_pages(cache.geometry(), pages)?;
    let rows = src.rows(cache, q)?;
    scores_rows(cache.geometry(), Pages::Host(pages), q, &rows, threads, isa)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs<'a>(seq_ids: &'a [SeqId], positions: &'a [i64]) -> RowSource<'a> {
        RowSource::Sequences { seq_ids, positions }
    }

    /// The one-thread scalar scores of sequence rows: the baseline every path is compared with.
    fn scalar_scores(
        cache: &IndexerKeyCache,
        pages: &[u8],
        q: &Queries<'_>,
        seq_ids: &[SeqId],
        positions: &[i64],
    ) -> (Vec<f32>, usize) {
        scores(cache, pages, q, seqs(seq_ids, positions), 1, Isa::Scalar).unwrap()
    }

    fn paged<'a>(tables: &'a [i32], width: usize, positions: &'a [i64]) -> RowSource<'a> {
        RowSource::Paged {
            tables,
            width,
            positions,
        }
    }

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
        let (all, l) = scalar_scores(&cache, &pages, &q, &seq_ids, &positions);
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
                let got = select(&cache, &pages, &q, seqs(&seq_ids, &positions), opts).unwrap();
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
            select(&cache, &pages, &q, seqs(&[7], &[0]), opts).unwrap_err(),
            CacheError::UnknownSequence(7)
        );
        assert!(matches!(
            select(&cache, &pages, &q, seqs(&[0], &[10]), opts).unwrap_err(),
            CacheError::Position {
                index: 0,
                position: 10,
                length: 10
            }
        ));
        assert!(Queries::new(&[f32::NAN; 4 * 16], &[1.0; 4], 1, 4, 16, true).is_err());
        assert!(Queries::new(&[0.5; 4 * 16], &[f32::INFINITY; 4], 1, 4, 16, true).is_err());
    }

    /// A cache's sequences as external `[T, W]` tables (−1 padded past each row's pages).
    fn tables_of(cache: &IndexerKeyCache, seq_ids: &[i64], width: usize) -> Vec<i32> {
        let mut t = vec![-1i32; seq_ids.len() * width];
        for (row, id) in t.chunks_mut(width).zip(seq_ids) {
            for (o, b) in row.iter_mut().zip(cache.block_table(*id).unwrap()) {
                *o = *b as i32;
            }
        }
        t
    }

    #[test]
    fn paged_select_equals_sequence_select_across_forks_and_truncations() {
        let (heads, d) = (4, 32);
        let mut next = lcg(21);
        let mut cache = IndexerKeyCache::new(64, 16, d).unwrap();
        let mut pages = vec![0u8; cache.buffer_bytes()];
        let mut keys = |n: usize| -> Vec<f32> { (0..n * d).map(|_| next()).collect() };
        cache.add_sequence(0).unwrap();
        cache.append(&mut pages, 0, &keys(150)).unwrap();
        cache.fork(0, 1).unwrap();
        cache.append(&mut pages, 1, &keys(40)).unwrap(); // copies the shared partial page
        cache.fork(1, 2).unwrap();
        cache.truncate(2, 70).unwrap();
        cache.append(&mut pages, 2, &keys(9)).unwrap();
        cache.free(0).unwrap();
        cache.add_sequence(3).unwrap();
        cache.append(&mut pages, 3, &keys(300)).unwrap(); // reuses freed blocks
        let seq_ids = [1i64, 2, 3, 3, 1, 2];
        let positions = [189i64, 78, 299, 0, 20, 15];
        let t = seq_ids.len();
        let mut next = lcg(22);
        let qv: Vec<f32> = (0..t * heads * d).map(|_| next()).collect();
        let wv: Vec<f32> = (0..t * heads).map(|_| next()).collect();
        let width = 24;
        let tables = tables_of(&cache, &seq_ids, width);
        for quantize in [true, false] {
            let q = Queries::new(&qv, &wv, t, heads, d, quantize).unwrap();
            for isa in Isa::available() {
                for threads in [1, 2, 3] {
                    let want = scores(&cache, &pages, &q, seqs(&seq_ids, &positions), threads, isa);
                    let got = scores(
                        &cache,
                        &pages,
                        &q,
                        paged(&tables, width, &positions),
                        threads,
                        isa,
                    );
                    let want = want.unwrap();
                    assert_eq!(got.unwrap(), want, "{isa:?} threads={threads}");
                    // Every path and thread count scores bit for bit alike.
                    let base = scalar_scores(&cache, &pages, &q, &seq_ids, &positions);
                    assert_eq!(want, base, "{isa:?} threads={threads}");
                    for (k, as_slots, by_score) in
                        [(8, false, false), (8, true, true), (64, true, false)]
                    {
                        let opts = SelectOptions {
                            k,
                            as_slots,
                            by_score,
                            threads,
                            isa,
                        };
                        let want =
                            select(&cache, &pages, &q, seqs(&seq_ids, &positions), opts).unwrap();
                        let got =
                            select(&cache, &pages, &q, paged(&tables, width, &positions), opts)
                                .unwrap();
                        assert_eq!(got, want, "{isa:?} threads={threads} k={k}");
                    }
                }
            }
        }
    }

    /// Issue 17, row blocking: a prefill chunk's rows (one block table, positions rising), rows of
    /// a forked request sharing its prefix, and rows of another request, interleaved, score and
    /// select on every path and thread count exactly as each row does alone.
    #[test]
    fn rows_sharing_pages_score_and_select_as_each_row_alone() {
        let (heads, d) = (20, 64);
        let mut next = lcg(0x17b0);
        let mut cache = IndexerKeyCache::new(96, 16, d).unwrap();
        let mut pages = vec![0u8; cache.buffer_bytes()];
        let mut keys = |n: usize| -> Vec<f32> { (0..n * d).map(|_| next()).collect() };
        cache.add_sequence(0).unwrap();
        cache.append(&mut pages, 0, &keys(300)).unwrap();
        cache.fork(0, 1).unwrap();
        cache.append(&mut pages, 1, &keys(70)).unwrap();
        cache.add_sequence(2).unwrap();
        cache.append(&mut pages, 2, &keys(90)).unwrap();
        let mut seq_ids = vec![];
        let mut positions = vec![];
        for p in (0..300).step_by(23).chain([299, 298, 1]) {
            seq_ids.push(0i64);
            positions.push(p as i64);
        }
        for (id, p) in [
            (1i64, 369),
            (1, 300),
            (2, 89),
            (0, 100),
            (1, 12),
            (2, 0),
            (2, 40),
        ] {
            seq_ids.push(id);
            positions.push(p);
        }
        let t = seq_ids.len();
        let mut next = lcg(0x17b1);
        let qv: Vec<f32> = (0..t * heads * d).map(|_| next()).collect();
        let wv: Vec<f32> = (0..t * heads).map(|_| next()).collect();
        let width = 30;
        let tables = tables_of(&cache, &seq_ids, width);
        let q = Queries::new(&qv, &wv, t, heads, d, true).unwrap();
        for isa in Isa::available() {
            // Row by row: one call per row.
            let mut alone = Vec::new();
            let mut alone_sel = Vec::new();
            let opts = |threads, by_score| SelectOptions {
                k: 40,
                as_slots: false,
                by_score,
                threads,
                isa,
            };
            for r in 0..t {
                let q1 = Queries::new(
                    &qv[r * heads * d..(r + 1) * heads * d],
                    &wv[r * heads..(r + 1) * heads],
                    1,
                    heads,
                    d,
                    true,
                )
                .unwrap();
                let src = seqs(&seq_ids[r..r + 1], &positions[r..r + 1]);
                alone.push(scores(&cache, &pages, &q1, src, 1, isa).unwrap().0);
                let sel = select(&cache, &pages, &q1, src, opts(1, true)).unwrap();
                alone_sel.extend(sel);
            }
            for threads in [1, 2, 3] {
                for src in [
                    seqs(&seq_ids, &positions),
                    paged(&tables, width, &positions),
                ] {
                    let (got, l) = scores(&cache, &pages, &q, src, threads, isa).unwrap();
                    for (r, a) in alone.iter().enumerate() {
                        let row = &got[r * l..(r + 1) * l];
                        assert_eq!(&row[..a.len()], &a[..], "{isa:?} threads={threads} row {r}");
                        assert!(row[a.len()..].iter().all(|x| *x == f32::NEG_INFINITY));
                    }
                    let sel = select(&cache, &pages, &q, src, opts(threads, true)).unwrap();
                    assert_eq!(sel, alone_sel, "{isa:?} threads={threads}");
                }
                // The device's split arrays (the same values) score and select alike.
                let (codes, scales) = split_pages(cache.geometry(), &pages);
                let split = Pages::Split {
                    codes: &codes,
                    scales: &scales,
                };
                let rows = paged_rows(cache.geometry(), &q, &tables, width, &positions).unwrap();
                let (got, _) =
                    scores_rows(cache.geometry(), split, &q, &rows, threads, isa).unwrap();
                let (want, _) = scores(
                    &cache,
                    &pages,
                    &q,
                    paged(&tables, width, &positions),
                    1,
                    isa,
                )
                .unwrap();
                assert_eq!(got, want, "{isa:?} threads={threads} (split pages)");
                let sel =
                    select_rows(cache.geometry(), split, &q, &rows, opts(threads, true)).unwrap();
                assert_eq!(sel, alone_sel, "{isa:?} threads={threads} (split pages)");
            }
        }
    }

    /// The host pages as the device's two arrays: codes `[blocks, block_size, d]`, scales
    /// `[blocks, block_size]` (`IndexerPages.from_host_pages`).
    fn split_pages(geom: PageGeometry, pages: &[u8]) -> (Vec<u8>, Vec<f32>) {
        let (bs, d) = (geom.block_size, geom.head_dim);
        let mut codes = Vec::new();
        let mut scales = Vec::new();
        for page in pages.chunks_exact(geom.page_bytes()) {
            codes.extend_from_slice(&page[..bs * d]);
            scales.extend(
                page[bs * d..]
                    .chunks_exact(4)
                    .map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]])),
            );
        }
        (codes, scales)
    }

    #[test]
    fn split_pages_of_the_wrong_size_are_an_error() {
        let (cache, pages, _) = setup(&[40], 4, 16);
        let (codes, scales) = split_pages(cache.geometry(), &pages);
        let q = Queries::new(&[0.5; 4 * 16], &[1.0; 4], 1, 4, 16, true).unwrap();
        let rows = sequence_rows(&cache, &q, &[0], &[39]).unwrap();
        let opts = SelectOptions {
            k: 8,
            as_slots: false,
            by_score: false,
            threads: 1,
            isa: Isa::Scalar,
        };
        for (c, sc) in [(&codes[1..], &scales[..]), (&codes[..], &scales[1..])] {
            let split = Pages::Split {
                codes: c,
                scales: sc,
            };
            let err = select_rows(cache.geometry(), split, &q, &rows, opts).unwrap_err();
            assert!(err.to_string().contains("pages"), "{err}");
        }
        let split = Pages::Split {
            codes: &codes,
            scales: &scales,
        };
        let want = select(&cache, &pages, &q, seqs(&[0], &[39]), opts).unwrap();
        assert_eq!(
            select_rows(cache.geometry(), split, &q, &rows, opts).unwrap(),
            want
        );
    }

    #[test]
    fn bad_tables_are_refused_before_any_work() {
        let (cache, pages, _) = setup(&[40], 4, 16);
        let q = Queries::new(&[0.5; 2 * 4 * 16], &[1.0; 2 * 4], 2, 4, 16, true).unwrap();
        let opts = SelectOptions {
            k: 4,
            as_slots: false,
            by_score: false,
            threads: 1,
            isa: Isa::Scalar,
        };
        let run = |tables: &[i32], width: usize, positions: &[i64]| {
            select(&cache, &pages, &q, paged(tables, width, positions), opts).unwrap_err()
        };
        let good = [0, 1, 2, 0, 1, 2];
        assert!(select(&cache, &pages, &q, paged(&good, 3, &[39, 5]), opts).is_ok());
        assert_eq!(
            run(&[0, 1, -1, 0, 1, 2], 3, &[39, 5]),
            CacheError::BadPage {
                row: 0,
                page: 2,
                block: -1,
                num_blocks: 256
            }
        );
        assert_eq!(
            run(&[0, 1, 2, 300, 1, 2], 3, &[39, 5]),
            CacheError::BadPage {
                row: 1,
                page: 0,
                block: 300,
                num_blocks: 256
            }
        );
        // Pages past the ones a row needs may hold anything.
        assert!(select(
            &cache,
            &pages,
            &q,
            paged(&[0, 1, 2, 0, -7, 999], 3, &[39, 5]),
            opts
        )
        .is_ok());
        assert_eq!(
            run(&good, 3, &[48, 5]),
            CacheError::TableTooNarrow {
                row: 0,
                position: 48,
                pages: 4,
                width: 3
            }
        );
        assert_eq!(
            run(&good, 3, &[3, -1]),
            CacheError::NegativePosition {
                index: 1,
                position: -1
            }
        );
        assert!(matches!(run(&good, 2, &[3, 1]), CacheError::Shape(_)));
        assert!(matches!(run(&good, 3, &[3]), CacheError::Shape(_)));
        let q32 = Queries::new(&[0.5; 4 * 32], &[1.0; 4], 1, 4, 32, true).unwrap();
        assert!(matches!(
            select(&cache, &pages, &q32, paged(&good[..3], 3, &[3]), opts),
            Err(CacheError::Shape(_))
        ));
    }

    /// Issue 19, end to end: on random caches (block sizes, widths, heads, lengths, forks), every
    /// SIMD path's `scores` and `select` — FP8 queries and unquantized float32 queries, by position
    /// and by score, as positions and as slots — equal the scalar path's, bit for bit.
    #[test]
    fn every_path_selects_and_scores_as_the_scalar_path_on_random_caches() {
        let mut bits = crate::test_rng(0x0001_95e1);
        let mut next = lcg(0x0001_95e2);
        let paths: Vec<Isa> = Isa::available();
        for _case in 0..8 {
            let bs = [16usize, 32, 64][(bits() % 3) as usize];
            let d = [16usize, 32, 64, 128][(bits() % 4) as usize];
            let heads = 1 + (bits() % 40) as usize;
            let mut cache = IndexerKeyCache::new(64, bs, d).unwrap();
            let mut pages = vec![0u8; cache.buffer_bytes()];
            let nseq = 1 + (bits() % 3) as i64;
            for id in 0..nseq {
                cache.add_sequence(id).unwrap();
                let n = 1 + (bits() % 160) as usize;
                let k: Vec<f32> = (0..n * d).map(|_| next() * 4.0).collect();
                cache.append(&mut pages, id, &k).unwrap();
            }
            cache.fork(0, 99).unwrap();
            let extra: Vec<f32> = (0..3 * d).map(|_| next()).collect();
            cache.append(&mut pages, 99, &extra).unwrap();
            let ids: Vec<i64> = (0..nseq).chain([99]).collect();
            let t = 1 + (bits() % 4) as usize;
            let seq_ids: Vec<i64> = (0..t).map(|_| ids[(bits() as usize) % ids.len()]).collect();
            let positions: Vec<i64> = seq_ids
                .iter()
                .map(|id| (bits() as usize % cache.length(*id).unwrap()) as i64)
                .collect();
            let qv: Vec<f32> = (0..t * heads * d).map(|_| next() * 3.0).collect();
            let wv: Vec<f32> = (0..t * heads).map(|_| next()).collect();
            let k = 1 + (bits() % 200) as usize;
            for quantize in [true, false] {
                let q = Queries::new(&qv, &wv, t, heads, d, quantize).unwrap();
                let base = scalar_scores(&cache, &pages, &q, &seq_ids, &positions);
                for &isa in &paths {
                    let threads = 1 + (bits() % 3) as usize;
                    let got = scores(&cache, &pages, &q, seqs(&seq_ids, &positions), threads, isa);
                    let got = got.unwrap();
                    let as_bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        (as_bits(&got.0), got.1),
                        (as_bits(&base.0), base.1),
                        "{isa:?} quantize={quantize} heads={heads} d={d} bs={bs}"
                    );
                    for (as_slots, by_score) in [(false, false), (true, true), (false, true)] {
                        let opts = |isa| SelectOptions {
                            k,
                            as_slots,
                            by_score,
                            threads,
                            isa,
                        };
                        let want = select(
                            &cache,
                            &pages,
                            &q,
                            seqs(&seq_ids, &positions),
                            opts(Isa::Scalar),
                        );
                        let got = select(&cache, &pages, &q, seqs(&seq_ids, &positions), opts(isa));
                        assert_eq!(got, want, "{isa:?} quantize={quantize} k={k}");
                    }
                }
            }
        }
    }

    #[test]
    fn absurd_k_positions_and_non_finite_scores_are_errors() {
        let (cache, pages, _) = setup(&[40], 4, 16);
        let q = Queries::new(&[0.5; 4 * 16], &[1.0; 4], 1, 4, 16, true).unwrap();
        let opts = |k| SelectOptions {
            k,
            as_slots: false,
            by_score: false,
            threads: 1,
            isa: Isa::Scalar,
        };
        for k in [0, MAX_K + 1, usize::MAX] {
            assert!(matches!(
                select(&cache, &pages, &q, seqs(&[0], &[3]), opts(k)),
                Err(CacheError::Shape(m)) if m.starts_with("k: ")
            ));
        }
        // A position past int32 in a (wide enough) table: refused, not wrapped.
        let tables = [0i32; 4];
        assert_eq!(
            select(&cache, &pages, &q, paged(&tables, 4, &[1 << 31]), opts(4)).unwrap_err(),
            CacheError::PositionTooLarge {
                index: 0,
                position: 1 << 31
            }
        );
        // An output past 2^40 bytes is refused before it is allocated.
        let t = 1024;
        let qv = vec![0.5; t * 4 * 16];
        let wv = vec![1.0; t * 4];
        let big = Queries::new(&qv, &wv, t, 4, 16, true).unwrap();
        let ids = vec![0i64; t];
        let pos = vec![3i64; t];
        assert!(matches!(
            select(&cache, &pages, &big, seqs(&ids, &pos), opts(MAX_K)),
            Err(CacheError::Alloc { arg: "k", err, .. }) if err.over_limit
        ));
        // Weights so large that one head's term is +inf and another's −inf: a NaN score, refused
        // by `scores` as by `select` (an inf score alone is a score).
        let mut c = IndexerKeyCache::new(2, 16, 16).unwrap();
        let mut p = vec![0u8; c.buffer_bytes()];
        c.add_sequence(5).unwrap();
        c.append_quantized(&mut p, 5, &[0x38u8; 16], &[1.0])
            .unwrap();
        let q = Queries::new(&[100.0; 2 * 16], &[f32::MAX, -f32::MAX], 1, 2, 16, false).unwrap();
        assert_eq!(
            scores(&c, &p, &q, seqs(&[5], &[0]), 1, Isa::Scalar).unwrap_err(),
            CacheError::NonFiniteScore { row: 0 }
        );
        let by_score = SelectOptions {
            by_score: true,
            ..opts(1)
        };
        assert_eq!(
            select(&c, &p, &q, seqs(&[5], &[0]), by_score).unwrap_err(),
            CacheError::NonFiniteScore { row: 0 }
        );
    }
}

//! The paged FP8 indexer-key cache (dsa.md §4, §6): block tables per sequence
//! over pages of `block_size` tokens, each page `block_size × head_dim` e4m3fn
//! bytes (token-major) followed by `block_size` little-endian f32 scales.
//!
//! This type holds the bookkeeping (pool, block tables, lengths); the page
//! bytes live in a buffer the caller owns and passes in (`pages`), so the
//! Python side can expose them as a zero-copy numpy array. Every mutating call
//! validates everything before it changes anything: on error the cache and the
//! pages are exactly as before.
//!
//! Two ways to address the pages:
//! - by sequence: the cache keeps its own pool, block tables and lengths
//!   (`add_sequence`, `append`, `fork`, `truncate`, `free`) for standalone users;
//! - by slot / block id: the caller (the serving engine) owns the blocks and one
//!   block table per request, shared by every cache, and only asks the cache to
//!   `write_slots`, `copy_block` and to score through its tables
//!   (`select::select_paged`). Such a cache has no sequences at all.
//!
//! The two do not mix on one cache: the sequence API allocates from the cache's
//! own pool, which knows nothing of the blocks an external allocator hands out.

use std::collections::HashMap;

use crate::fp8;
use crate::mem::{self, AllocError};
use crate::pool::{BlockPool, PoolError};
use crate::quant::{self, QuantError};

/// Sequence identifiers are caller-chosen integers.
pub type SeqId = i64;

/// Why a cache call was refused. Nothing was changed when one is returned.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheError {
    UnknownSequence(SeqId),
    DuplicateSequence(SeqId),
    PoolExhausted {
        needed: usize,
        free: usize,
    },
    Shape(String),
    Quant(QuantError),
    NonFiniteScale {
        row: usize,
    },
    Position {
        index: usize,
        position: i64,
        length: usize,
    },
    TruncateBeyondLength {
        n: usize,
        length: usize,
    },
    Config(String),
    /// An FP8 code that is NaN (0x7F or 0xFF) in `row`.
    NanCode {
        row: usize,
    },
    /// A query row's scores contain NaN (infinite weights or queries).
    NonFiniteScore {
        row: usize,
    },
    /// The block pool refused (a block id out of range or not held).
    Pool(PoolError),
    /// Entry `index` of a slot list is outside `[0, num_slots)` (and not the −1 "skip").
    Slot {
        index: usize,
        slot: i64,
        num_slots: usize,
    },
    /// A block id outside `[0, num_blocks)`.
    Block {
        block: i64,
        num_blocks: usize,
    },
    /// Entry `index` of the positions is negative.
    NegativePosition {
        index: usize,
        position: i64,
    },
    /// Row `row` at `position` needs `pages` pages of its block table, which has `width`.
    TableTooNarrow {
        row: usize,
        position: i64,
        pages: usize,
        width: usize,
    },
    /// Row `row` needs page `page` of its block table, which holds `block`: −1 or out of range.
    BadPage {
        row: usize,
        page: usize,
        block: i64,
        num_blocks: usize,
    },
    /// Entry `index` of the positions is past the last position an int32 can name.
    PositionTooLarge {
        index: usize,
        position: i64,
    },
    /// A buffer the call needs (`what`: its output, a row of scores) cannot be had; `arg` is
    /// the argument whose value sized it.
    Alloc {
        arg: &'static str,
        what: &'static str,
        err: AllocError,
    },
}

impl CacheError {
    /// `Alloc` for the buffer `what`, sized by argument `arg`.
    pub fn alloc(arg: &'static str, what: &'static str) -> impl FnOnce(AllocError) -> CacheError {
        move |err| CacheError::Alloc { arg, what, err }
    }
}

impl std::fmt::Display for CacheError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheError::UnknownSequence(s) => write!(f, "unknown sequence id {s}"),
            CacheError::DuplicateSequence(s) => write!(f, "sequence id {s} already exists"),
            CacheError::PoolExhausted { needed, free } => {
                write!(
                    f,
                    "block pool exhausted: {needed} blocks needed, {free} free"
                )
            }
            CacheError::Shape(m) | CacheError::Config(m) => f.write_str(m),
            CacheError::Quant(e) => write!(f, "{e}"),
            CacheError::NonFiniteScale { row } => {
                write!(f, "scale of row {row} is not a finite positive number")
            }
            CacheError::Position {
                index,
                position,
                length,
            } => write!(
                f,
                "position {position} (entry {index}) is outside [0, {length})"
            ),
            CacheError::NanCode { row } => {
                write!(f, "row {row} holds the e4m3fn NaN code (0x7F or 0xFF)")
            }
            CacheError::NonFiniteScore { row } => {
                write!(f, "the scores of query row {row} are not finite")
            }
            CacheError::TruncateBeyondLength { n, length } => {
                write!(
                    f,
                    "cannot truncate to {n} tokens: the sequence has {length}"
                )
            }
            CacheError::Pool(e) => write!(f, "{e}"),
            CacheError::Slot {
                index,
                slot,
                num_slots,
            } => write!(
                f,
                "slot {slot} (entry {index}) is outside [0, {num_slots}) (−1 skips a row)"
            ),
            CacheError::Block { block, num_blocks } => {
                write!(f, "block {block} is outside [0, {num_blocks})")
            }
            CacheError::NegativePosition { index, position } => {
                write!(f, "position {position} (entry {index}) is negative")
            }
            CacheError::TableTooNarrow {
                row,
                position,
                pages,
                width,
            } => write!(
                f,
                "row {row} at position {position} needs {pages} pages, its block table has {width}"
            ),
            CacheError::BadPage {
                row,
                page,
                block: -1,
                ..
            } => write!(f, "row {row} needs page {page} of its block table, which is −1 (no block)"),
            CacheError::BadPage {
                row,
                page,
                block,
                num_blocks,
            } => write!(
                f,
                "row {row} needs page {page} of its block table, block {block}, outside [0, {num_blocks})"
            ),
            CacheError::PositionTooLarge { index, position } => write!(
                f,
                "position {position} (entry {index}) is past {}, the last an int32 position can name",
                i32::MAX
            ),
            CacheError::Alloc { what, err, .. } => write!(f, "{what}: {err}"),
        }
    }
}

impl std::error::Error for CacheError {}

impl From<PoolError> for CacheError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Exhausted { wanted, free } => CacheError::PoolExhausted {
                needed: wanted,
                free,
            },
            PoolError::Alloc(err) => CacheError::Alloc {
                arg: "num_blocks",
                what: "the block pool's bookkeeping",
                err,
            },
            e => CacheError::Pool(e),
        }
    }
}

/// The page layout's sizes, all a paged call needs to know of a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageGeometry {
    pub num_blocks: usize,
    pub block_size: usize,
    pub head_dim: usize,
}

impl PageGeometry {
    /// Bytes of one page: `block_size · (head_dim + 4)` (8448 at 64 × 128).
    pub fn page_bytes(&self) -> usize {
        self.block_size * (self.head_dim + 4)
    }
    /// Bytes of the whole page buffer.
    pub fn buffer_bytes(&self) -> usize {
        self.num_blocks * self.page_bytes()
    }
    /// Slots in the buffer: `num_blocks · block_size` (each fits in an int32).
    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }
}

#[derive(Debug, Clone, Default)]
struct Sequence {
    blocks: Vec<u32>,
    len: usize,
}

/// Block pool, block tables and lengths of a paged indexer-key cache.
#[derive(Debug, Clone)]
pub struct IndexerKeyCache {
    head_dim: usize,
    block_size: usize,
    pool: BlockPool,
    seqs: HashMap<SeqId, Sequence>,
}

impl IndexerKeyCache {
    /// `block_size` must be a positive multiple of 16, `head_dim` a power of two (Hadamard).
    pub fn new(num_blocks: usize, block_size: usize, head_dim: usize) -> Result<Self, CacheError> {
        if block_size == 0 || !block_size.is_multiple_of(16) {
            return Err(CacheError::Config(format!(
                "block_size must be a positive multiple of 16, got {block_size}"
            )));
        }
        if !head_dim.is_power_of_two() {
            return Err(CacheError::Config(format!(
                "head_dim must be a power of two, got {head_dim}"
            )));
        }
        // Slots travel as int32, and the buffer and each page must be addressable.
        let page_fits = head_dim
            .checked_add(4)
            .and_then(|w| w.checked_mul(block_size))
            .is_some_and(|bytes| bytes <= isize::MAX as usize);
        if !page_fits {
            return Err(CacheError::Config(format!(
                "block_size {block_size} × (head_dim {head_dim} + 4) bytes per page is too large"
            )));
        }
        let fits = num_blocks
            .checked_mul(block_size)
            .filter(|slots| *slots <= 1 << 31)
            .and_then(|slots| slots.checked_mul(head_dim + 4))
            .is_some_and(|bytes| bytes <= isize::MAX as usize);
        if !fits {
            return Err(CacheError::Config(format!(
                "num_blocks {num_blocks} × block_size {block_size} is too large \
                 (slots must fit in int32, at most 2^31 tokens)"
            )));
        }
        Ok(IndexerKeyCache {
            head_dim,
            block_size,
            pool: BlockPool::new(num_blocks)?,
            seqs: HashMap::new(),
        })
    }

    pub fn geometry(&self) -> PageGeometry {
        PageGeometry {
            num_blocks: self.num_blocks(),
            block_size: self.block_size,
            head_dim: self.head_dim,
        }
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }
    /// Bytes of one page: `block_size · (head_dim + 4)` (8448 at 64 × 128).
    pub fn page_bytes(&self) -> usize {
        self.geometry().page_bytes()
    }
    /// Bytes of the whole page buffer the caller must provide.
    pub fn buffer_bytes(&self) -> usize {
        self.geometry().buffer_bytes()
    }
    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free()
    }
    /// Bytes of the pages currently held by some sequence.
    pub fn bytes_used(&self) -> usize {
        (self.num_blocks() - self.num_free_blocks()) * self.page_bytes()
    }
    /// Sequences holding `block` (0: free); an error for an id outside `[0, num_blocks)`.
    pub fn block_refcount(&self, block: i64) -> Result<u32, CacheError> {
        self.pool.refcount(block).map_err(|_| CacheError::Block {
            block,
            num_blocks: self.num_blocks(),
        })
    }
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }
    pub fn sequence_ids(&self) -> Vec<SeqId> {
        let mut ids: Vec<SeqId> = self.seqs.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    fn seq(&self, id: SeqId) -> Result<&Sequence, CacheError> {
        self.seqs.get(&id).ok_or(CacheError::UnknownSequence(id))
    }

    pub fn length(&self, id: SeqId) -> Result<usize, CacheError> {
        Ok(self.seq(id)?.len)
    }

    pub fn block_table(&self, id: SeqId) -> Result<&[u32], CacheError> {
        Ok(&self.seq(id)?.blocks)
    }

    pub fn add_sequence(&mut self, id: SeqId) -> Result<(), CacheError> {
        if self.seqs.contains_key(&id) {
            return Err(CacheError::DuplicateSequence(id));
        }
        self.seqs.insert(id, Sequence::default());
        Ok(())
    }

    /// Blocks an append of `n` tokens takes from the pool: new pages, plus one
    /// copy of the last page when it is partial and shared with a fork.
    fn blocks_needed(&self, s: &Sequence, n: usize) -> (usize, bool) {
        // Saturating: `can_append` may be asked about any `n`, however large.
        let new_pages = s
            .len
            .saturating_add(n)
            .div_ceil(self.block_size)
            .saturating_sub(s.blocks.len());
        let cow = n > 0
            && !s.len.is_multiple_of(self.block_size)
            && s.blocks
                .last()
                .is_some_and(|b| self.pool.refcounts()[*b as usize] > 1);
        (new_pages + usize::from(cow), cow)
    }

    pub fn can_append(&self, id: SeqId, n: usize) -> Result<bool, CacheError> {
        let (need, _) = self.blocks_needed(self.seq(id)?, n);
        Ok(need <= self.pool.num_free())
    }

    /// Append `keys` (`n × head_dim` f32, post-RoPE): Hadamard, FP8, written in place.
    pub fn append(&mut self, pages: &mut [u8], id: SeqId, keys: &[f32]) -> Result<(), CacheError> {
        let d = self.head_dim;
        if !keys.len().is_multiple_of(d) {
            return Err(CacheError::Shape(format!(
                "keys: length {} is not a multiple of {d}",
                keys.len()
            )));
        }
        let n = keys.len() / d;
        self.check_room(id, n)?; // before the quantization work, and so before any change
        let mut codes =
            mem::try_filled(keys.len(), 0u8).map_err(CacheError::alloc("keys", "the FP8 codes"))?;
        let mut scales =
            mem::try_filled(n, 0f32).map_err(CacheError::alloc("keys", "the FP8 scales"))?;
        quant::quantize_rows(keys, d, true, &mut codes, &mut scales).map_err(CacheError::Quant)?;
        self.append_quantized(pages, id, &codes, &scales)
    }

    /// `blocks_needed` for an append of `n` tokens to `id`, or `PoolExhausted`.
    fn check_room(&self, id: SeqId, n: usize) -> Result<(usize, bool), CacheError> {
        let (need, cow) = self.blocks_needed(self.seq(id)?, n);
        if need > self.pool.num_free() {
            return Err(CacheError::PoolExhausted {
                needed: need,
                free: self.pool.num_free(),
            });
        }
        Ok((need, cow))
    }

    /// Append keys quantized elsewhere: `codes` (`n × head_dim` e4m3fn bytes,
    /// already Hadamard-rotated) and their `scales` (`n`, finite, positive).
    pub fn append_quantized(
        &mut self,
        pages: &mut [u8],
        id: SeqId,
        codes: &[u8],
        scales: &[f32],
    ) -> Result<(), CacheError> {
        let (d, bs) = (self.head_dim, self.block_size);
        let n = scales.len();
        if n.checked_mul(d) != Some(codes.len()) {
            return Err(CacheError::Shape(format!(
                "fp8 codes: {} bytes for {n} scales of {d} codes each",
                codes.len(),
            )));
        }
        self.check_buffer(pages.len())?;
        if let Some(row) = scales.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(CacheError::NonFiniteScale { row });
        }
        if let Some(i) = codes.iter().position(|c| c & 0x7f == 0x7f) {
            return Err(CacheError::NanCode { row: i / d });
        }
        let (need, cow) = self.check_room(id, n)?;
        // Everything is checked: from here on nothing fails.
        let mut fresh = self.pool.alloc(need)?.into_iter();
        let page_bytes = self.page_bytes();
        let seq = self
            .seqs
            .get_mut(&id)
            .ok_or(CacheError::UnknownSequence(id))?;
        if cow {
            if let (Some(old), Some(new)) = (seq.blocks.pop(), fresh.next()) {
                let (src, dst) = (old as usize * page_bytes, new as usize * page_bytes);
                pages.copy_within(src..src + page_bytes, dst);
                // `old` is held (by this sequence and a fork): the release cannot fail.
                self.pool.release(&[old])?;
                seq.blocks.push(new);
            }
        }
        seq.blocks.extend(fresh);
        let (blocks, start) = (&seq.blocks, seq.len);
        for (i, (code_row, scale)) in codes.chunks_exact(d).zip(scales).enumerate() {
            let pos = start + i;
            let (code_range, s) = slot_bytes(d, bs, blocks[pos / bs] as usize * bs + pos % bs);
            pages[code_range].copy_from_slice(code_row);
            pages[s..s + 4].copy_from_slice(&scale.to_le_bytes());
        }
        seq.len += n;
        Ok(())
    }

    fn check_buffer(&self, len: usize) -> Result<(), CacheError> {
        if len != self.buffer_bytes() {
            return Err(CacheError::Shape(format!(
                "page buffer has {len} bytes, expected {}",
                self.buffer_bytes()
            )));
        }
        Ok(())
    }

    /// A new sequence `child` sharing all of `parent`'s pages (copy on write).
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<(), CacheError> {
        let p = self.seq(parent)?.clone();
        if self.seqs.contains_key(&child) {
            return Err(CacheError::DuplicateSequence(child));
        }
        self.pool.retain(&p.blocks)?;
        self.seqs.insert(child, p);
        Ok(())
    }

    /// Keep the first `n` tokens (rollback); pages past them return to the pool.
    pub fn truncate(&mut self, id: SeqId, n: usize) -> Result<(), CacheError> {
        let length = self.seq(id)?.len;
        if n > length {
            return Err(CacheError::TruncateBeyondLength { n, length });
        }
        let keep = n.div_ceil(self.block_size);
        let seq = self
            .seqs
            .get_mut(&id)
            .ok_or(CacheError::UnknownSequence(id))?;
        release_in_order(&mut self.pool, &seq.blocks[keep..])?;
        seq.blocks.truncate(keep);
        seq.len = n;
        Ok(())
    }

    /// Remove a sequence; its pages return to the pool when no fork holds them.
    pub fn free(&mut self, id: SeqId) -> Result<(), CacheError> {
        let seq = self.seqs.get(&id).ok_or(CacheError::UnknownSequence(id))?;
        release_in_order(&mut self.pool, &seq.blocks)?;
        self.seqs.remove(&id);
        Ok(())
    }

    /// Slot of each position of sequence `id` (`block · block_size + offset`),
    /// −1 staying −1; any other position outside `[0, length)` is an error.
    pub fn slots_into(
        &self,
        id: SeqId,
        positions: &[i64],
        out: &mut [i32],
    ) -> Result<(), CacheError> {
        let seq = self.seq(id)?;
        let bs = self.block_size;
        for (index, (&p, o)) in positions.iter().zip(out.iter_mut()).enumerate() {
            *o = if p == -1 {
                -1
            } else if p < 0 || p as usize >= seq.len {
                return Err(CacheError::Position {
                    index,
                    position: p,
                    length: seq.len,
                });
            } else {
                let p = p as usize;
                (seq.blocks[p / bs] as usize * bs + p % bs) as i32
            };
        }
        Ok(())
    }

    /// Copy the FP8 codes (`n × head_dim`) and scales (`n`) of `positions` out.
    pub fn gather(
        &self,
        pages: &[u8],
        id: SeqId,
        positions: &[i64],
        codes: &mut [u8],
        scales: &mut [f32],
    ) -> Result<(), CacheError> {
        self.check_buffer(pages.len())?;
        if positions.len().checked_mul(self.head_dim) != Some(codes.len())
            || scales.len() != positions.len()
        {
            return Err(CacheError::Shape(format!(
                "gather: {} code bytes and {} scales for {} positions of {}",
                codes.len(),
                scales.len(),
                positions.len(),
                self.head_dim
            )));
        }
        let mut slots = mem::try_filled(positions.len(), 0i32)
            .map_err(CacheError::alloc("positions", "the slots"))?;
        self.slots_into(id, positions, &mut slots)?;
        if let Some(index) = slots.iter().position(|s| *s < 0) {
            return Err(CacheError::Position {
                index,
                position: -1,
                length: self.seq(id)?.len,
            });
        }
        for ((slot, code_row), scale) in slots
            .iter()
            .zip(codes.chunks_exact_mut(self.head_dim))
            .zip(scales)
        {
            let (c, s) = self.read_slot(pages, *slot as usize);
            code_row.copy_from_slice(c);
            *scale = s;
        }
        Ok(())
    }

    fn read_slot<'a>(&self, pages: &'a [u8], slot: usize) -> (&'a [u8], f32) {
        let (code_range, s) = slot_bytes(self.head_dim, self.block_size, slot);
        let b = &pages[s..s + 4];
        let scale = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        (&pages[code_range], scale)
    }

    /// Write keys quantized elsewhere straight into slots (`block · block_size + offset`) chosen by
    /// the caller: row `i` of `codes` (`n × head_dim` e4m3fn bytes of Hadamard-rotated keys) and
    /// `scales[i]` (finite, positive) go to `slots[i]`; rows whose slot is −1 are skipped (and not
    /// checked). A later row wins when two name the same slot. All or nothing.
    pub fn write_slots(
        &self,
        pages: &mut [u8],
        slots: &[i32],
        codes: &[u8],
        scales: &[f32],
    ) -> Result<(), CacheError> {
        let (d, bs) = (self.head_dim, self.block_size);
        let n = slots.len();
        if scales.len() != n || n.checked_mul(d) != Some(codes.len()) {
            return Err(CacheError::Shape(format!(
                "fp8 codes: {} bytes and {} scales for {n} slots, expected {} and {n}",
                codes.len(),
                scales.len(),
                n as u128 * d as u128
            )));
        }
        self.check_buffer(pages.len())?;
        let num_slots = self.geometry().num_slots();
        let written = || {
            slots
                .iter()
                .zip(codes.chunks_exact(d).zip(scales))
                .enumerate()
                .filter(|(_, (s, _))| **s != -1)
        };
        for (index, (&slot, (row, &scale))) in written() {
            if slot < 0 || slot as usize >= num_slots {
                return Err(CacheError::Slot {
                    index,
                    slot: i64::from(slot),
                    num_slots,
                });
            }
            if !(scale.is_finite() && scale > 0.0) {
                return Err(CacheError::NonFiniteScale { row: index });
            }
            if row.iter().any(|c| c & 0x7f == 0x7f) {
                return Err(CacheError::NanCode { row: index });
            }
        }
        for (_, (&slot, (row, scale))) in written() {
            let (code_range, s) = slot_bytes(d, bs, slot as usize);
            pages[code_range].copy_from_slice(row);
            pages[s..s + 4].copy_from_slice(&scale.to_le_bytes());
        }
        Ok(())
    }

    /// Block `block` as an index into the buffer, or `Block` if out of range.
    pub fn check_block(&self, block: i64) -> Result<usize, CacheError> {
        usize::try_from(block)
            .ok()
            .filter(|b| *b < self.num_blocks())
            .ok_or(CacheError::Block {
                block,
                num_blocks: self.num_blocks(),
            })
    }

    /// Copy page `src`'s bytes (codes and scales) over page `dst`: the copy half of a
    /// copy-on-write of a shared partial page. `src == dst` is a no-op.
    pub fn copy_block(&self, pages: &mut [u8], src: usize, dst: usize) -> Result<(), CacheError> {
        self.check_buffer(pages.len())?;
        for b in [src, dst] {
            if b >= self.num_blocks() {
                return Err(CacheError::Block {
                    block: i64::try_from(b).unwrap_or(i64::MAX),
                    num_blocks: self.num_blocks(),
                });
            }
        }
        let pb = self.page_bytes();
        pages.copy_within(src * pb..(src + 1) * pb, dst * pb);
        Ok(())
    }

    /// All keys of `id` dequantized (`length × head_dim`, in the Hadamard-rotated basis).
    pub fn dequantize(&self, pages: &[u8], id: SeqId) -> Result<Vec<f32>, CacheError> {
        self.check_buffer(pages.len())?;
        let seq = self.seq(id)?;
        let (d, bs) = (self.head_dim, self.block_size);
        let mut out = mem::try_matrix(seq.len, d, 0f32).map_err(CacheError::alloc(
            "seq_id",
            "the [length, head_dim] float32 keys",
        ))?;
        for (pos, row) in out.chunks_exact_mut(d).enumerate() {
            let (codes, scale) =
                self.read_slot(pages, seq.blocks[pos / bs] as usize * bs + pos % bs);
            for (o, c) in row.iter_mut().zip(codes) {
                *o = fp8::DECODE_TABLE[*c as usize] * scale;
            }
        }
        Ok(out)
    }
}

/// Release `blocks` so they return to the free list in their own order (the pool releases in
/// reverse order; the sequence API has always freed front to back).
fn release_in_order(pool: &mut BlockPool, blocks: &[u32]) -> Result<(), CacheError> {
    let reversed: Vec<u32> = blocks.iter().rev().copied().collect();
    Ok(pool.release(&reversed)?)
}

/// Where slot `slot` lives in the page buffer (dsa.md §6): the byte range of its
/// `head_dim` codes and the offset of its little-endian f32 scale.
fn slot_bytes(head_dim: usize, block_size: usize, slot: usize) -> (std::ops::Range<usize>, usize) {
    let page = slot / block_size * block_size * (head_dim + 4);
    let off = slot % block_size;
    let codes = page + off * head_dim;
    (
        codes..codes + head_dim,
        page + block_size * head_dim + 4 * off,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize, d: usize, seed: u32) -> Vec<f32> {
        (0..n * d)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 100.0 - 5.0)
            .collect()
    }

    fn cache(blocks: usize) -> (IndexerKeyCache, Vec<u8>) {
        let c = IndexerKeyCache::new(blocks, 16, 128).unwrap();
        let pages = vec![0u8; c.buffer_bytes()];
        (c, pages)
    }

    #[test]
    fn layout_is_132_bytes_per_token() {
        let c = IndexerKeyCache::new(3, 64, 128).unwrap();
        assert_eq!(c.page_bytes(), 8448);
        assert_eq!(c.page_bytes() / c.block_size(), 132);
    }

    #[test]
    fn append_writes_the_spec_layout() {
        let (mut c, mut pages) = cache(4);
        c.add_sequence(7).unwrap();
        let k = keys(20, 128, 1);
        c.append(&mut pages, 7, &k).unwrap();
        assert_eq!(c.length(7).unwrap(), 20);
        assert_eq!(c.block_table(7).unwrap(), &[0, 1]);
        let mut codes = vec![0u8; 20 * 128];
        let mut scales = vec![0f32; 20];
        quant::quantize_rows(&k, 128, true, &mut codes, &mut scales).unwrap();
        // Token 17 is in page 1 at offset 1.
        let page = c.page_bytes();
        assert_eq!(&pages[page + 128..page + 256], &codes[17 * 128..18 * 128]);
        assert_eq!(
            &pages[page + 16 * 128 + 4..page + 16 * 128 + 8],
            &scales[17].to_le_bytes()
        );
    }

    #[test]
    fn exhausted_pool_changes_nothing() {
        let (mut c, mut pages) = cache(2);
        c.add_sequence(1).unwrap();
        c.append(&mut pages, 1, &keys(20, 128, 2)).unwrap();
        let before = pages.clone();
        let err = c.append(&mut pages, 1, &keys(13, 128, 3)).unwrap_err();
        assert_eq!(err, CacheError::PoolExhausted { needed: 1, free: 0 });
        assert_eq!(c.length(1).unwrap(), 20);
        assert_eq!(pages, before);
        assert!(c.can_append(1, 12).unwrap() && !c.can_append(1, 13).unwrap());
    }

    #[test]
    fn fork_shares_pages_and_copies_the_partial_one_on_write() {
        let (mut c, mut pages) = cache(8);
        c.add_sequence(1).unwrap();
        c.append(&mut pages, 1, &keys(20, 128, 4)).unwrap(); // blocks 0 (full), 1 (4 tokens)
        c.fork(1, 2).unwrap();
        assert_eq!(c.block_refcount(0).unwrap(), 2);
        assert_eq!(c.block_refcount(1).unwrap(), 2);
        c.append(&mut pages, 2, &keys(1, 128, 5)).unwrap();
        let child = c.block_table(2).unwrap().to_vec();
        assert_eq!(child[0], 0);
        assert_ne!(child[1], 1, "partial page copied before the write");
        assert_eq!(c.block_refcount(1).unwrap(), 1);
        let parent_keys = c.dequantize(&pages, 1).unwrap();
        let child_keys = c.dequantize(&pages, 2).unwrap();
        assert_eq!(parent_keys.len(), 20 * 128);
        assert_eq!(&child_keys[..20 * 128], &parent_keys[..]);
        c.free(1).unwrap();
        c.free(2).unwrap();
        assert_eq!(c.num_free_blocks(), 8);
    }

    #[test]
    fn truncate_and_slots() {
        let (mut c, mut pages) = cache(8);
        c.add_sequence(3).unwrap();
        c.append(&mut pages, 3, &keys(40, 128, 6)).unwrap();
        c.truncate(3, 17).unwrap();
        assert_eq!(c.block_table(3).unwrap().len(), 2);
        assert_eq!(c.num_free_blocks(), 6);
        let mut out = [0i32; 3];
        c.slots_into(3, &[0, 16, -1], &mut out).unwrap();
        assert_eq!(out, [0, 16, -1]);
        assert!(matches!(
            c.slots_into(3, &[17], &mut out[..1]),
            Err(CacheError::Position { .. })
        ));
        assert!(c.truncate(3, 18).is_err());
    }

    #[test]
    fn bad_input_is_refused() {
        let (mut c, mut pages) = cache(2);
        assert_eq!(
            c.append(&mut pages, 9, &keys(1, 128, 0)),
            Err(CacheError::UnknownSequence(9))
        );
        c.add_sequence(9).unwrap();
        assert_eq!(c.add_sequence(9), Err(CacheError::DuplicateSequence(9)));
        let mut k = keys(2, 128, 0);
        k[200] = f32::NAN;
        assert!(matches!(
            c.append(&mut pages, 9, &k),
            Err(CacheError::Quant(_))
        ));
        assert!(c.append(&mut pages, 9, &k[..100]).is_err());
        assert!(c
            .append_quantized(&mut pages, 9, &[0u8; 128], &[0.0])
            .is_err());
        assert_eq!(c.length(9).unwrap(), 0);
        assert!(c.free(9).is_ok() && c.free(9).is_err());
        assert!(IndexerKeyCache::new(2, 24, 128).is_err());
        assert!(IndexerKeyCache::new(2, 16, 96).is_err());
    }

    #[test]
    fn write_slots_lays_keys_out_as_append_does() {
        let (mut seq, mut seq_pages) = cache(6);
        seq.add_sequence(1).unwrap();
        let k = keys(37, 128, 8);
        seq.append(&mut seq_pages, 1, &k).unwrap();
        let mut codes = vec![0u8; 37 * 128];
        let mut scales = vec![0f32; 37];
        quant::quantize_rows(&k, 128, true, &mut codes, &mut scales).unwrap();
        let (paged, mut pages) = cache(6);
        let mut slots = vec![0i32; 37];
        let positions: Vec<i64> = (0..37).collect();
        seq.slots_into(1, &positions, &mut slots).unwrap();
        // In two calls, the second with a skipped row (−1) written by the first.
        let mut second = slots[20..].to_vec();
        second[0] = -1;
        paged
            .write_slots(&mut pages, &slots[..21], &codes[..21 * 128], &scales[..21])
            .unwrap();
        paged
            .write_slots(&mut pages, &second, &codes[20 * 128..], &scales[20..])
            .unwrap();
        assert_eq!(pages, seq_pages);
        assert_eq!(paged.num_sequences(), 0);
        assert_eq!(
            paged.num_free_blocks(),
            6,
            "the paged API leaves the cache's own pool alone"
        );
    }

    #[test]
    fn write_slots_and_copy_block_refuse_bad_input_and_change_nothing() {
        let (c, mut pages) = cache(2); // 32 slots
        let row = [0x38u8; 128];
        c.write_slots(&mut pages, &[3], &row, &[1.0]).unwrap();
        let before = pages.clone();
        let two: Vec<u8> = row.iter().chain(&row).copied().collect();
        let mut nan = two.clone();
        nan[128 + 5] = 0xFF;
        type Case<'a> = (&'a [i32], &'a [u8], &'a [f32], CacheError);
        let cases: [Case<'_>; 5] = [
            (
                &[0, 32],
                &two,
                &[1.0, 1.0],
                CacheError::Slot {
                    index: 1,
                    slot: 32,
                    num_slots: 32,
                },
            ),
            (
                &[0, -2],
                &two,
                &[1.0, 1.0],
                CacheError::Slot {
                    index: 1,
                    slot: -2,
                    num_slots: 32,
                },
            ),
            (&[0, 1], &nan, &[1.0, 1.0], CacheError::NanCode { row: 1 }),
            (
                &[0, 1],
                &two,
                &[1.0, f32::NAN],
                CacheError::NonFiniteScale { row: 1 },
            ),
            (
                &[0, 1],
                &row,
                &[1.0, 1.0],
                CacheError::Shape(
                    "fp8 codes: 128 bytes and 2 scales for 2 slots, expected 256 and 2".into(),
                ),
            ),
        ];
        for (slots, codes, scales, want) in cases {
            assert_eq!(c.write_slots(&mut pages, slots, codes, scales), Err(want));
            assert_eq!(pages, before);
        }
        // A skipped row is not checked.
        assert!(c
            .write_slots(&mut pages, &[-1, 4], &two, &[0.0, 1.0])
            .is_ok());
        assert!(c
            .write_slots(&mut pages, &[4, -1], &nan, &[1.0, 0.0])
            .is_ok());
        let before = pages.clone();
        assert_eq!(
            c.copy_block(&mut pages, 0, 2),
            Err(CacheError::Block {
                block: 2,
                num_blocks: 2
            })
        );
        assert_eq!(pages, before);
        assert_eq!(
            c.check_block(-1).unwrap_err().to_string(),
            "block -1 is outside [0, 2)"
        );
        c.copy_block(&mut pages, 0, 1).unwrap();
        let pb = c.page_bytes();
        assert_eq!(pages[..pb], pages[pb..]);
        c.copy_block(&mut pages, 1, 1).unwrap();
    }

    #[test]
    fn sizes_that_overflow_slots_or_memory_are_refused() {
        assert!(IndexerKeyCache::new(1 << 27, 16, 128).is_ok());
        assert!(IndexerKeyCache::new((1 << 27) + 1, 16, 128).is_err());
        assert!(IndexerKeyCache::new(2, 1 << 62, 128).is_err());
        assert!(IndexerKeyCache::new(2, 16, 1 << 62).is_err());
        assert!(IndexerKeyCache::new(0, 16, 128).is_ok());
        // No pages, but a page size past memory: refused too (page_bytes must be addressable).
        assert!(IndexerKeyCache::new(0, 16, 1 << 62).is_err());
        assert!(IndexerKeyCache::new(0, 1 << 62, 16).is_err());
    }

    #[test]
    fn buffers_of_other_sizes_are_errors_not_panics() {
        let (mut c, mut pages) = cache(2);
        c.add_sequence(1).unwrap();
        c.append(&mut pages, 1, &keys(3, 128, 1)).unwrap();
        let mut short = vec![0u8; 10];
        assert!(matches!(
            c.append(&mut short, 1, &keys(1, 128, 1)),
            Err(CacheError::Shape(_))
        ));
        assert!(matches!(c.dequantize(&short, 1), Err(CacheError::Shape(_))));
        let (mut codes, mut scales) = (vec![0u8; 128], vec![0f32; 2]);
        assert!(matches!(
            c.gather(&pages, 1, &[0, 1], &mut codes, &mut scales),
            Err(CacheError::Shape(_))
        ));
        // Codes that are not `head_dim` per scale: a shape error.
        assert!(matches!(
            c.append_quantized(&mut pages, 1, &[], &vec![1.0; 3][..]),
            Err(CacheError::Shape(_))
        ));
        assert_eq!(c.length(1).unwrap(), 3);
        let d = c.dequantize(&pages, 1).unwrap();
        assert_eq!(d.len(), 3 * 128);
    }
}

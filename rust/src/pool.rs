//! THE block allocator of the paged caches: a free list and reference counts.
//!
//! It knows nothing of page layouts; caches and the engine ask it for block ids
//! and hand them back. A block shared by several holders (forked sequences,
//! requests sharing a prefix) has a count above one and is copied before a
//! write (copy-on-write is the caller's job; the pool only counts).
//!
//! Every call checks everything before it changes anything: on error the pool
//! is exactly as before.

use crate::mem::{self, AllocError};

/// The most blocks a pool may have: block ids travel as int32.
pub const MAX_BLOCKS: usize = i32::MAX as usize;

/// The most holders one block may have (refcounts travel as int32 too).
pub const MAX_REFCOUNT: u32 = i32::MAX as u32;

/// Why a pool call was refused. Nothing was changed when one is returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolError {
    /// More blocks than `MAX_BLOCKS` were asked for at construction.
    TooManyBlocks { num_blocks: usize },
    /// An allocation of `wanted` blocks with only `free` free.
    Exhausted { wanted: usize, free: usize },
    /// Entry `index` names a block outside `[0, num_blocks)`.
    OutOfRange {
        index: usize,
        block: i64,
        num_blocks: usize,
    },
    /// Entry `index` names a free block (retained or released one time too many).
    NotHeld { index: usize, block: u32 },
    /// Entry `index` would take a block past `MAX_REFCOUNT` holders.
    RefcountOverflow { index: usize, block: u32 },
    /// The pool's bookkeeping (8 bytes per block) could not be allocated.
    Alloc(AllocError),
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolError::TooManyBlocks { num_blocks } => write!(
                f,
                "{num_blocks} blocks is more than the {MAX_BLOCKS} block ids int32 can hold"
            ),
            PoolError::Exhausted { wanted, free } => {
                write!(f, "{wanted} blocks wanted, {free} free")
            }
            PoolError::OutOfRange {
                index,
                block,
                num_blocks,
            } => write!(
                f,
                "block {block} (entry {index}) is outside [0, {num_blocks})"
            ),
            PoolError::NotHeld { index, block } => {
                write!(f, "block {block} (entry {index}) is free: only held blocks can be retained or released")
            }
            PoolError::RefcountOverflow { index, block } => write!(
                f,
                "block {block} (entry {index}) would have more than {MAX_REFCOUNT} holders"
            ),
            PoolError::Alloc(e) => write!(f, "the pool's bookkeeping: {e}"),
        }
    }
}

impl std::error::Error for PoolError {}

/// A pool of `num_blocks` blocks, each free or held `refcount` times.
///
/// The free list is a stack: `alloc` pops from its end, `release` pushes blocks
/// that reach zero holders, so the lowest ids go first from a fresh pool and a
/// released run comes back in the order it was allocated.
#[derive(Debug, Clone)]
pub struct BlockPool {
    refcount: Vec<u32>,
    free: Vec<u32>,
}

impl BlockPool {
    /// A pool of `num_blocks` free blocks (0 is allowed: a pool that never has room).
    /// `Alloc` (not an abort) when the 8 bytes per block of bookkeeping cannot be allocated.
    pub fn new(num_blocks: usize) -> Result<Self, PoolError> {
        if num_blocks > MAX_BLOCKS {
            return Err(PoolError::TooManyBlocks { num_blocks });
        }
        let refcount = mem::try_zeroed::<u32>(num_blocks).map_err(PoolError::Alloc)?;
        let mut free = Vec::new();
        free.try_reserve_exact(num_blocks).map_err(|_| {
            PoolError::Alloc(AllocError {
                bytes: mem::bytes_of::<u32>(num_blocks, 1),
                over_limit: false,
            })
        })?;
        // Pop from the end: hand out low block ids first (easier to read in tests and dumps).
        // `num_blocks <= MAX_BLOCKS`, so every id fits in a u32.
        free.extend((0..num_blocks as u32).rev());
        Ok(BlockPool { refcount, free })
    }

    pub fn num_blocks(&self) -> usize {
        self.refcount.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Holders of `block` (0: free).
    pub fn refcount(&self, block: i64) -> Result<u32, PoolError> {
        Ok(self.refcount[self.index(0, block)?])
    }

    /// Holders of every block, by id.
    pub fn refcounts(&self) -> &[u32] {
        &self.refcount
    }

    /// The free blocks in the order `alloc` hands them out.
    pub fn free_blocks(&self) -> impl Iterator<Item = u32> + '_ {
        self.free.iter().rev().copied()
    }

    /// `block` as an index, or `OutOfRange` naming entry `index`.
    fn index(&self, index: usize, block: i64) -> Result<usize, PoolError> {
        usize::try_from(block)
            .ok()
            .filter(|b| *b < self.num_blocks())
            .ok_or(PoolError::OutOfRange {
                index,
                block,
                num_blocks: self.num_blocks(),
            })
    }

    /// `blocks` as block ids, each checked to be in range (`OutOfRange` for the first that is not).
    pub fn check_ids(&self, blocks: &[i64]) -> Result<Vec<u32>, PoolError> {
        blocks
            .iter()
            .enumerate()
            .map(|(i, &b)| self.index(i, b).map(|b| b as u32))
            .collect()
    }

    fn check_range(&self, blocks: &[u32]) -> Result<(), PoolError> {
        for (i, &b) in blocks.iter().enumerate() {
            self.index(i, i64::from(b))?;
        }
        Ok(())
    }

    /// `n` fresh blocks (refcount 1), lowest ids of a fresh pool first; all or nothing.
    pub fn alloc(&mut self, n: usize) -> Result<Vec<u32>, PoolError> {
        if n > self.free.len() {
            return Err(PoolError::Exhausted {
                wanted: n,
                free: self.free.len(),
            });
        }
        let blocks = self.free.split_off(self.free.len() - n);
        for &b in &blocks {
            debug_assert_eq!(self.refcount[b as usize], 0);
            self.refcount[b as usize] = 1;
        }
        Ok(blocks.into_iter().rev().collect())
    }

    /// One more holder of each of `blocks` (all held already; a block listed twice gains two).
    pub fn retain(&mut self, blocks: &[u32]) -> Result<(), PoolError> {
        self.check_range(blocks)?;
        if let Some((index, &block)) = blocks
            .iter()
            .enumerate()
            .find(|(_, b)| self.refcount[**b as usize] == 0)
        {
            return Err(PoolError::NotHeld { index, block });
        }
        for (i, &b) in blocks.iter().enumerate() {
            let c = &mut self.refcount[b as usize];
            if *c >= MAX_REFCOUNT {
                for &done in &blocks[..i] {
                    self.refcount[done as usize] -= 1;
                }
                return Err(PoolError::RefcountOverflow { index: i, block: b });
            }
            *c += 1;
        }
        Ok(())
    }

    /// One holder fewer for each of `blocks`, taken in reverse order; a block
    /// reaching zero goes back on the free list, so `release(&alloc(n)?)` makes
    /// the next `alloc(n)` hand out the same blocks in the same order. A block
    /// listed twice loses two holders; releasing a free block is an error.
    pub fn release(&mut self, blocks: &[u32]) -> Result<(), PoolError> {
        self.check_range(blocks)?;
        let free_before = self.free.len();
        for (i, &b) in blocks.iter().enumerate().rev() {
            let c = &mut self.refcount[b as usize];
            if *c == 0 {
                // Undo: the entries after `i` were taken; put their holders and the free list back.
                for &done in &blocks[i + 1..] {
                    self.refcount[done as usize] += 1;
                }
                self.free.truncate(free_before);
                return Err(PoolError::NotHeld { index: i, block: b });
            }
            *c -= 1;
            if *c == 0 {
                self.free.push(b);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(p: &BlockPool) -> (Vec<u32>, Vec<u32>) {
        (p.refcounts().to_vec(), p.free_blocks().collect())
    }

    #[test]
    fn alloc_is_all_or_nothing_and_blocks_come_back_in_order() {
        let mut p = BlockPool::new(4).unwrap();
        let a = p.alloc(3).unwrap();
        assert_eq!(a, vec![0, 1, 2]);
        assert_eq!(
            p.alloc(2).unwrap_err(),
            PoolError::Exhausted { wanted: 2, free: 1 }
        );
        assert_eq!(p.num_free(), 1);
        p.retain(&[1]).unwrap();
        p.release(&[1]).unwrap();
        assert_eq!(p.refcount(1).unwrap(), 1);
        p.release(&a).unwrap();
        assert_eq!(p.num_free(), 4);
        assert_eq!(p.free_blocks().collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        assert_eq!(p.alloc(4).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(p.alloc(0).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn a_released_run_is_handed_out_again_in_the_same_order() {
        let mut p = BlockPool::new(8).unwrap();
        let a = p.alloc(2).unwrap();
        let b = p.alloc(3).unwrap();
        p.release(&b).unwrap();
        p.release(&a).unwrap();
        assert_eq!(p.alloc(2).unwrap(), a);
        assert_eq!(p.alloc(3).unwrap(), b);
    }

    #[test]
    fn duplicates_count_once_per_entry() {
        let mut p = BlockPool::new(3).unwrap();
        p.alloc(2).unwrap();
        p.retain(&[1, 1]).unwrap();
        assert_eq!(p.refcount(1).unwrap(), 3);
        p.release(&[1, 1, 1]).unwrap();
        assert_eq!(p.refcount(1).unwrap(), 0);
        assert_eq!(p.free_blocks().collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn errors_change_nothing() {
        let mut p = BlockPool::new(4).unwrap();
        p.alloc(2).unwrap();
        p.retain(&[0]).unwrap();
        let before = state(&p);
        assert_eq!(
            p.release(&[0, 1, 1]).unwrap_err(),
            PoolError::NotHeld { index: 1, block: 1 }
        );
        assert_eq!(state(&p), before);
        assert_eq!(
            p.release(&[0, 9]).unwrap_err(),
            PoolError::OutOfRange {
                index: 1,
                block: 9,
                num_blocks: 4
            }
        );
        assert_eq!(state(&p), before);
        assert_eq!(
            p.retain(&[0, 2]).unwrap_err(),
            PoolError::NotHeld { index: 1, block: 2 }
        );
        assert_eq!(state(&p), before);
        assert_eq!(
            p.alloc(3).unwrap_err(),
            PoolError::Exhausted { wanted: 3, free: 2 }
        );
        assert_eq!(state(&p), before);
        assert!(p.refcount(-1).is_err() && p.refcount(4).is_err());
        assert_eq!(
            p.check_ids(&[3, -1]).unwrap_err(),
            PoolError::OutOfRange {
                index: 1,
                block: -1,
                num_blocks: 4
            }
        );
        assert_eq!(p.check_ids(&[3, 0]).unwrap(), vec![3, 0]);
    }

    #[test]
    fn refcount_overflow_is_refused() {
        let mut p = BlockPool::new(2).unwrap();
        p.alloc(2).unwrap();
        p.refcount[1] = MAX_REFCOUNT - 1;
        let before = state(&p);
        assert_eq!(
            p.retain(&[0, 1, 1]).unwrap_err(),
            PoolError::RefcountOverflow { index: 2, block: 1 }
        );
        assert_eq!(state(&p), before);
    }

    #[test]
    fn sizes_are_bounded() {
        assert!(BlockPool::new(0).unwrap().alloc(1).is_err());
        assert_eq!(
            BlockPool::new(MAX_BLOCKS + 1).unwrap_err(),
            PoolError::TooManyBlocks {
                num_blocks: MAX_BLOCKS + 1
            }
        );
    }

    /// Random operations against a plain model: counts and the free stack.
    #[test]
    fn random_operations_match_a_model() {
        let mut next = crate::test_rng(11);
        let mut p = BlockPool::new(10).unwrap();
        let (mut refs, mut free): (Vec<u32>, Vec<u32>) = (vec![0; 10], (0..10).rev().collect());
        for _ in 0..2000 {
            let n = (next() % 4) as usize;
            let blocks: Vec<u32> = (0..n).map(|_| (next() % 10) as u32).collect();
            match next() % 3 {
                0 => {
                    let got = p.alloc(n);
                    if n <= free.len() {
                        let want: Vec<u32> = (0..n).map(|_| free.pop().unwrap()).collect();
                        for b in &want {
                            refs[*b as usize] = 1;
                        }
                        assert_eq!(got.unwrap(), want);
                    } else {
                        assert!(got.is_err());
                    }
                }
                1 => {
                    let ok = blocks.iter().all(|b| refs[*b as usize] > 0);
                    assert_eq!(p.retain(&blocks).is_ok(), ok);
                    if ok {
                        for b in &blocks {
                            refs[*b as usize] += 1;
                        }
                    }
                }
                _ => {
                    let mut r = refs.clone();
                    let mut f = free.clone();
                    let mut ok = true;
                    for b in blocks.iter().rev() {
                        if r[*b as usize] == 0 {
                            ok = false;
                            break;
                        }
                        r[*b as usize] -= 1;
                        if r[*b as usize] == 0 {
                            f.push(*b);
                        }
                    }
                    assert_eq!(p.release(&blocks).is_ok(), ok);
                    if ok {
                        (refs, free) = (r, f);
                    }
                }
            }
            assert_eq!(p.refcounts(), &refs[..]);
            assert_eq!(p.free_blocks().collect::<Vec<_>>(), {
                let mut f = free.clone();
                f.reverse();
                f
            });
        }
    }
}

//! Block allocator of the paged caches: a free list and reference counts.
//!
//! It knows nothing of page layouts; caches ask it for block ids. A block
//! shared by forked sequences has a count above one and is copied before a
//! write (copy-on-write is the cache's job; the pool only counts).

/// A pool of `num_blocks` blocks, each free or held `refcount` times.
#[derive(Debug, Clone)]
pub struct BlockPool {
    refcount: Vec<u32>,
    free: Vec<u32>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        let n = u32::try_from(num_blocks).expect("num_blocks fits in u32");
        // Pop from the end: hand out low block ids first (easier to read in tests and dumps).
        BlockPool {
            refcount: vec![0; num_blocks],
            free: (0..n).rev().collect(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.refcount.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn refcount(&self, block: u32) -> u32 {
        self.refcount[block as usize]
    }

    /// `n` fresh blocks (refcount 1), or `None` and no change if fewer are free.
    pub fn alloc(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let blocks = self.free.split_off(self.free.len() - n);
        for &b in &blocks {
            debug_assert_eq!(self.refcount[b as usize], 0);
            self.refcount[b as usize] = 1;
        }
        Some(blocks.into_iter().rev().collect())
    }

    /// One more holder of a held block.
    pub fn incref(&mut self, block: u32) {
        let c = &mut self.refcount[block as usize];
        assert!(*c > 0, "incref of free block {block}");
        *c += 1;
    }

    /// One holder fewer; the block returns to the free list at zero.
    pub fn decref(&mut self, block: u32) {
        let c = &mut self.refcount[block as usize];
        assert!(*c > 0, "decref of free block {block}");
        *c -= 1;
        if *c == 0 {
            self.free.push(block);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_is_all_or_nothing_and_blocks_come_back() {
        let mut p = BlockPool::new(4);
        let a = p.alloc(3).unwrap();
        assert_eq!(a, vec![0, 1, 2]);
        assert!(p.alloc(2).is_none());
        assert_eq!(p.num_free(), 1);
        p.incref(1);
        p.decref(1);
        assert_eq!(p.refcount(1), 1);
        for b in a {
            p.decref(b);
        }
        assert_eq!(p.num_free(), 4);
        assert_eq!(p.alloc(4).unwrap().len(), 4);
    }

    #[test]
    #[should_panic(expected = "decref of free block")]
    fn decref_of_a_free_block_panics() {
        BlockPool::new(2).decref(0);
    }
}

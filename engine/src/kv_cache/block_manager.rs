//! `BlockManager`: the pool of KV blocks, with reference counts and check-then-act allocation.

use std::collections::VecDeque;

use super::block_table::{BlockId, BlockTable};

/// Whether blocks for a sequence can be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocStatus {
    /// Enough blocks are free now.
    Ok,
    /// Not now, but the pool is large enough once other sequences give blocks back.
    Later,
    /// Never: the request needs more blocks than the whole pool has.
    Never,
}

/// Owns the free list and the reference count of every physical block.
///
/// Invariant: a block is on the free list exactly when its reference count is 0, and the sum of
/// all reference counts equals the number of (table, block) holdings.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    ref_counts: Vec<u32>,
    // A FIFO, so a freed block is reused last: it keeps blocks' contents around longer, which is
    // what prefix caching will want, and spreads writes over the pool.
    free: VecDeque<BlockId>,
}

impl BlockManager {
    /// A pool of `num_blocks` blocks of `block_size` tokens each, all free.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        debug_assert!(block_size > 0);
        Self { block_size, ref_counts: vec![0; num_blocks], free: (0..num_blocks as BlockId).collect() }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks on the free list.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks held by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// Can a new sequence get blocks for its first `num_tokens` tokens? `Never` when even
    /// `max_tokens` (the most the sequence can ever hold) exceeds the whole pool.
    pub fn can_allocate(&self, num_tokens: usize, max_tokens: usize) -> AllocStatus {
        if self.blocks_for(max_tokens) > self.num_blocks() {
            AllocStatus::Never
        } else if self.blocks_for(num_tokens) <= self.num_free() {
            AllocStatus::Ok
        } else {
            AllocStatus::Later
        }
    }

    /// Gives an empty table blocks for `num_tokens` tokens. Call only after `can_allocate` said `Ok`.
    pub fn allocate(&mut self, table: &mut BlockTable, num_tokens: usize) {
        debug_assert!(table.is_empty(), "allocate is for a table that holds nothing");
        self.append_slots(table, num_tokens);
    }

    /// Can `table` grow to hold `num_tokens` tokens in all?
    pub fn can_append(&self, table: &BlockTable, num_tokens: usize) -> bool {
        self.blocks_for(num_tokens).saturating_sub(table.len()) <= self.num_free()
    }

    /// Grows `table` to hold `num_tokens` tokens in all. Call only after `can_append` said yes.
    pub fn append_slots(&mut self, table: &mut BlockTable, num_tokens: usize) {
        let needed = self.blocks_for(num_tokens).saturating_sub(table.len());
        debug_assert!(needed <= self.num_free(), "append_slots without can_append");
        for _ in 0..needed {
            let Some(block) = self.free.pop_front() else {
                break;
            };
            self.ref_counts[block as usize] = 1;
            table.push(block);
        }
    }

    /// A second table over the same blocks (for sequences sharing a prefix); each block's
    /// reference count goes up by one.
    pub fn share(&mut self, table: &BlockTable) -> BlockTable {
        let mut shared = BlockTable::new();
        for &block in table.blocks() {
            debug_assert!(self.ref_counts[block as usize] > 0);
            self.ref_counts[block as usize] += 1;
            shared.push(block);
        }
        shared
    }

    /// Gives back every block of `table`, which ends empty. A block returns to the free list when
    /// its last holder lets go.
    pub fn free(&mut self, table: &mut BlockTable) {
        for block in table.take() {
            let count = &mut self.ref_counts[block as usize];
            debug_assert!(*count > 0, "block {block} freed more often than held");
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.free.push_back(block);
            }
        }
    }

    /// Reference count of a block (for tests and stats).
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts.get(block as usize).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_append_free_round_trip() {
        let mut bm = BlockManager::new(4, 16);
        let mut t = BlockTable::new();
        assert_eq!(bm.can_allocate(17, 40), AllocStatus::Ok);
        bm.allocate(&mut t, 17);
        assert_eq!(t.len(), 2);
        assert_eq!(bm.num_free(), 2);
        assert!(bm.can_append(&t, 32));
        bm.append_slots(&mut t, 32);
        assert_eq!(t.len(), 2, "32 tokens still fit in two blocks");
        assert!(bm.can_append(&t, 64));
        assert!(!bm.can_append(&t, 65));
        bm.append_slots(&mut t, 64);
        assert_eq!(bm.num_free(), 0);
        bm.free(&mut t);
        assert!(t.is_empty());
        assert_eq!(bm.num_free(), 4);
    }

    #[test]
    fn can_allocate_says_later_and_never() {
        let mut bm = BlockManager::new(4, 16);
        let mut t = BlockTable::new();
        bm.allocate(&mut t, 48);
        assert_eq!(bm.can_allocate(32, 32), AllocStatus::Later);
        assert_eq!(bm.can_allocate(16, 16), AllocStatus::Ok);
        assert_eq!(bm.can_allocate(16, 65), AllocStatus::Never);
    }

    #[test]
    fn shared_blocks_return_when_last_holder_frees() {
        let mut bm = BlockManager::new(3, 16);
        let mut a = BlockTable::new();
        bm.allocate(&mut a, 20);
        let mut b = bm.share(&a);
        assert_eq!(bm.ref_count(a.blocks()[0]), 2);
        bm.free(&mut a);
        assert_eq!(bm.num_free(), 1, "b still holds both blocks");
        bm.free(&mut b);
        assert_eq!(bm.num_free(), 3);
        assert_eq!(bm.ref_count(0), 0);
    }

    #[test]
    fn slots_follow_the_table() {
        let mut bm = BlockManager::new(8, 4);
        let mut filler = BlockTable::new();
        bm.allocate(&mut filler, 8); // takes blocks 0 and 1
        let mut t = BlockTable::new();
        bm.allocate(&mut t, 6); // blocks 2 and 3
        assert_eq!(t.slot(0, 4), Some(8));
        assert_eq!(t.slot(5, 4), Some(13));
        assert_eq!(t.slot(8, 4), None);
    }
}

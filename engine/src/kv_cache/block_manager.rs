//! `BlockManager`: the pool of KV blocks, with reference counts, check-then-act allocation and the
//! prefix cache.
//!
//! Prefix caching (after vLLM's automatic prefix caching): once a block is full and its K/V
//! computed, it is registered under a key naming its content exactly: the content id of the
//! block before it (0 for a sequence's first block) and its own tokens. A later sequence whose
//! tokens start the same way finds those blocks by walking the keys from its first block, shares
//! them (their reference counts go up) and computes only the rest. A block whose last holder lets
//! go stays registered while it sits on the free list, so a cached block costs nothing until the
//! pool needs it: allocation takes the least recently freed block and only then forgets its key.
//!
//! Keys hold the tokens themselves, not a hash of them, so two prefixes can never be mistaken for
//! each other. A block's content id changes each time it is handed out for new content, so a key
//! naming an old content id can no longer be reached once that block holds something else.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};

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

/// What a full block holds: the content id of the block before it (0 for a first block) and its
/// tokens.
type PrefixKey = (u64, Vec<u32>);

/// Owns the free list, the reference count of every physical block and the prefix cache.
///
/// Invariants: a block is on the free list exactly when its reference count is 0; the sum of all
/// reference counts equals the number of (table, block) holdings; a block is in the prefix cache
/// exactly when `keys` holds its key, and then `cached` maps that key back to it.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    ref_counts: Vec<u32>,
    // Free blocks by the order they were freed in (least recently freed first): a freed block is
    // reused last, which keeps cached blocks around longest and spreads writes over the pool.
    free: BTreeMap<u64, BlockId>,
    // The key under which each free block sits in `free`.
    free_stamp: Vec<u64>,
    next_stamp: u64,
    // Each block's content id: new each time the block is handed out for new content; a block
    // that turns out to hold a cached block's content takes that block's id.
    content: Vec<u64>,
    next_content: u64,
    keys: Vec<Option<PrefixKey>>,
    cached: HashMap<PrefixKey, BlockId>,
}

impl BlockManager {
    /// A pool of `num_blocks` blocks of `block_size` tokens each, all free, nothing cached.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        debug_assert!(block_size > 0);
        Self {
            block_size,
            ref_counts: vec![0; num_blocks],
            free: (0..num_blocks as BlockId).map(|b| (u64::from(b), b)).collect(),
            free_stamp: (0..num_blocks as u64).collect(),
            next_stamp: num_blocks as u64,
            content: (1..=num_blocks as u64).collect(),
            next_content: num_blocks as u64 + 1,
            keys: vec![None; num_blocks],
            cached: HashMap::new(),
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks on the free list (cached ones included: they are given up when the pool needs them).
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks held by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Blocks in the prefix cache, held or free.
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// Can a new sequence get blocks for its first `num_tokens` tokens? `Never` when even
    /// `max_tokens` (the most the sequence can ever hold) exceeds the whole pool.
    pub fn can_allocate(&self, num_tokens: usize, max_tokens: usize) -> AllocStatus {
        self.can_allocate_cached(&[], num_tokens, max_tokens)
    }

    /// As [`Self::can_allocate`], for a sequence whose first blocks are `hits` from
    /// [`Self::lookup`]: those count as held already, less the free ones they take off the list.
    pub fn can_allocate_cached(&self, hits: &[BlockId], num_tokens: usize, max_tokens: usize) -> AllocStatus {
        let revived = hits.iter().filter(|&&b| self.ref_counts[b as usize] == 0).count();
        if self.blocks_for(max_tokens) > self.num_blocks() {
            AllocStatus::Never
        } else if self.blocks_for(num_tokens).saturating_sub(hits.len()) + revived <= self.num_free() {
            AllocStatus::Ok
        } else {
            AllocStatus::Later
        }
    }

    /// Gives an empty table blocks for `num_tokens` tokens. Call only after `can_allocate` said `Ok`.
    pub fn allocate(&mut self, table: &mut BlockTable, num_tokens: usize) {
        self.allocate_cached(table, &[], num_tokens);
    }

    /// Gives an empty table the cached blocks `hits` (from [`Self::lookup`], in order) and new
    /// blocks up to `num_tokens` tokens. Call only after `can_allocate_cached` said `Ok`.
    pub fn allocate_cached(&mut self, table: &mut BlockTable, hits: &[BlockId], num_tokens: usize) {
        debug_assert!(table.is_empty(), "allocate is for a table that holds nothing");
        for &block in hits {
            debug_assert!(self.keys[block as usize].is_some(), "block {block} is not cached");
            let count = &mut self.ref_counts[block as usize];
            if *count == 0 {
                let removed = self.free.remove(&self.free_stamp[block as usize]);
                debug_assert_eq!(removed, Some(block), "a free block is on the free list");
            }
            *count += 1;
            table.push(block);
        }
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
            let Some((_, block)) = self.free.pop_first() else {
                break;
            };
            // New content: whatever the block held is forgotten.
            if let Some(key) = self.keys[block as usize].take() {
                self.cached.remove(&key);
            }
            self.content[block as usize] = self.next_content;
            self.next_content += 1;
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
    /// its last holder lets go, a sequence's last blocks first: they are the least likely to be
    /// shared, so the pool takes them back before the blocks of the prefix.
    pub fn free(&mut self, table: &mut BlockTable) {
        for block in table.take().into_iter().rev() {
            let count = &mut self.ref_counts[block as usize];
            debug_assert!(*count > 0, "block {block} freed more often than held");
            if *count == 0 {
                continue; // never put a block on the free list twice
            }
            *count -= 1;
            if *count == 0 {
                self.free_stamp[block as usize] = self.next_stamp;
                self.free.insert(self.next_stamp, block);
                self.next_stamp += 1;
            }
        }
    }

    /// The cached blocks holding the longest run of whole blocks at the start of `tokens`, in
    /// order (a partial last block of `tokens` is not looked up).
    pub fn lookup(&self, tokens: &[u32]) -> Vec<BlockId> {
        let mut hits = Vec::new();
        if self.cached.is_empty() {
            return hits;
        }
        let mut key: PrefixKey = (0, Vec::with_capacity(self.block_size));
        for chunk in tokens.chunks_exact(self.block_size) {
            key.1.clear();
            key.1.extend_from_slice(chunk);
            let Some(&block) = self.cached.get(&key) else {
                break;
            };
            hits.push(block);
            key.0 = self.content[block as usize];
        }
        hits
    }

    /// Registers `table`'s full blocks `from..tokens.len() / block_size` in the prefix cache;
    /// `tokens` are the table's first tokens, all with their K/V computed. A block whose content is
    /// cached already (another sequence computed the same prefix at the same time) stays out.
    /// A content id therefore names one token prefix: every block carrying it holds that prefix's
    /// K/V for its last block of tokens.
    pub fn register(&mut self, table: &BlockTable, from: usize, tokens: &[u32]) {
        let blocks = table.blocks();
        let full = (tokens.len() / self.block_size).min(blocks.len());
        for i in from..full {
            let block = blocks[i] as usize;
            if self.keys[block].is_some() {
                continue;
            }
            let parent = if i == 0 { 0 } else { self.content[blocks[i - 1] as usize] };
            let key = (parent, tokens[i * self.block_size..(i + 1) * self.block_size].to_vec());
            match self.cached.entry(key.clone()) {
                Entry::Vacant(e) => {
                    e.insert(blocks[i]);
                    self.keys[block] = Some(key);
                }
                // Same prefix, same K/V: the block takes the cached one's content id, so the
                // blocks after it chain from the cached copy and can join the cache themselves.
                // If nobody holds the cached copy, this block takes its place in the cache: a
                // held block cannot be evicted, so the blocks chained after it stay reachable.
                Entry::Occupied(mut e) => {
                    let twin = *e.get() as usize;
                    self.content[block] = self.content[twin];
                    if self.ref_counts[twin] == 0 {
                        e.insert(blocks[i]);
                        self.keys[block] = self.keys[twin].take();
                    }
                }
            }
        }
    }

    /// Checks the pool's invariants (tests call it after every change): a block is free exactly
    /// when nobody holds it, once, under its own stamp; the cache's keys and blocks map to each
    /// other one to one.
    pub fn check_invariants(&self) {
        for (block, &count) in self.ref_counts.iter().enumerate() {
            let stamp = self.free_stamp[block];
            let listed = self.free.get(&stamp) == Some(&(block as BlockId));
            assert_eq!(count == 0, listed, "block {block}: held {count} times, on the free list: {listed}");
        }
        assert!(self.free.len() <= self.num_blocks());
        assert_eq!(self.keys.iter().flatten().count(), self.cached.len(), "a key without its block or back");
        for (key, &block) in &self.cached {
            assert_eq!(self.keys[block as usize].as_ref(), Some(key), "block {block} is not under its key");
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

    /// A table of `n` fresh blocks whose first `tokens.len()` tokens are computed and registered.
    fn cached_table(bm: &mut BlockManager, tokens: &[u32]) -> BlockTable {
        let mut t = BlockTable::new();
        bm.allocate(&mut t, tokens.len());
        bm.register(&t, 0, tokens);
        t
    }

    #[test]
    fn lookup_finds_the_longest_cached_run_of_whole_blocks() {
        let mut bm = BlockManager::new(8, 2);
        let mut t = cached_table(&mut bm, &[1, 2, 3, 4, 5]);
        assert_eq!(bm.num_cached(), 2, "the partial third block is not cached");
        assert_eq!(bm.lookup(&[1, 2, 3, 4, 9, 9]), t.blocks()[..2]);
        assert_eq!(bm.lookup(&[1, 2, 3]), t.blocks()[..1]);
        assert_eq!(bm.lookup(&[1, 2, 9, 4]), t.blocks()[..1]);
        assert!(bm.lookup(&[3, 4]).is_empty(), "a block is found only after the same blocks");
        assert!(bm.lookup(&[1]).is_empty());
        bm.free(&mut t);
        assert_eq!(bm.num_free(), 8);
        assert_eq!(bm.lookup(&[1, 2, 3, 4]).len(), 2, "free blocks stay cached");
    }

    #[test]
    fn cached_free_blocks_are_taken_back_from_the_free_list() {
        let mut bm = BlockManager::new(4, 2);
        let mut a = cached_table(&mut bm, &[1, 2, 3, 4]);
        bm.free(&mut a);
        let mut filler = BlockTable::new();
        bm.allocate(&mut filler, 2);
        assert!(!a.blocks().contains(&filler.blocks()[0]), "a block never cached is taken first");
        let hits = bm.lookup(&[1, 2, 3, 4, 5]);
        assert_eq!(hits.len(), 2);
        // Two cached free blocks plus two new ones: one more than the three free.
        assert_eq!(bm.can_allocate_cached(&hits, 8, 8), AllocStatus::Later);
        assert_eq!(bm.can_allocate_cached(&hits, 6, 8), AllocStatus::Ok);
        let mut b = BlockTable::new();
        bm.allocate_cached(&mut b, &hits, 6);
        assert_eq!(b.blocks()[..2], hits[..]);
        assert_eq!((bm.num_free(), bm.num_used()), (0, 4));
        assert_eq!(bm.ref_count(hits[0]), 1);
        bm.free(&mut filler);
        bm.free(&mut b);
        assert_eq!(bm.num_free(), 4);
    }

    #[test]
    fn reusing_a_block_forgets_it_and_everything_chained_after_it() {
        let mut bm = BlockManager::new(3, 2);
        let mut a = cached_table(&mut bm, &[1, 2, 3, 4]);
        let first = a.blocks()[0];
        bm.free(&mut a);
        // Blocks go back last first, so the pool gives up the chain's tail before its head.
        let mut b = BlockTable::new();
        bm.allocate(&mut b, 4);
        assert_eq!(bm.lookup(&[1, 2, 3, 4]), vec![first], "the tail went first");
        let mut c = BlockTable::new();
        bm.allocate(&mut c, 2);
        assert_eq!(c.blocks(), [first]);
        assert!(bm.lookup(&[1, 2, 3, 4]).is_empty());
        // The reused block caches new tokens: a key chained from its old content is not reachable.
        bm.register(&c, 0, &[7, 8]);
        assert_eq!(bm.lookup(&[7, 8, 3, 4]), vec![first]);
        bm.free(&mut b);
        bm.free(&mut c);
        bm.check_invariants();
        assert_eq!(bm.num_free(), 3);
    }

    #[test]
    fn a_twin_block_lets_the_blocks_after_it_join_the_cache() {
        let mut bm = BlockManager::new(8, 2);
        let mut a = BlockTable::new();
        let mut b = BlockTable::new();
        bm.allocate(&mut a, 4);
        bm.allocate(&mut b, 6);
        bm.register(&a, 0, &[1, 2]);
        // b computed the same first block at the same time, and a longer prefix.
        bm.register(&b, 0, &[1, 2, 3, 4, 5, 6]);
        assert_eq!(bm.lookup(&[1, 2, 3, 4, 5, 6]), vec![a.blocks()[0], b.blocks()[1], b.blocks()[2]]);
        bm.register(&a, 1, &[1, 2, 3, 4]);
        assert_eq!(bm.num_cached(), 3, "a's second block is b's twin and stays out");
        bm.free(&mut a);
        bm.free(&mut b);
        assert_eq!(bm.num_free(), 8);
    }

    #[test]
    fn a_held_twin_takes_the_place_of_a_free_cached_block() {
        let mut bm = BlockManager::new(4, 2);
        let mut a = cached_table(&mut bm, &[1, 2]);
        let old = a.blocks()[0];
        bm.free(&mut a);
        // b computed the same block while a's copy sat free: b's copy, which nobody can evict
        // while b runs, now stands for that prefix, and b's next block chains from it.
        let mut b = BlockTable::new();
        bm.allocate(&mut b, 4);
        bm.register(&b, 0, &[1, 2, 3, 4]);
        bm.check_invariants();
        assert_eq!(bm.lookup(&[1, 2, 3, 4]), b.blocks());
        // Filling the pool evicts a's free copy; the prefix stays cached.
        let mut c = BlockTable::new();
        bm.allocate(&mut c, 4);
        assert!(c.blocks().contains(&old));
        assert_eq!(bm.lookup(&[1, 2, 3, 4]), b.blocks());
        bm.free(&mut b);
        bm.free(&mut c);
        bm.check_invariants();
    }
}

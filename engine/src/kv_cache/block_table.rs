//! `BlockTable`: one sequence's map from logical blocks to physical blocks of the pool.

/// Index of a physical block in the KV pool (the same index in every layer's pool).
pub type BlockId = u32;

/// A sequence's logical → physical block map. Logical block `i` holds the sequence's tokens
/// `i * block_size .. (i + 1) * block_size`. Blocks are obtained and returned only through the
/// [`super::BlockManager`], which keeps the reference counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
}

impl BlockTable {
    /// An empty table (a sequence that holds no blocks).
    pub fn new() -> Self {
        Self::default()
    }

    /// The physical blocks, in logical order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Number of blocks held.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// True when no block is held.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The slot (`block * block_size + offset`) of the token at `position`, if its block is held.
    pub fn slot(&self, position: usize, block_size: usize) -> Option<u32> {
        let block = *self.blocks.get(position / block_size)?;
        Some(block * block_size as u32 + (position % block_size) as u32)
    }

    pub(super) fn push(&mut self, block: BlockId) {
        self.blocks.push(block);
    }

    pub(super) fn take(&mut self) -> Vec<BlockId> {
        std::mem::take(&mut self.blocks)
    }
}

//! `Sequence`: the scheduler's state for one request.

use std::time::Instant;

use crate::kv_cache::BlockTable;

/// The engine's id for a request, unique for the engine's lifetime.
pub type RequestId = u64;

/// Where a sequence stands in the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceStatus {
    /// In the waiting queue (new, or preempted and waiting to recompute).
    Waiting,
    /// Admitted: holds KV blocks and is scheduled every step until it finishes.
    Running,
}

/// The scheduler's view of one request: its tokens, how many of them have K/V in the cache, and
/// the blocks that hold them.
///
/// There is no prefill phase and no decode phase: each step, a sequence simply catches its
/// computed tokens up to its tokens (`num_tokens() - num_computed_tokens`, within the step's token
/// budget). A fresh prompt catches up many tokens (in chunks if the budget is small), a decoding
/// sequence one, a preempted sequence all of them again.
#[derive(Debug)]
pub struct Sequence {
    /// The engine's id.
    pub id: RequestId,
    /// Lower runs first.
    pub priority: i32,
    /// When the request was submitted (time to first token and queue time count from here).
    pub arrival: Instant,
    /// Submission order: breaks ties between equal priorities, first come first served.
    pub arrival_order: u64,
    /// Waiting or running.
    pub status: SequenceStatus,
    /// Prompt tokens followed by the tokens generated so far.
    pub token_ids: Vec<u32>,
    /// How many of `token_ids` are the prompt.
    pub num_prompt_tokens: usize,
    /// How many leading tokens have their K/V in the cache.
    pub num_computed_tokens: usize,
    /// Prompt tokens whose K/V came from the prefix cache at the sequence's first admission.
    pub num_cached_tokens: usize,
    /// Leading blocks of `block_table` that are in the prefix cache already or were offered to it.
    pub num_registered_blocks: usize,
    /// Upper bound on generated tokens (`max_tokens`): the most blocks this sequence can need.
    pub max_output_tokens: usize,
    /// The sequence's KV blocks.
    pub block_table: BlockTable,
    /// How often this sequence was preempted.
    pub num_preemptions: u32,
}

impl Sequence {
    /// A waiting sequence for `prompt`.
    pub fn new(
        id: RequestId,
        prompt: Vec<u32>,
        max_output_tokens: usize,
        priority: i32,
        arrival: Instant,
        arrival_order: u64,
    ) -> Self {
        Self {
            id,
            priority,
            arrival,
            arrival_order,
            status: SequenceStatus::Waiting,
            num_prompt_tokens: prompt.len(),
            token_ids: prompt,
            num_computed_tokens: 0,
            num_cached_tokens: 0,
            num_registered_blocks: 0,
            max_output_tokens,
            block_table: BlockTable::new(),
            num_preemptions: 0,
        }
    }

    /// Prompt plus generated tokens.
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Tokens generated so far.
    pub fn num_output_tokens(&self) -> usize {
        self.token_ids.len() - self.num_prompt_tokens
    }

    /// The prompt tokens.
    pub fn prompt_tokens(&self) -> &[u32] {
        &self.token_ids[..self.num_prompt_tokens]
    }

    /// The generated tokens.
    pub fn output_tokens(&self) -> &[u32] {
        &self.token_ids[self.num_prompt_tokens..]
    }

    /// Tokens still to run through the model before the next token can be sampled.
    pub fn num_uncomputed_tokens(&self) -> usize {
        self.num_tokens() - self.num_computed_tokens
    }

    /// The most tokens this sequence can ever hold in the cache. The last sampled token never
    /// needs a slot, hence the `- 1`.
    pub fn max_len(&self) -> usize {
        (self.num_prompt_tokens + self.max_output_tokens).saturating_sub(1).max(self.num_prompt_tokens)
    }

    /// The scheduling key: lower priority value first, then earlier arrival.
    pub fn order_key(&self) -> (i32, u64) {
        (self.priority, self.arrival_order)
    }
}

//! The scheduler: a pure state machine that decides, given the time, which tokens run next.
//!
//! The rule (after vLLM v1): there is no prefill phase and no decode phase. Every step has a token
//! budget; each running sequence catches its computed tokens up to its tokens, decodes first (one
//! token each, so nobody's next token waits behind a long prompt), then unfinished prompts in
//! chunks, then newly admitted requests in (priority, arrival) order. When a running sequence needs
//! a KV block and none is free, the lowest-priority, latest-arrived running sequence is preempted:
//! its blocks go back to the pool and it returns to the waiting queue to recompute later.
//!
//! With prefix caching on, an admitted sequence first takes the cached blocks that hold the start
//! of its tokens (see `kv_cache::BlockManager`) and computes only the rest; each step's newly full
//! blocks join the cache when the step is recorded (`update`).
//!
//! Admission of new prompts is gated by a window: when nothing is running, a batch starts once
//! `max_batch_size` requests wait or the oldest has waited `batch_timeout`. While anything runs,
//! new requests join at the next step (continuous batching).
//!
//! Time is passed in (`schedule(now)`); threads and channels live in the engine loop only.

mod batch;
mod queue;

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub use batch::{Batch, ScheduledSeq};
pub use queue::WaitingQueue;

use crate::kv_cache::{AllocStatus, BlockManager};
use crate::sequence::{RequestId, Sequence, SequenceStatus};

/// The scheduler's knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Admission window, size half: start a batch when this many requests wait.
    pub max_batch_size: usize,
    /// Admission window, time half: or when the oldest waiting request has waited this long.
    pub batch_timeout: Duration,
    /// Tokens per step (decodes + prompt chunks): bounds a step's time.
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_num_seqs: usize,
    /// Bound of the waiting queue: past it, submissions are refused (back-pressure).
    pub max_waiting: usize,
    /// Reuse the K/V of whole blocks whose tokens a new sequence starts with (a shared system
    /// prompt, a conversation's earlier turns, a request sent again): they are not computed twice.
    pub prefix_caching: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            batch_timeout: Duration::from_millis(5),
            max_batch_tokens: 512,
            max_num_seqs: 128,
            max_waiting: 1024,
            prefix_caching: true,
        }
    }
}

/// Why a sequence could not be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddError {
    /// The waiting queue is at `max_waiting`.
    QueueFull,
    /// Prompt plus `max_tokens` needs more KV blocks than the whole pool holds.
    TooLong,
}

/// Counts since start, for `EngineStats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerCounters {
    /// Sequences preempted (each preemption counts once).
    pub preemptions: u64,
    /// Tokens of admitted sequences looked up in the prefix cache.
    pub prefix_cache_queries: u64,
    /// Of those, tokens found there (their K/V was not computed again).
    pub prefix_cache_hits: u64,
}

/// Owns every unfinished sequence, the waiting queue, the running set and the block pool.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    sequences: HashMap<RequestId, Sequence>,
    waiting: WaitingQueue,
    // Running sequences, kept sorted by (priority, arrival order).
    running: Vec<RequestId>,
    counters: SchedulerCounters,
}

impl Scheduler {
    /// A scheduler over a pool of `num_blocks` KV blocks of `block_size` tokens.
    pub fn new(config: SchedulerConfig, num_blocks: usize, block_size: usize) -> Self {
        Self {
            config,
            blocks: BlockManager::new(num_blocks, block_size),
            sequences: HashMap::new(),
            waiting: WaitingQueue::new(),
            running: Vec::new(),
            counters: SchedulerCounters::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The block pool (read-only).
    pub fn block_manager(&self) -> &BlockManager {
        &self.blocks
    }

    /// A sequence by id, waiting or running.
    pub fn sequence(&self, id: RequestId) -> Option<&Sequence> {
        self.sequences.get(&id)
    }

    /// Number of waiting sequences.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Number of running sequences.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// True when nothing waits and nothing runs.
    pub fn is_idle(&self) -> bool {
        self.sequences.is_empty()
    }

    /// Counters since start.
    pub fn counters(&self) -> SchedulerCounters {
        self.counters
    }

    /// Checks whether a sequence could be added, without adding it.
    pub fn can_add(&self, seq: &Sequence) -> Result<(), AddError> {
        if self.blocks.can_allocate(0, seq.max_len()) == AllocStatus::Never {
            return Err(AddError::TooLong);
        }
        if self.waiting.len() >= self.config.max_waiting {
            return Err(AddError::QueueFull);
        }
        Ok(())
    }

    /// Puts a new sequence in the waiting queue.
    pub fn add(&mut self, mut seq: Sequence) -> Result<(), AddError> {
        self.can_add(&seq)?;
        seq.status = SequenceStatus::Waiting;
        self.waiting.push(seq.id, seq.order_key());
        self.sequences.insert(seq.id, seq);
        Ok(())
    }

    /// Decides the next step. Pure: the same state and `now` give the same batch.
    pub fn schedule(&mut self, now: Instant) -> Batch {
        let mut batch = Batch::default();
        let mut budget = self.config.max_batch_tokens;

        // Decodes first, then the running sequences that are still mid-prompt.
        let (decodes, chunks): (Vec<RequestId>, Vec<RequestId>) =
            self.running.iter().partition(|id| self.sequences.get(id).is_some_and(|s| s.num_uncomputed_tokens() <= 1));
        for id in decodes.into_iter().chain(chunks) {
            if budget == 0 {
                break;
            }
            if !self.running.contains(&id) {
                continue; // preempted earlier in this step
            }
            if let Some(scheduled) = self.schedule_running(id, budget, &mut batch) {
                budget -= scheduled.len;
                batch.num_tokens += scheduled.len;
                batch.seqs.push(scheduled);
            }
        }

        // Admission. After a preemption the pool is short, so nobody new comes in this step.
        if batch.preempted.is_empty() {
            if self.running.is_empty() && !self.window_open(now) {
                batch.wake_at = self.window_opens_at();
                return batch;
            }
            self.admit(&mut budget, &mut batch);
        }
        batch
    }

    /// Records a finished step: every scheduled sequence has computed its tokens, and the ones that
    /// sampled get their new token. `sampled` pairs a sequence with its new token.
    pub fn update(&mut self, batch: &Batch, sampled: &[(RequestId, u32)]) {
        for s in &batch.seqs {
            if let Some(seq) = self.sequences.get_mut(&s.id) {
                seq.num_computed_tokens = s.start + s.len;
                let full = seq.num_computed_tokens / self.blocks.block_size();
                if self.config.prefix_caching && full > seq.num_registered_blocks {
                    let computed = &seq.token_ids[..seq.num_computed_tokens];
                    self.blocks.register(&seq.block_table, seq.num_registered_blocks, computed);
                    seq.num_registered_blocks = full;
                }
            }
        }
        for &(id, token) in sampled {
            if let Some(seq) = self.sequences.get_mut(&id) {
                seq.token_ids.push(token);
            }
        }
    }

    /// Removes a finished, failed or aborted sequence wherever it is and frees its blocks.
    /// Returns it, or `None` if the id is unknown (already gone).
    pub fn remove(&mut self, id: RequestId) -> Option<Sequence> {
        let mut seq = self.sequences.remove(&id)?;
        match seq.status {
            SequenceStatus::Waiting => {
                self.waiting.remove(id);
            }
            SequenceStatus::Running => self.running.retain(|&r| r != id),
        }
        self.blocks.free(&mut seq.block_table);
        Some(seq)
    }

    /// Ids of every sequence, waiting or running.
    pub fn ids(&self) -> Vec<RequestId> {
        self.sequences.keys().copied().collect()
    }

    fn window_open(&self, now: Instant) -> bool {
        !self.waiting.is_empty()
            && (self.waiting.len() >= self.config.max_batch_size || self.window_opens_at().is_some_and(|at| now >= at))
    }

    fn window_opens_at(&self) -> Option<Instant> {
        let oldest = self.waiting.oldest(|id| self.sequences.get(&id).map(|s| s.arrival))?;
        Some(oldest + self.config.batch_timeout)
    }

    /// Gives a running sequence its tokens for this step, preempting others (or itself) if the
    /// pool is short. `None` if it was preempted.
    fn schedule_running(&mut self, id: RequestId, budget: usize, batch: &mut Batch) -> Option<ScheduledSeq> {
        loop {
            let seq = self.sequences.get(&id)?;
            let len = seq.num_uncomputed_tokens().min(budget);
            let needed = seq.num_computed_tokens + len;
            if self.blocks.can_append(&seq.block_table, needed) {
                let seq = self.sequences.get_mut(&id)?;
                self.blocks.append_slots(&mut seq.block_table, needed);
                let start = seq.num_computed_tokens;
                return Some(ScheduledSeq { id, start, len, sample: start + len == seq.num_tokens() });
            }
            // Victim: the lowest-priority, latest-arrived running sequence not yet given its share
            // of this step. `running` is sorted, so it is the last one not in the batch.
            let victim =
                self.running.iter().rev().copied().find(|v| !batch.seqs.iter().any(|s| s.id == *v)).unwrap_or(id);
            self.preempt(victim, batch);
            if victim == id {
                return None;
            }
        }
    }

    fn preempt(&mut self, id: RequestId, batch: &mut Batch) {
        let Some(seq) = self.sequences.get_mut(&id) else {
            return;
        };
        self.blocks.free(&mut seq.block_table);
        seq.num_computed_tokens = 0;
        seq.num_registered_blocks = 0;
        seq.num_preemptions += 1;
        seq.status = SequenceStatus::Waiting;
        self.waiting.push(id, seq.order_key());
        self.running.retain(|&r| r != id);
        self.counters.preemptions += 1;
        batch.preempted.push(id);
    }

    /// Whether a running sequence shares with `tokens` (whole blocks a waiting sequence could
    /// reuse, of which the first `cached` tokens are in the cache) whole blocks past `cached` that it
    /// has not computed yet: once it has, they are in the cache. (One it has computed is in the
    /// cache already, so this never waits on a sequence that will not register anything.)
    fn computing_shared_blocks(&self, tokens: &[u32], cached: usize) -> bool {
        let bs = self.blocks.block_size();
        self.running.iter().filter_map(|id| self.sequences.get(id)).any(|p| {
            if p.num_computed_tokens >= tokens.len() {
                return false;
            }
            let common = tokens.iter().zip(&p.token_ids).take_while(|(a, b)| a == b).count();
            let shared = common / bs * bs;
            shared > cached && p.num_computed_tokens < shared
        })
    }

    fn admit(&mut self, budget: &mut usize, batch: &mut Batch) {
        while *budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(id) = self.waiting.peek() else {
                break;
            };
            let Some(seq) = self.sequences.get(&id) else {
                self.waiting.pop();
                continue;
            };
            // Whole blocks of its tokens already in the cache, short of the last token: that one
            // always runs, as its logits give the next token.
            let bs = self.blocks.block_size();
            let reusable = &seq.token_ids[..seq.num_tokens().saturating_sub(1) / bs * bs];
            let hits = if self.config.prefix_caching { self.blocks.lookup(reusable) } else { Vec::new() };
            let cached = hits.len() * bs;
            // Whole blocks it shares with a running sequence that is still computing them: it waits
            // for them (holding the queue, as any admission that must wait does) rather than
            // computing them a second time in the same steps. Twins admitted together (`n`
            // choices, a burst of requests with one system prompt) compute their prefix once.
            if self.config.prefix_caching && self.computing_shared_blocks(reusable, cached) {
                break;
            }
            let Some(seq) = self.sequences.get_mut(&id) else {
                self.waiting.pop();
                continue;
            };
            let len = (seq.num_tokens() - cached).min(*budget);
            match self.blocks.can_allocate_cached(&hits, cached + len, seq.max_len()) {
                AllocStatus::Ok => {}
                // Strict priority: nobody overtakes the head of the queue.
                AllocStatus::Later => break,
                AllocStatus::Never => {
                    self.waiting.pop();
                    batch.rejected.push(id);
                    continue;
                }
            }
            self.waiting.pop();
            self.blocks.allocate_cached(&mut seq.block_table, &hits, cached + len);
            seq.num_computed_tokens = cached;
            seq.num_registered_blocks = hits.len();
            if seq.num_preemptions == 0 {
                seq.num_cached_tokens = cached.min(seq.num_prompt_tokens);
            }
            if self.config.prefix_caching {
                self.counters.prefix_cache_queries += seq.num_tokens() as u64;
                self.counters.prefix_cache_hits += cached as u64;
            }
            seq.status = SequenceStatus::Running;
            let start = seq.num_computed_tokens;
            let scheduled = ScheduledSeq { id, start, len, sample: start + len == seq.num_tokens() };
            let key = seq.order_key();
            let at = self.running.partition_point(|r| self.sequences.get(r).is_some_and(|s| s.order_key() < key));
            self.running.insert(at, id);
            *budget -= len;
            batch.num_tokens += len;
            batch.seqs.push(scheduled);
        }
    }
}

#[cfg(test)]
mod tests;

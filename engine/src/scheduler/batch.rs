//! `Batch`: what the scheduler decided for one step.

use std::time::Instant;

use crate::sequence::RequestId;

/// One sequence's share of a step: run its tokens `start .. start + len` through the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    /// The sequence.
    pub id: RequestId,
    /// Its `num_computed_tokens` when scheduled: the position of the first token run this step.
    pub start: usize,
    /// Tokens run this step (1 for a decode, up to the budget for a prompt chunk).
    pub len: usize,
    /// True when this step reaches the sequence's last token, so a new token is sampled from the
    /// logits of the last row. False for a prompt chunk that is not the last.
    pub sample: bool,
}

/// The scheduler's output for one step.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    /// Sequences to run, in the order their rows are packed: decodes first, then prompt chunks.
    pub seqs: Vec<ScheduledSeq>,
    /// Total tokens in the step (the packed matrix's rows).
    pub num_tokens: usize,
    /// Sequences preempted while building this step (they went back to the waiting queue).
    pub preempted: Vec<RequestId>,
    /// Sequences that can never fit in the KV pool; the engine fails them.
    pub rejected: Vec<RequestId>,
    /// When nothing is scheduled but requests wait for the admission window: when it opens.
    pub wake_at: Option<Instant>,
}

impl Batch {
    /// True when there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

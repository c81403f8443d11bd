//! `EngineStats`: a snapshot of the engine's state, updated by the engine thread every step.

use std::time::Duration;

use crate::breaker::BreakerState;
use crate::model::GraphCounts;

/// What the engine is doing, as of its last step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Requests in the waiting queue (new or preempted).
    pub waiting: usize,
    /// Requests in the running batch.
    pub running: usize,
    /// KV blocks held by sequences.
    pub kv_blocks_used: usize,
    /// KV blocks in the pool.
    pub kv_blocks_total: usize,
    /// KV blocks in the prefix cache, held or free (free ones are given up when the pool needs them).
    pub kv_blocks_cached: usize,
    /// Preemptions since start.
    pub preemptions: u64,
    /// Tokens of admitted sequences looked up in the prefix cache since start.
    pub prefix_cache_queries: u64,
    /// Of those, tokens found there: their K/V was reused, not computed.
    pub prefix_cache_hits: u64,
    /// Model steps run since start.
    pub steps: u64,
    /// Model steps that failed since start.
    pub failed_steps: u64,
    /// Prompt tokens run through the model since start (recomputation included).
    pub prompt_tokens: u64,
    /// Tokens generated since start.
    pub generated_tokens: u64,
    /// Of those, tokens chosen by an argmax on the device (only their ids were copied back; see
    /// `DeviceSampling`).
    pub device_argmax_tokens: u64,
    /// Of those, tokens taken from a row's head on the device-sampling path (only its most likely
    /// tokens and two sums were copied back; see `DeviceSampling`).
    pub head_tokens: u64,
    /// Rows of such steps copied back whole: the head did not settle the choice, or the request's
    /// parameters (logit bias, penalties) need the whole row.
    pub fetched_rows: u64,
    /// The decode-graph path (`EngineConfig::cuda_graphs`): buckets captured, steps replayed, padded
    /// steps run eagerly. All zeros when it is off.
    pub decode_graphs: GraphCounts,
    /// Where the engine thread's time went over the steps it ran (see [`StepTimes`]).
    pub step_times: StepTimes,
    /// The circuit breaker around model execution (published as soon as it changes).
    pub breaker: BreakerState,
    /// False once the engine thread has stopped.
    pub alive: bool,
}

/// The engine thread's time over the loop iterations that ran a step, since start, cut into its
/// phases. On a GPU, `model` holds the device's work (the thread waits for it when it reads the
/// step's outputs back) and everything else is host time during which the device idles: at small
/// batches that share bounds the step rate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepTimes {
    /// Iterations that ran a step.
    pub steps: u64,
    /// Whole iterations up to publishing their stats: commands taken in, scheduling, the step.
    pub total: Duration,
    /// Building the batch: `Scheduler::schedule` and admissions.
    pub schedule: Duration,
    /// The model step: inputs laid out and uploaded, the forward (or a graph replay), and its
    /// outputs read back.
    pub model: Duration,
    /// Choosing tokens from what the step read back (grammar masks, host sampling).
    pub sample: Duration,
    /// Handing tokens out: sequences advanced, detokenized, stop checks, sent to their streams.
    pub emit: Duration,
}

impl StepTimes {
    /// Adds `other`'s steps and times to these.
    pub(crate) fn add(&mut self, other: &StepTimes) {
        self.steps += other.steps;
        self.total += other.total;
        self.schedule += other.schedule;
        self.model += other.model;
        self.sample += other.sample;
        self.emit += other.emit;
    }

    /// The mean of a phase per step, in microseconds (0 before any step).
    pub fn mean_us(&self, phase: Duration) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            phase.as_secs_f64() * 1e6 / self.steps as f64
        }
    }
}

//! The engine loop, on its own OS thread: take commands, schedule, run the model, sample, and fan
//! the tokens out to each request's stream. The only place where threads and channels meet the
//! scheduler.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use tokio::sync::mpsc::UnboundedSender;

use crate::engine::{Command, Shared};
use crate::error::EngineError;
use crate::model::ModelRunner;
use crate::sampling::{SampleContext, Sampler, SamplingParams};
use crate::scheduler::{AddError, Batch, Scheduler};
use crate::sequence::{RequestId, Sequence};
use crate::stop::StopStrings;
use crate::stream::{Finish, FinishReason, StreamEvent, Timings, TokenEvent, Usage};
use crate::tokenizer::{IncrementalDetokenizer, Tokenizer};

/// Everything about a request that the scheduler does not need: how to sample it, how to turn
/// its tokens into text, and where to send them.
#[derive(Debug)]
pub(crate) struct RequestState {
    params: SamplingParams,
    sampler: Sampler,
    detokenizer: IncrementalDetokenizer,
    stop: StopStrings,
    tx: UnboundedSender<StreamEvent>,
    admitted_at: Option<Instant>,
    first_token_at: Option<Instant>,
}

impl RequestState {
    pub(crate) fn new(
        params: SamplingParams,
        fallback_seed: u64,
        tokenizer: &Tokenizer,
        prompt: &[u32],
        tx: UnboundedSender<StreamEvent>,
    ) -> Self {
        Self {
            sampler: Sampler::new(&params, fallback_seed),
            detokenizer: IncrementalDetokenizer::with_prompt_tail(tokenizer, prompt),
            stop: StopStrings::new(&params.stop),
            params,
            tx,
            admitted_at: None,
            first_token_at: None,
        }
    }
}

/// The engine thread's state.
pub(crate) struct Worker {
    runner: ModelRunner,
    scheduler: Scheduler,
    tokenizer: Arc<Tokenizer>,
    shared: Arc<Shared>,
    commands: Receiver<Command>,
    requests: HashMap<RequestId, RequestState>,
    // Token ids that end generation unless `ignore_eos`.
    eos: Vec<u32>,
    shutting_down: bool,
}

impl Worker {
    pub(crate) fn new(
        runner: ModelRunner,
        scheduler: Scheduler,
        tokenizer: Arc<Tokenizer>,
        shared: Arc<Shared>,
        commands: Receiver<Command>,
    ) -> Self {
        let eos = tokenizer.eos_token_ids().to_vec();
        Self { runner, scheduler, tokenizer, shared, commands, requests: HashMap::new(), eos, shutting_down: false }
    }

    /// The loop. Sleeps on the command channel when there is nothing to do (no busy-wait), and
    /// until the admission window opens when requests wait for it.
    pub(crate) fn run(mut self) {
        // Marks the engine dead however this thread ends, a panic included, so health checks see it.
        let _alive = AliveGuard(self.shared.clone());
        self.publish_stats(true);
        let mut wake_at: Option<Instant> = None;
        while !self.shutting_down {
            // Block only when there is nothing to run.
            let idle = self.scheduler.num_running() == 0;
            let first = if idle {
                match wake_at {
                    None if self.scheduler.is_idle() => self.commands.recv().ok(),
                    Some(at) => match self.commands.recv_deadline(at) {
                        Ok(c) => Some(c),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => Some(Command::Shutdown),
                    },
                    // Requests wait but the window gave no time: should not happen; poll, never spin.
                    None => match self.commands.recv_timeout(std::time::Duration::from_millis(10)) {
                        Ok(c) => Some(c),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => Some(Command::Shutdown),
                    },
                }
            } else {
                None
            };
            if let Some(c) = first {
                self.handle(c);
            }
            self.drain_commands();
            if self.shutting_down {
                break;
            }
            let batch = self.scheduler.schedule(Instant::now());
            self.note_admissions(&batch);
            for id in batch.rejected.clone() {
                self.fail(id, EngineError::InvalidRequest("the request can never fit in the KV cache".into()));
            }
            wake_at = batch.wake_at;
            if !batch.is_empty() {
                self.step(&batch);
            }
            self.publish_stats(true);
        }
        for id in self.scheduler.ids() {
            self.fail(id, EngineError::EngineStopped);
        }
        self.publish_stats(false);
    }

    fn drain_commands(&mut self) {
        loop {
            match self.commands.try_recv() {
                Ok(c) => self.handle(c),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.shutting_down = true;
                    break;
                }
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Submit(sub) => {
                let id = sub.seq.id;
                let state = sub.state;
                match self.scheduler.add(sub.seq) {
                    Ok(()) => {
                        self.requests.insert(id, state);
                    }
                    Err(e) => {
                        self.shared.queued.fetch_sub(1, Ordering::AcqRel);
                        let err = match e {
                            AddError::QueueFull => EngineError::QueueFull(self.scheduler.config().max_waiting),
                            AddError::TooLong => EngineError::InvalidRequest(
                                "the prompt plus `max_tokens` does not fit in the KV cache".into(),
                            ),
                        };
                        let _ = state.tx.send(StreamEvent::Error(err));
                    }
                }
            }
            Command::Abort(id) => self.abort(id),
            Command::Shutdown => self.shutting_down = true,
        }
    }

    /// Removes a request wherever it is; its blocks go back to the pool.
    fn abort(&mut self, id: RequestId) {
        if let Some(seq) = self.scheduler.remove(id) {
            if seq.num_computed_tokens == 0 && self.requests.get(&id).is_some_and(|r| r.admitted_at.is_none()) {
                self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.requests.remove(&id);
    }

    fn fail(&mut self, id: RequestId, error: EngineError) {
        if let Some(state) = self.requests.get(&id) {
            let _ = state.tx.send(StreamEvent::Error(error));
        }
        self.abort(id);
    }

    fn note_admissions(&mut self, batch: &Batch) {
        let now = Instant::now();
        for s in &batch.seqs {
            if let Some(state) = self.requests.get_mut(&s.id) {
                if state.admitted_at.is_none() {
                    state.admitted_at = Some(now);
                    self.shared.queued.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }

    /// Runs one model step and hands out its tokens.
    fn step(&mut self, batch: &Batch) {
        let logits = match self.runner.execute(batch, &self.scheduler) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "model step failed");
                if let Ok(mut s) = self.shared.stats.lock() {
                    s.failed_steps += 1;
                }
                for s in &batch.seqs {
                    self.fail(s.id, EngineError::Model("the model step failed; see the server log".into()));
                }
                return;
            }
        };
        let mut sampled = Vec::with_capacity(logits.rows.len());
        let mut rows = logits.rows.iter();
        for s in batch.seqs.iter().filter(|s| s.sample) {
            let (Some(row), Some(seq), Some(state)) =
                (rows.next(), self.scheduler.sequence(s.id), self.requests.get_mut(&s.id))
            else {
                continue;
            };
            let suppress: &[u32] = if seq.num_output_tokens() < state.params.min_tokens { &self.eos } else { &[] };
            let ctx =
                SampleContext { prompt_tokens: seq.prompt_tokens(), output_tokens: seq.output_tokens(), suppress };
            let choice = state.sampler.sample(row, &state.params, &ctx);
            sampled.push((s.id, choice));
        }
        let pairs: Vec<(RequestId, u32)> = sampled.iter().map(|(id, c)| (*id, c.token)).collect();
        self.scheduler.update(batch, &pairs);
        if let Ok(mut s) = self.shared.stats.lock() {
            s.steps += 1;
            s.generated_tokens += pairs.len() as u64;
            s.prompt_tokens += (batch.num_tokens - batch.seqs.iter().filter(|s| s.len == 1 && s.sample).count()) as u64;
        }
        for (id, choice) in sampled {
            self.emit(id, choice.token, choice.logprob);
        }
    }

    /// Turns a new token into a stream event, and finishes the request when it should stop.
    fn emit(&mut self, id: RequestId, token: u32, logprob: Option<crate::sampling::TokenLogprob>) {
        let (Some(seq), Some(state)) = (self.scheduler.sequence(id), self.requests.get_mut(&id)) else {
            return;
        };
        let now = Instant::now();
        state.first_token_at.get_or_insert(now);
        let params = &state.params;
        let is_eos = !params.ignore_eos && self.eos.contains(&token);
        let is_stop_token = params.stop_token_ids.contains(&token);
        let mut text = String::new();
        let mut finish = None;
        let mut stop_string = None;
        if is_eos || is_stop_token {
            finish = Some(FinishReason::Stop);
        } else {
            match state.detokenizer.push(&self.tokenizer, token) {
                Ok(delta) => {
                    let out = state.stop.push(&delta);
                    text = out.text;
                    if let Some(matched) = out.stopped {
                        finish = Some(FinishReason::Stop);
                        stop_string = Some(matched);
                    }
                }
                Err(e) => tracing::warn!(error = %e, token, "cannot detokenize"),
            }
        }
        if finish.is_none() && seq.num_output_tokens() >= params.max_tokens {
            finish = Some(FinishReason::Length);
        }
        if finish.is_some() && stop_string.is_none() {
            // Release what was held back: an unfinished character, a partial stop string.
            if let Ok(rest) = state.detokenizer.flush(&self.tokenizer) {
                let out = state.stop.push(&rest);
                text.push_str(&out.text);
            }
            text.push_str(&state.stop.flush());
        }
        let alive = state.tx.send(StreamEvent::Token(TokenEvent { token_id: token, text, logprob })).is_ok();
        if let Some(reason) = finish {
            let finish = Finish { reason, stop_string, usage: usage(seq), timings: timings(seq, state, now) };
            // A caller gone by now misses nothing it could use.
            let _ = state.tx.send(StreamEvent::Finished(finish));
            self.requests.remove(&id);
            self.scheduler.remove(id);
        } else if !alive {
            // The caller dropped its stream between steps and the abort is still in the channel.
            self.abort(id);
        }
    }

    fn publish_stats(&self, alive: bool) {
        if let Ok(mut s) = self.shared.stats.lock() {
            let bm = self.scheduler.block_manager();
            s.waiting = self.scheduler.num_waiting();
            s.running = self.scheduler.num_running();
            s.kv_blocks_used = bm.num_used();
            s.kv_blocks_total = bm.num_blocks();
            s.preemptions = self.scheduler.counters().preemptions;
            s.alive = alive;
        }
    }
}

/// Sets `EngineStats::alive` to false when dropped.
struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.stats.lock() {
            s.alive = false;
        }
    }
}

fn usage(seq: &Sequence) -> Usage {
    Usage { prompt_tokens: seq.num_prompt_tokens, completion_tokens: seq.num_output_tokens() }
}

fn timings(seq: &Sequence, state: &RequestState, now: Instant) -> Timings {
    let since = |t: Option<Instant>| t.map(|t| t.saturating_duration_since(seq.arrival)).unwrap_or_default();
    Timings {
        queue: since(state.admitted_at),
        time_to_first_token: since(state.first_token_at),
        total: now.saturating_duration_since(seq.arrival),
        preemptions: seq.num_preemptions,
    }
}

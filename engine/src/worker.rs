//! The engine loop, on its own OS thread: take commands, schedule, run the model, sample, and fan
//! the tokens out to each request's stream. The only place where threads and channels meet the
//! scheduler and the circuit breaker, and where the engine's metrics are recorded.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use tokio::sync::mpsc::UnboundedSender;

use crate::breaker::{BreakerConfig, BreakerState, CircuitBreaker};
use crate::engine::{Command, Shared};
use crate::error::EngineError;
use crate::metrics::{self, StepRecord};
use crate::model::{ModelRunner, StepLogits};
use crate::sampling::{Sampler, SamplingParams};
use crate::scheduler::{AddError, Batch, Scheduler};
use crate::sequence::RequestId;
use crate::stats::StepTimes;
use crate::stop::StopStrings;
use crate::stream::StreamEvent;
use crate::structured::Constraint;
use crate::tokenizer::{IncrementalDetokenizer, Tokenizer};

mod emit;
mod sampling;

use sampling::SampledStep;

/// Everything about a request that the scheduler does not need: how to sample it, how to turn
/// its tokens into text, and where to send them.
#[derive(Debug)]
pub(crate) struct RequestState {
    params: SamplingParams,
    sampler: Sampler,
    detokenizer: IncrementalDetokenizer,
    stop: StopStrings,
    // With a JSON `response_format`: where the output stands in its grammar.
    grammar: Option<Constraint>,
    tx: UnboundedSender<StreamEvent>,
    admitted_at: Option<Instant>,
    first_token_at: Option<Instant>,
    // For the inter-token latency.
    last_token_at: Option<Instant>,
}

impl RequestState {
    pub(crate) fn new(
        params: SamplingParams,
        fallback_seed: u64,
        tokenizer: &Tokenizer,
        prompt: &[u32],
        grammar: Option<Constraint>,
        tx: UnboundedSender<StreamEvent>,
    ) -> Self {
        Self {
            grammar,
            sampler: Sampler::new(&params, fallback_seed),
            detokenizer: IncrementalDetokenizer::with_prompt_tail(tokenizer, prompt),
            stop: StopStrings::new(&params.stop),
            params,
            tx,
            admitted_at: None,
            first_token_at: None,
            last_token_at: None,
        }
    }
}

/// The engine thread's state.
pub(crate) struct Worker {
    runner: ModelRunner,
    scheduler: Scheduler,
    breaker: CircuitBreaker,
    tokenizer: Arc<Tokenizer>,
    shared: Arc<Shared>,
    commands: Receiver<Command>,
    requests: HashMap<RequestId, RequestState>,
    // Token ids that end generation unless `ignore_eos`.
    eos: Vec<u32>,
    shutting_down: bool,
    // Where the time of the iterations that ran a step went (published with the stats), and the
    // phases of the step under way.
    times: StepTimes,
    step_times: StepTimes,
}

impl Worker {
    pub(crate) fn new(
        runner: ModelRunner,
        scheduler: Scheduler,
        breaker: BreakerConfig,
        tokenizer: Arc<Tokenizer>,
        shared: Arc<Shared>,
        commands: Receiver<Command>,
    ) -> Self {
        let eos = tokenizer.eos_token_ids().to_vec();
        Self {
            runner,
            scheduler,
            breaker: CircuitBreaker::new(breaker),
            tokenizer,
            shared,
            commands,
            requests: HashMap::new(),
            times: StepTimes::default(),
            step_times: StepTimes::default(),
            eos,
            shutting_down: false,
        }
    }

    /// Captures the decode graphs of every batch size before the first request (see
    /// `ModelRunner::capture_decode_graphs`); without them, or off CUDA, does nothing. A bucket
    /// that fails is logged and handled there; then the device must still work: a kernel that
    /// faulted leaves it unusable, and that is an error here (the engine does not start) rather
    /// than a failure of every request later.
    pub(crate) fn capture_decode_graphs(&mut self) -> crate::error::Result<()> {
        let started = Instant::now();
        match self.runner.capture_decode_graphs() {
            Ok(0) => {}
            Ok(buckets) => tracing::info!(
                buckets,
                seconds = started.elapsed().as_secs_f32(),
                "decode steps captured as CUDA graphs"
            ),
            Err(e) => tracing::warn!(error = %e, "capturing the decode graphs at start-up failed"),
        }
        self.runner
            .model()
            .device()
            .synchronize()
            .map_err(|e| EngineError::Model(format!("the GPU failed while the decode graphs were captured: {e}")))?;
        if let Ok(mut s) = self.shared.stats.lock() {
            s.decode_graphs = self.runner.graph_counts();
        }
        Ok(())
    }

    /// The loop. Sleeps on the command channel when there is nothing to do (no busy-wait), until
    /// the admission window opens when requests wait for it, and until the cool-down ends while
    /// the circuit breaker is open (requests already in hand are held, not failed).
    pub(crate) fn run(mut self) {
        // Marks the engine dead however this thread ends, a panic included, so health checks see it.
        let _alive = AliveGuard(self.shared.clone());
        self.publish_stats(true);
        let mut wake_at: Option<Instant> = None;
        while !self.shutting_down {
            // Block only when there is nothing to run, or nothing may run.
            let first = match self.breaker.held_until() {
                Some(until) => self.wait_for_command(Some(until)),
                None if self.scheduler.num_running() > 0 => None,
                None => match wake_at {
                    None if self.scheduler.is_idle() => self.wait_for_command(None),
                    Some(at) => self.wait_for_command(Some(at)),
                    // Requests wait but the window gave no time: should not happen; poll, never spin.
                    None => self.wait_for_command(Some(Instant::now() + Duration::from_millis(10))),
                },
            };
            // An iteration's time counts from here: after any wait for work.
            let iteration = Instant::now();
            if let Some(c) = first {
                self.handle(c);
            }
            self.drain_commands();
            if self.shutting_down {
                break;
            }
            if let Some(state) = self.breaker.poll(Instant::now()) {
                self.breaker_changed(state);
            }
            if self.breaker.held_until().is_some() {
                self.publish_stats(true);
                continue;
            }
            let scheduling = Instant::now();
            let batch = self.scheduler.schedule(scheduling);
            metrics::record_preemptions(batch.preempted.len());
            self.note_admissions(&batch);
            for id in batch.rejected.clone() {
                self.fail(id, EngineError::InvalidRequest("the request can never fit in the KV cache".into()));
            }
            wake_at = batch.wake_at;
            if !batch.is_empty() {
                // The step's phases go to `step_times`, added to `times` whole once the step is
                // done, so that stats published during it never count a step in part.
                self.step_times = StepTimes { steps: 1, schedule: scheduling.elapsed(), ..StepTimes::default() };
                self.step(&batch);
                self.step_times.total = iteration.elapsed();
                self.times.add(&self.step_times);
            }
            self.publish_stats(true);
        }
        for id in self.scheduler.ids() {
            self.fail(id, EngineError::EngineStopped);
        }
        self.publish_stats(false);
    }

    /// The next command, waiting for it until `deadline` (forever when `None`).
    fn wait_for_command(&self, deadline: Option<Instant>) -> Option<Command> {
        let Some(at) = deadline else {
            // Disconnected: `drain_commands` sees it and shuts down.
            return self.commands.recv().ok();
        };
        match self.commands.recv_deadline(at) {
            Ok(c) => Some(c),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(Command::Shutdown),
        }
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
            Command::Abort(id) => {
                if self.requests.contains_key(&id) {
                    metrics::record_abort();
                }
                self.abort(id);
            }
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

    /// Runs the model on `batch`: the one place a step can fail.
    fn execute(&mut self, batch: &Batch) -> crate::error::Result<StepLogits> {
        #[cfg(feature = "fault-injection")]
        if self.shared.take_injected_failure() {
            return Err(EngineError::Model("injected step failure".into()));
        }
        let readout = self.readout(batch);
        self.runner.execute(batch, &self.scheduler, readout)
    }

    /// Runs one model step and hands out its tokens. A failed step fails the requests in it (the
    /// others go on) and counts towards the circuit breaker.
    fn step(&mut self, batch: &Batch) {
        let started = Instant::now();
        let executed = self.execute(batch);
        let sampling = Instant::now();
        self.step_times.model += sampling.saturating_duration_since(started);
        let logits = match executed {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, sequences = batch.seqs.len(), "model step failed");
                metrics::record_step_failure();
                if let Ok(mut s) = self.shared.stats.lock() {
                    s.failed_steps += 1;
                }
                // The breaker's new state is published before the errors go out, so a caller that
                // sees its error and retries at once meets the open breaker.
                if let Some(state) = self.breaker.on_failure(Instant::now()) {
                    self.breaker_changed(state);
                }
                for s in &batch.seqs {
                    self.fail(s.id, EngineError::Model(format!("the model step failed: {e}")));
                }
                return;
            }
        };
        if let Some(state) = self.breaker.on_success() {
            self.breaker_changed(state);
        }
        let SampledStep { tokens: sampled, failed, readouts } = self.sample_step(batch, &logits);
        let emitting = Instant::now();
        self.step_times.sample += emitting.saturating_duration_since(sampling);
        let pairs: Vec<(RequestId, u32)> = sampled.iter().map(|(id, c)| (*id, c.token)).collect();
        self.scheduler.update(batch, &pairs);
        metrics::record_step(&StepRecord { seqs: batch.seqs.len(), tokens: batch.num_tokens, generated: pairs.len() });
        let graph_counts = self.runner.graph_counts();
        let mut replays = 0;
        if let Ok(mut s) = self.shared.stats.lock() {
            replays = graph_counts.replayed.saturating_sub(s.decode_graphs.replayed);
            s.steps += 1;
            s.generated_tokens += pairs.len() as u64;
            s.device_argmax_tokens += readouts.device_argmax;
            s.head_tokens += readouts.device_head;
            s.fetched_rows += readouts.fetched_rows;
            s.decode_graphs = graph_counts;
            let decodes = batch
                .seqs
                .iter()
                .filter(|s| {
                    let prompt_len = self.scheduler.sequence(s.id).map_or(0, |q| q.num_prompt_tokens);
                    s.len == 1 && s.sample && s.start >= prompt_len
                })
                .count();
            s.prompt_tokens += (batch.num_tokens - decodes) as u64;
        }
        metrics::record_sampling(readouts.device_argmax, readouts.device_head, readouts.host, replays);
        for (id, choice) in sampled {
            self.emit(id, choice.token, choice.logprob);
        }
        for (id, e) in failed {
            tracing::error!(error = %e, request = id, "choosing a sampled row's token failed");
            self.fail(id, e);
        }
        self.step_times.emit += emitting.elapsed();
    }

    /// Logs, counts and publishes a breaker transition.
    fn breaker_changed(&self, state: BreakerState) {
        match state {
            BreakerState::Open { .. } => tracing::warn!(
                failures = self.breaker.consecutive_failures(),
                "circuit breaker open: model steps are failing; holding requests, refusing new ones"
            ),
            BreakerState::HalfOpen => tracing::info!("circuit breaker half-open: the next step is a probe"),
            BreakerState::Closed => tracing::info!("circuit breaker closed: the probe step succeeded"),
        }
        metrics::record_breaker(state.as_str());
        if let Ok(mut s) = self.shared.stats.lock() {
            s.breaker = state;
        }
    }

    fn publish_stats(&self, alive: bool) {
        let bm = self.scheduler.block_manager();
        let (running, waiting) = (self.scheduler.num_running(), self.scheduler.num_waiting());
        metrics::record_gauges(running, waiting, bm.num_used() as f64 / bm.num_blocks().max(1) as f64);
        let counters = self.scheduler.counters();
        metrics::record_prefix_cache(counters.prefix_cache_queries, counters.prefix_cache_hits);
        if let Ok(mut s) = self.shared.stats.lock() {
            s.waiting = waiting;
            s.running = running;
            s.kv_blocks_used = bm.num_used();
            s.kv_blocks_total = bm.num_blocks();
            s.kv_blocks_cached = bm.num_cached();
            s.preemptions = counters.preemptions;
            s.prefix_cache_queries = counters.prefix_cache_queries;
            s.prefix_cache_hits = counters.prefix_cache_hits;
            s.breaker = self.breaker.state();
            s.step_times = self.times;
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

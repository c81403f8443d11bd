//! The engine's metrics, recorded with the `metrics` facade: names (vLLM's `vllm:` names with a
//! `sluice_` prefix, same meaning), their descriptions, and the functions the engine loop calls.
//!
//! Without an installed recorder every call here is a no-op; a program that embeds the engine
//! installs one (the server's `/metrics` does) to see them.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};

/// Histogram: arrival to finish, seconds.
pub const E2E_REQUEST_LATENCY: &str = "sluice_e2e_request_latency_seconds";
/// Histogram: arrival to first generated token, seconds.
pub const TIME_TO_FIRST_TOKEN: &str = "sluice_time_to_first_token_seconds";
/// Histogram: time between two consecutive tokens of a request, seconds.
pub const INTER_TOKEN_LATENCY: &str = "sluice_inter_token_latency_seconds";
/// Histogram: a request's decode time divided by its tokens after the first, seconds.
pub const TIME_PER_OUTPUT_TOKEN: &str = "sluice_time_per_output_token_seconds";
/// Histogram: arrival to first admission into the running batch, seconds.
pub const REQUEST_QUEUE_TIME: &str = "sluice_request_queue_time_seconds";
/// Histogram: first admission to first token, seconds.
pub const REQUEST_PREFILL_TIME: &str = "sluice_request_prefill_time_seconds";
/// Histogram: first token to finish, seconds.
pub const REQUEST_DECODE_TIME: &str = "sluice_request_decode_time_seconds";
/// Histogram: prompt tokens per finished request.
pub const REQUEST_PROMPT_TOKENS: &str = "sluice_request_prompt_tokens";
/// Histogram: generated tokens per finished request.
pub const REQUEST_GENERATION_TOKENS: &str = "sluice_request_generation_tokens";
/// Histogram: tokens run through the model per engine step.
pub const ITERATION_TOKENS: &str = "sluice_iteration_tokens_total";
/// Histogram: sequences per engine step.
pub const BATCH_SIZE: &str = "sluice_batch_size";
/// Gauge: requests in the running batch.
pub const NUM_REQUESTS_RUNNING: &str = "sluice_num_requests_running";
/// Gauge: requests waiting for admission (new or preempted).
pub const NUM_REQUESTS_WAITING: &str = "sluice_num_requests_waiting";
/// Gauge: fraction of KV cache blocks in use, 0 to 1 (vLLM's name, vLLM's unit).
pub const KV_CACHE_USAGE: &str = "sluice_kv_cache_usage_perc";
/// Counter: prompt tokens of requests whose prompt has been processed (once per request).
pub const PROMPT_TOKENS: &str = "sluice_prompt_tokens_total";
/// Counter: generated tokens.
pub const GENERATION_TOKENS: &str = "sluice_generation_tokens_total";
/// Counter: finished requests, label `finished_reason` (`stop`, `length`, `abort`).
pub const REQUEST_SUCCESS: &str = "sluice_request_success_total";
/// Counter: preemptions (a sequence's blocks taken back to be recomputed later).
pub const NUM_PREEMPTIONS: &str = "sluice_num_preemptions_total";
/// Counter: circuit breaker transitions, label `state` (the state entered).
pub const BREAKER_STATE_CHANGES: &str = "sluice_breaker_state_changes_total";
/// Counter: generated tokens by where the sampler's input came from, label `readout`:
/// `device_argmax` (only the id was copied back), `device_head` (a head of the distribution), `host`
/// (the whole row of logits).
pub const SAMPLED_TOKENS: &str = "sluice_sampled_tokens_total";
/// Counter: decode steps replayed from a CUDA graph (`--cuda-graphs`).
pub const CUDA_GRAPH_REPLAYS: &str = "sluice_cuda_graph_replays_total";
/// Counter: prompt tokens of admitted requests looked up in the prefix cache (recomputations of
/// preempted requests included).
pub const PREFIX_CACHE_QUERIES: &str = "sluice_prefix_cache_queries_total";
/// Counter: of those, tokens found in the prefix cache (their K/V reused, not computed).
pub const PREFIX_CACHE_HITS: &str = "sluice_prefix_cache_hits_total";
/// Counter: errors, label `type`. The engine counts failed model steps as `model_step`.
pub const ERRORS: &str = "sluice_errors_total";

/// Describes every engine metric to the installed recorder (help text and unit).
pub fn describe() {
    describe_histogram!(E2E_REQUEST_LATENCY, Unit::Seconds, "End-to-end request latency, arrival to finish.");
    describe_histogram!(TIME_TO_FIRST_TOKEN, Unit::Seconds, "Time to first token, measured from arrival.");
    describe_histogram!(INTER_TOKEN_LATENCY, Unit::Seconds, "Time between consecutive tokens of a request.");
    describe_histogram!(TIME_PER_OUTPUT_TOKEN, Unit::Seconds, "Mean time per output token after the first.");
    describe_histogram!(REQUEST_QUEUE_TIME, Unit::Seconds, "Time a request waited before first admission.");
    describe_histogram!(REQUEST_PREFILL_TIME, Unit::Seconds, "First admission to first token.");
    describe_histogram!(REQUEST_DECODE_TIME, Unit::Seconds, "First token to finish.");
    describe_histogram!(REQUEST_PROMPT_TOKENS, Unit::Count, "Prompt tokens per finished request.");
    describe_histogram!(REQUEST_GENERATION_TOKENS, Unit::Count, "Generated tokens per finished request.");
    describe_histogram!(ITERATION_TOKENS, Unit::Count, "Tokens run through the model per engine step.");
    describe_histogram!(BATCH_SIZE, Unit::Count, "Sequences per engine step.");
    describe_gauge!(NUM_REQUESTS_RUNNING, Unit::Count, "Requests in the running batch.");
    describe_gauge!(NUM_REQUESTS_WAITING, Unit::Count, "Requests waiting for admission.");
    describe_gauge!(KV_CACHE_USAGE, "Fraction of KV cache blocks in use (1 = full).");
    describe_counter!(PROMPT_TOKENS, Unit::Count, "Prompt tokens processed.");
    describe_counter!(GENERATION_TOKENS, Unit::Count, "Tokens generated.");
    describe_counter!(REQUEST_SUCCESS, Unit::Count, "Finished requests by finish reason.");
    describe_counter!(NUM_PREEMPTIONS, Unit::Count, "Sequences preempted for lack of KV blocks.");
    describe_counter!(BREAKER_STATE_CHANGES, Unit::Count, "Circuit breaker transitions by the state entered.");
    describe_counter!(ERRORS, Unit::Count, "Errors by type.");
    describe_counter!(
        SAMPLED_TOKENS,
        Unit::Count,
        "Generated tokens by where the sampler read its row: device argmax, device head or the whole row on the host."
    );
    describe_counter!(PREFIX_CACHE_QUERIES, Unit::Count, "Prompt tokens looked up in the prefix cache.");
    describe_counter!(PREFIX_CACHE_HITS, Unit::Count, "Prompt tokens found in the prefix cache.");
    describe_counter!(CUDA_GRAPH_REPLAYS, Unit::Count, "Decode steps replayed from a CUDA graph.");
}

/// One engine step that ran: its size in sequences and tokens, and the tokens it generated.
pub(crate) struct StepRecord {
    pub seqs: usize,
    pub tokens: usize,
    pub generated: usize,
}

pub(crate) fn record_step(step: &StepRecord) {
    histogram!(BATCH_SIZE).record(step.seqs as f64);
    histogram!(ITERATION_TOKENS).record(step.tokens as f64);
    counter!(GENERATION_TOKENS).increment(step.generated as u64);
}

/// How a step's tokens were sampled (see [`SAMPLED_TOKENS`]), and how many of its decode steps
/// (0 or 1) were graph replays.
pub(crate) fn record_sampling(device_argmax: u64, device_head: u64, host: u64, graph_replays: u64) {
    for (readout, n) in [("device_argmax", device_argmax), ("device_head", device_head), ("host", host)] {
        if n > 0 {
            counter!(SAMPLED_TOKENS, "readout" => readout).increment(n);
        }
    }
    if graph_replays > 0 {
        counter!(CUDA_GRAPH_REPLAYS).increment(graph_replays);
    }
}

/// The prefix cache's counts since start (the scheduler keeps them; the counters follow).
pub(crate) fn record_prefix_cache(queries: u64, hits: u64) {
    counter!(PREFIX_CACHE_QUERIES).absolute(queries);
    counter!(PREFIX_CACHE_HITS).absolute(hits);
}

/// Sequences preempted while a step was scheduled.
pub(crate) fn record_preemptions(n: usize) {
    if n > 0 {
        counter!(NUM_PREEMPTIONS).increment(n as u64);
    }
}

pub(crate) fn record_step_failure() {
    counter!(ERRORS, "type" => "model_step").increment(1);
}

/// A request's first token: its prompt has been processed; its time to first token is known.
pub(crate) fn record_first_token(prompt_tokens: usize, time_to_first_token: Duration) {
    counter!(PROMPT_TOKENS).increment(prompt_tokens as u64);
    histogram!(TIME_TO_FIRST_TOKEN).record(time_to_first_token.as_secs_f64());
}

/// A token after the first, `gap` after the previous one.
pub(crate) fn record_inter_token(gap: Duration) {
    histogram!(INTER_TOKEN_LATENCY).record(gap.as_secs_f64());
}

/// Where a finished request's time went, all measured from its arrival.
pub(crate) struct FinishRecord {
    pub reason: &'static str,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub queue: Duration,
    pub time_to_first_token: Duration,
    pub total: Duration,
}

pub(crate) fn record_finish(r: &FinishRecord) {
    counter!(REQUEST_SUCCESS, "finished_reason" => r.reason).increment(1);
    histogram!(E2E_REQUEST_LATENCY).record(r.total.as_secs_f64());
    histogram!(REQUEST_QUEUE_TIME).record(r.queue.as_secs_f64());
    histogram!(REQUEST_PREFILL_TIME).record(r.time_to_first_token.saturating_sub(r.queue).as_secs_f64());
    let decode = r.total.saturating_sub(r.time_to_first_token);
    histogram!(REQUEST_DECODE_TIME).record(decode.as_secs_f64());
    if r.generated_tokens > 1 {
        histogram!(TIME_PER_OUTPUT_TOKEN).record(decode.as_secs_f64() / (r.generated_tokens - 1) as f64);
    }
    histogram!(REQUEST_PROMPT_TOKENS).record(r.prompt_tokens as f64);
    histogram!(REQUEST_GENERATION_TOKENS).record(r.generated_tokens as f64);
}

/// A request aborted by its caller before it finished.
pub(crate) fn record_abort() {
    counter!(REQUEST_SUCCESS, "finished_reason" => "abort").increment(1);
}

pub(crate) fn record_breaker(state: &'static str) {
    counter!(BREAKER_STATE_CHANGES, "state" => state).increment(1);
}

/// The gauges, after every loop turn.
pub(crate) fn record_gauges(running: usize, waiting: usize, kv_usage: f64) {
    gauge!(NUM_REQUESTS_RUNNING).set(running as f64);
    gauge!(NUM_REQUESTS_WAITING).set(waiting as f64);
    gauge!(KV_CACHE_USAGE).set(kv_usage);
}

//! `GET /metrics`: Prometheus text from the `metrics` facade through `metrics-exporter-prometheus`.
//!
//! Names are vLLM's with a `sluice_` prefix and the same meaning, so dashboards translate by
//! renaming. The engine records its own (`sluice_engine::metrics`: latencies, tokens, batch size,
//! queue and KV gauges, breaker transitions); the server records requests by route and status
//! ([`record_request`]) and errors by type, and the cache, rate limiter and filters record theirs.
//!
//! The recorder is process-wide and installed once ([`install`]); later calls (more routers in
//! the same process, as in tests) reuse it.

use std::sync::OnceLock;
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use metrics::{counter, describe_counter, Unit};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use sluice_engine::metrics as engine;

/// Counter: HTTP responses, labels `route` (the matched route, `unmatched` for others) and `status`.
pub const REQUESTS: &str = "sluice_requests_total";
/// Counter: response cache look-ups.
pub const RESPONSE_CACHE_QUERIES: &str = "sluice_response_cache_queries_total";
/// Counter: response cache hits.
pub const RESPONSE_CACHE_HITS: &str = "sluice_response_cache_hits_total";
/// Counter: requests refused by a rate limit, label `limit` (`requests` or `tokens`).
pub const RATE_LIMITED: &str = "sluice_rate_limited_requests_total";
/// Counter: user messages that matched an instruction-override rule and were served, label `rule`.
pub const INPUT_FLAGGED: &str = "sluice_input_flagged_total";
/// Counter: user messages blocked by an instruction-override rule, label `rule`.
pub const INPUT_BLOCKED: &str = "sluice_input_blocked_total";
/// Counter: spans of generated text redacted, label `kind`.
pub const REDACTIONS: &str = "sluice_redactions_total";

/// The Prometheus text format's content type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How often histograms are folded into their buckets between scrapes (bounds their memory).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

// Per-metric buckets, after vLLM's. Latencies reach down to milliseconds: a small model on a
// fast machine answers well under vLLM's smallest request-latency bucket (0.3 s).
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];
const TOKEN_LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0,
];
const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
];
// 1-2-5 steps, as vLLM's `build_1_2_5_buckets`, up past any context length.
const TOKEN_COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0, 50000.0, 100000.0,
    200000.0,
];
const ITERATION_TOKEN_BUCKETS: &[f64] =
    &[1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0];
const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder on first call (later calls return the same handle), with
/// every metric described and the label-free and known-label series registered at zero, so that
/// `/metrics` lists them all before anything has happened.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = with_buckets().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "invalid histogram buckets; using the exporter's summaries");
            PrometheusBuilder::new()
        });
        let handle = match builder.install_recorder() {
            Ok(handle) => {
                let upkeep = handle.clone();
                let spawned = std::thread::Builder::new().name("sluice-metrics".into()).spawn(move || loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                });
                if let Err(e) = spawned {
                    // Rendering folds histograms too; only memory between scrapes grows.
                    tracing::warn!(error = %e, "cannot start the metrics upkeep thread");
                }
                handle
            }
            Err(e) => {
                // Another recorder owns the process (an embedding program): serve an empty page.
                tracing::warn!(error = %e, "cannot install the Prometheus recorder; /metrics will be empty");
                PrometheusBuilder::new().build_recorder().handle()
            }
        };
        describe();
        register_zeros();
        handle
    })
}

/// The exporter with vLLM-like buckets for every histogram.
fn with_buckets() -> Result<PrometheusBuilder, BuildError> {
    let buckets: [(&str, &[f64]); 11] = [
        (engine::TIME_TO_FIRST_TOKEN, TTFT_BUCKETS),
        (engine::INTER_TOKEN_LATENCY, TOKEN_LATENCY_BUCKETS),
        (engine::TIME_PER_OUTPUT_TOKEN, TOKEN_LATENCY_BUCKETS),
        (engine::E2E_REQUEST_LATENCY, REQUEST_LATENCY_BUCKETS),
        (engine::REQUEST_QUEUE_TIME, REQUEST_LATENCY_BUCKETS),
        (engine::REQUEST_PREFILL_TIME, REQUEST_LATENCY_BUCKETS),
        (engine::REQUEST_DECODE_TIME, REQUEST_LATENCY_BUCKETS),
        (engine::REQUEST_PROMPT_TOKENS, TOKEN_COUNT_BUCKETS),
        (engine::REQUEST_GENERATION_TOKENS, TOKEN_COUNT_BUCKETS),
        (engine::ITERATION_TOKENS, ITERATION_TOKEN_BUCKETS),
        (engine::BATCH_SIZE, BATCH_SIZE_BUCKETS),
    ];
    buckets.into_iter().try_fold(PrometheusBuilder::new(), |b, (name, values)| {
        b.set_buckets_for_metric(Matcher::Full(name.into()), values)
    })
}

fn describe() {
    engine::describe();
    describe_counter!(REQUESTS, Unit::Count, "HTTP responses by route and status code.");
    describe_counter!(RESPONSE_CACHE_QUERIES, Unit::Count, "Response cache look-ups.");
    describe_counter!(RESPONSE_CACHE_HITS, Unit::Count, "Response cache hits.");
    describe_counter!(RATE_LIMITED, Unit::Count, "Requests refused by a rate limit, by limit.");
    describe_counter!(INPUT_FLAGGED, Unit::Count, "User messages flagged by an instruction-override rule.");
    describe_counter!(INPUT_BLOCKED, Unit::Count, "User messages blocked by an instruction-override rule.");
    describe_counter!(REDACTIONS, Unit::Count, "Spans of generated text redacted, by kind.");
}

/// Registers counters at zero (`increment(0)` leaves a value alone), so that rates and sums
/// work from the first scrape. Labelled counters get their known label values.
fn register_zeros() {
    for name in [engine::PROMPT_TOKENS, engine::GENERATION_TOKENS, engine::NUM_PREEMPTIONS] {
        counter!(name).increment(0);
    }
    for name in [RESPONSE_CACHE_QUERIES, RESPONSE_CACHE_HITS] {
        counter!(name).increment(0);
    }
    for reason in ["stop", "length", "abort"] {
        counter!(engine::REQUEST_SUCCESS, "finished_reason" => reason).increment(0);
    }
    for state in ["open", "half_open", "closed"] {
        counter!(engine::BREAKER_STATE_CHANGES, "state" => state).increment(0);
    }
    for limit in ["requests", "tokens"] {
        counter!(RATE_LIMITED, "limit" => limit).increment(0);
    }
    for rule in ["instruction_override", "role_override", "system_role", "special_token"] {
        counter!(INPUT_FLAGGED, "rule" => rule).increment(0);
        counter!(INPUT_BLOCKED, "rule" => rule).increment(0);
    }
    for kind in crate::filter::output::RedactKind::ALL {
        counter!(REDACTIONS, "kind" => kind.name()).increment(0);
    }
}

/// Counts one HTTP response (`sluice_requests_total{route,status}`).
pub fn record_request(route: &str, status: StatusCode) {
    counter!(REQUESTS, "route" => route.to_string(), "status" => status.as_str().to_string()).increment(1);
}

/// Counts one error answered to a client, by its envelope code (`sluice_errors_total{type}`).
pub fn record_error(kind: &'static str) {
    counter!(engine::ERRORS, "type" => kind).increment(1);
}

/// `GET /metrics`: every metric in the Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain"),
        (status = 401, description = "A metrics key is configured and the request lacks it"),
    )
)]
pub async fn render() -> Response {
    let body = install().render();
    let mut response = (StatusCode::OK, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

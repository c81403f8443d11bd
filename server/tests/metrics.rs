//! `GET /metrics` through the real router on the real model: Prometheus text, every metric named
//! in the design present with its help text, and the counters and histograms moving when a
//! request runs. The recorder is process-wide, and tests in this binary run at once, so values
//! are compared before and after, as "moved by at least".

mod common;

use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};
use sluice_server::auth::ApiKey;
use sluice_server::{router, ApiConfig, AppState};
use tower::ServiceExt;

use common::{api_config, chat_body, ready_state};

/// Every metric the design names, and the kind Prometheus is told.
const METRICS: &[(&str, &str)] = &[
    ("sluice_requests_total", "counter"),
    ("sluice_e2e_request_latency_seconds", "histogram"),
    ("sluice_time_to_first_token_seconds", "histogram"),
    ("sluice_inter_token_latency_seconds", "histogram"),
    ("sluice_time_per_output_token_seconds", "histogram"),
    ("sluice_request_queue_time_seconds", "histogram"),
    ("sluice_request_prefill_time_seconds", "histogram"),
    ("sluice_request_decode_time_seconds", "histogram"),
    ("sluice_request_prompt_tokens", "histogram"),
    ("sluice_request_generation_tokens", "histogram"),
    ("sluice_iteration_tokens_total", "histogram"),
    ("sluice_batch_size", "histogram"),
    ("sluice_num_requests_running", "gauge"),
    ("sluice_num_requests_waiting", "gauge"),
    ("sluice_kv_cache_usage_perc", "gauge"),
    ("sluice_prompt_tokens_total", "counter"),
    ("sluice_generation_tokens_total", "counter"),
    ("sluice_request_success_total", "counter"),
    ("sluice_num_preemptions_total", "counter"),
    ("sluice_breaker_state_changes_total", "counter"),
    ("sluice_errors_total", "counter"),
    ("sluice_sampled_tokens_total", "counter"),
    ("sluice_prefix_cache_queries_total", "counter"),
    ("sluice_prefix_cache_hits_total", "counter"),
    ("sluice_response_cache_queries_total", "counter"),
    ("sluice_response_cache_hits_total", "counter"),
    ("sluice_rate_limited_requests_total", "counter"),
    ("sluice_input_flagged_total", "counter"),
    ("sluice_input_blocked_total", "counter"),
    ("sluice_redactions_total", "counter"),
];

async fn send(state: &AppState, req: Request<Body>) -> (Response<()>, String) {
    let response = router(state.clone()).oneshot(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    (Response::from_parts(parts, ()), String::from_utf8_lossy(&bytes).into_owned())
}

async fn scrape(state: &AppState) -> Scrape {
    let (r, text) = send(state, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status(), StatusCode::OK, "{text}");
    Scrape(text)
}

fn chat(body: Value) -> Request<Body> {
    Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// One scrape of `/metrics`.
struct Scrape(String);

impl Scrape {
    /// The sum of the samples of `name` whose labels include every pair of `labels` (0 if none).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter_map(|(series, value)| Some((parse_series(series), value.parse::<f64>().ok()?)))
            .filter(|((n, ls), _)| n == name && labels.iter().all(|(k, v)| ls.get(*k).map(String::as_str) == Some(*v)))
            .map(|(_, v)| v)
            .sum()
    }
}

/// `name{a="x",b="y"}` into its name and labels.
fn parse_series(series: &str) -> (String, BTreeMap<String, String>) {
    let Some((name, rest)) = series.split_once('{') else {
        return (series.to_string(), BTreeMap::new());
    };
    let labels = rest
        .trim_end_matches('}')
        .split("\",")
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect();
    (name.to_string(), labels)
}

#[tokio::test]
async fn every_metric_appears_and_moves_when_a_request_runs() {
    let state = ready_state(api_config());
    let before = scrape(&state).await;

    // A request that runs to `max_tokens` (finish reason `length`)...
    let long = chat(chat_body("Tell me about the sea.", json!({"max_tokens": 6, "ignore_eos": true})));
    let (r, body) = send(&state, long).await;
    assert_eq!(r.status(), StatusCode::OK, "{body}");
    let usage: Value = serde_json::from_str(&body).unwrap();
    let (prompt, completion) = (usage["usage"]["prompt_tokens"].as_f64(), usage["usage"]["completion_tokens"].as_f64());
    let (prompt, completion) = (prompt.unwrap(), completion.unwrap());
    assert_eq!(completion, 6.0);
    // ...one that stops on a stop string (`stop`), streamed...
    let stop = chat(chat_body("Tell me about the sea.", json!({"max_tokens": 40, "stop": [" "], "stream": true})));
    let (r, body) = send(&state, stop).await;
    assert_eq!(r.status(), StatusCode::OK, "{body}");
    assert!(body.contains("\"finish_reason\":\"stop\""), "{body}");
    // ...and one that fails (an unknown route).
    let (r, _) = send(&state, Request::get("/v1/nothing").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    let after = scrape(&state).await;
    for (name, kind) in METRICS {
        assert!(after.0.contains(&format!("# TYPE {name} {kind}\n")), "`{name}` is missing or not a {kind}");
        assert!(after.0.contains(&format!("# HELP {name} ")), "`{name}` has no help text");
    }
    let moved = |name: &str, labels: &[(&str, &str)]| after.value(name, labels) - before.value(name, labels);
    let chat_ok = [("route", "/v1/chat/completions"), ("status", "200")];
    assert!(moved("sluice_requests_total", &chat_ok) >= 2.0);
    assert!(moved("sluice_requests_total", &[("route", "unmatched"), ("status", "404")]) >= 1.0);
    assert!(moved("sluice_errors_total", &[("type", "unknown_url")]) >= 1.0);
    assert!(moved("sluice_prompt_tokens_total", &[]) >= 2.0 * prompt);
    assert!(moved("sluice_generation_tokens_total", &[]) >= completion + 1.0);
    // The second request's prompt is the first's: all its whole blocks but the last were cached.
    assert!(moved("sluice_prefix_cache_queries_total", &[]) >= 2.0 * prompt);
    assert!(moved("sluice_prefix_cache_hits_total", &[]) >= ((prompt - 1.0) / 16.0).floor() * 16.0);
    assert!(moved("sluice_request_success_total", &[("finished_reason", "length")]) >= 1.0);
    assert!(moved("sluice_request_success_total", &[("finished_reason", "stop")]) >= 1.0);
    for histogram in [
        "sluice_time_to_first_token_seconds",
        "sluice_e2e_request_latency_seconds",
        "sluice_request_queue_time_seconds",
        "sluice_request_prefill_time_seconds",
        "sluice_request_decode_time_seconds",
        "sluice_request_prompt_tokens",
        "sluice_request_generation_tokens",
    ] {
        assert!(moved(&format!("{histogram}_count"), &[]) >= 2.0, "`{histogram}` did not count both requests");
    }
    assert!(moved("sluice_inter_token_latency_seconds_count", &[]) >= completion - 1.0);
    assert!(moved("sluice_time_per_output_token_seconds_count", &[]) >= 1.0);
    assert!(moved("sluice_request_generation_tokens_sum", &[]) >= completion);
    assert!(moved("sluice_iteration_tokens_total_sum", &[]) >= prompt + completion - 1.0);
    assert!(moved("sluice_batch_size_count", &[]) >= completion);
    // vLLM's buckets: a histogram has its `le` series, up to +Inf.
    assert!(after.0.contains("sluice_time_to_first_token_seconds_bucket{le=\"0.001\"}"), "{}", after.0);
    assert!(after.0.contains("sluice_time_to_first_token_seconds_bucket{le=\"+Inf\"}"));
    let usage = after.value("sluice_kv_cache_usage_perc", &[]);
    assert!((0.0..=1.0).contains(&usage), "{usage}");
}

#[tokio::test]
async fn metrics_are_prometheus_text_open_by_default_or_behind_their_own_key() {
    let state = ready_state(api_config());
    let (r, text) = send(&state, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()[header::CONTENT_TYPE], "text/plain; version=0.0.4; charset=utf-8");
    assert!(text.contains("# TYPE sluice_prompt_tokens_total counter"), "{text}");

    let keyed = ready_state(ApiConfig { metrics_key: Some(ApiKey::new("sk-metrics")), ..api_config() });
    let (r, _) = send(&keyed, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let with_key = Request::get("/metrics").header(header::AUTHORIZATION, "Bearer sk-metrics").body(Body::empty());
    let (r, text) = send(&keyed, with_key.unwrap()).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(text.contains("# TYPE sluice_generation_tokens_total counter"), "{text}");
}

#[test]
fn series_are_parsed_with_their_labels() {
    let scrape =
        Scrape("# TYPE x counter\nx{a=\"1\",b=\"/v1/y\"} 2\nx{a=\"2\",b=\"/v1/y\"} 3\ny 7\nx_count 1\n".to_string());
    assert_eq!(scrape.value("x", &[("b", "/v1/y")]), 5.0);
    assert_eq!(scrape.value("x", &[("a", "2")]), 3.0);
    assert_eq!(scrape.value("y", &[]), 7.0);
    assert_eq!(scrape.value("z", &[]), 0.0);
}

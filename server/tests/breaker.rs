//! The circuit breaker around model execution, through the real server on the real model, with
//! step failures injected into the engine (`fault-injection` feature): the failing requests get
//! an error (never a hang), the open breaker answers 503 with `Retry-After` at once and `/health`
//! says so, and after the cool-down one probe step closes it again (or re-opens it if it fails).
//!
//! Each test has its own engine: injected failures and breaker state are per engine.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};
use sluice_engine::{BreakerConfig, BreakerState, Engine, EngineConfig, SchedulerConfig, StreamEvent};
use sluice_server::{router, AppState};
use tower::ServiceExt;

use common::{api_config, chat_body, model_path};

/// Longest any single request may take here: a hang fails the test instead of stalling it.
const NO_HANG: Duration = Duration::from_secs(60);

fn engine(threshold: u32, cooldown: Duration, scheduler: SchedulerConfig) -> Arc<Engine> {
    let mut config = EngineConfig::new(model_path());
    config.kv_cache_memory = Some(64 << 20);
    config.breaker = BreakerConfig { threshold, cooldown };
    config.scheduler = scheduler;
    Arc::new(Engine::new(config).expect("the engine loads the default model"))
}

fn state(engine: Arc<Engine>) -> AppState {
    let state = AppState::new(api_config());
    state.set_engine(engine);
    state
}

async fn send(state: &AppState, req: Request<Body>) -> (Response<()>, Value) {
    let response = tokio::time::timeout(NO_HANG, router(state.clone()).oneshot(req)).await.expect("no hang").unwrap();
    let (parts, body) = response.into_parts();
    let bytes = tokio::time::timeout(NO_HANG, axum::body::to_bytes(body, usize::MAX)).await.expect("no hang").unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (Response::from_parts(parts, ()), json)
}

/// A short chat request that runs the model (sampled, so never answered from the response cache).
fn chat(stream: bool) -> Request<Body> {
    let body = chat_body("Say something.", json!({"max_tokens": 4, "stream": stream}));
    Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn health(state: &AppState) -> (StatusCode, Value) {
    let (r, body) = send(state, Request::get("/health").body(Body::empty()).unwrap()).await;
    (r.status(), body)
}

/// `sluice_breaker_state_changes_total{state}` as `/metrics` shows it now.
async fn state_changes(state: &AppState, to: &str) -> f64 {
    let (_, body) = send(state, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    let text = body.as_str().expect("Prometheus text");
    let series = format!("sluice_breaker_state_changes_total{{state=\"{to}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&series)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

/// The open breaker's answer: 503, OpenAI envelope, `breaker_open`, `Retry-After` in seconds.
fn assert_breaker_open(r: &Response<()>, body: &Value) {
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "breaker_open", "{body}");
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    let retry: u64 = r.headers()[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry} for a 1 s cool-down");
}

#[tokio::test]
async fn breaker_opens_after_failed_steps_fails_fast_and_a_probe_closes_it() {
    let cooldown = Duration::from_secs(1);
    let engine = engine(3, cooldown, SchedulerConfig::default());
    let state = state(engine.clone());
    let before = [state_changes(&state, "open").await, state_changes(&state, "half_open").await];
    let closed_before = state_changes(&state, "closed").await;

    let (r, body) = send(&state, chat(false)).await;
    assert_eq!(r.status(), StatusCode::OK, "{body}");
    assert_eq!(health(&state).await.1["breaker"], "closed");

    // Three failed steps, one per request: each request fails with an error, none hangs.
    engine.inject_step_failures(3);
    for _ in 0..2 {
        let (r, body) = send(&state, chat(false)).await;
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR, "{body}");
        assert_eq!(body["error"]["type"], "server_error", "{body}");
    }
    assert_eq!(engine.breaker(), BreakerState::Closed, "two failures are under the threshold");
    // A streamed request has sent its 200 already: it gets an error event, then [DONE].
    let (r, body) = send(&state, chat(true)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let events = body.as_str().expect("an event stream");
    assert!(events.contains("\"error\"") && events.trim_end().ends_with("data: [DONE]"), "{events}");
    let opened_at = Instant::now();

    // Open: new requests fail at once with 503 and the remaining cool-down; health says so.
    assert!(matches!(engine.breaker(), BreakerState::Open { .. }), "{:?}", engine.breaker());
    let (r, body) = send(&state, chat(false)).await;
    assert_breaker_open(&r, &body);
    let (r, body) = send(&state, chat(true)).await;
    assert_breaker_open(&r, &body);
    let (status, body) = health(&state).await;
    assert!(opened_at.elapsed() < cooldown, "the checks above took the whole cool-down");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!((&body["status"], &body["breaker"]), (&json!("breaker_open"), &json!("open")), "{body}");
    assert!(state_changes(&state, "open").await >= before[0] + 1.0);

    // After the cool-down: half-open, traffic comes back, and the first step is the probe.
    tokio::time::sleep(cooldown.saturating_sub(opened_at.elapsed()) + Duration::from_millis(50)).await;
    let (status, body) = health(&state).await;
    assert_eq!((status, &body["status"], &body["breaker"]), (StatusCode::OK, &json!("ok"), &json!("half_open")));
    let (r, body) = send(&state, chat(false)).await;
    assert_eq!(r.status(), StatusCode::OK, "the probe succeeds: {body}");
    assert_eq!(engine.breaker(), BreakerState::Closed);
    let (status, body) = health(&state).await;
    assert_eq!((status, &body["breaker"]), (StatusCode::OK, &json!("closed")));
    assert!(state_changes(&state, "half_open").await >= before[1] + 1.0);
    assert!(state_changes(&state, "closed").await >= closed_before + 1.0);
}

#[tokio::test]
async fn a_failed_probe_reopens_the_breaker_for_another_cooldown() {
    let cooldown = Duration::from_millis(300);
    let engine = engine(1, cooldown, SchedulerConfig::default());
    let state = state(engine.clone());
    engine.inject_step_failures(2);

    let (r, body) = send(&state, chat(false)).await;
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    let first_open = engine.breaker();
    assert!(matches!(first_open, BreakerState::Open { .. }), "{first_open:?}");

    tokio::time::sleep(cooldown + Duration::from_millis(50)).await;
    // The probe step fails: its request gets the error and the breaker opens again at once.
    let (r, body) = send(&state, chat(false)).await;
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR, "the probe fails: {body}");
    let reopened = engine.breaker();
    assert!(matches!(reopened, BreakerState::Open { .. }) && reopened != first_open, "{reopened:?}");
    let (r, body) = send(&state, chat(false)).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{body}");

    tokio::time::sleep(cooldown + Duration::from_millis(50)).await;
    let (r, body) = send(&state, chat(false)).await;
    assert_eq!(r.status(), StatusCode::OK, "the second probe succeeds: {body}");
    assert_eq!(engine.breaker(), BreakerState::Closed);
}

/// A request already waiting when the breaker opens is held, not failed, and runs as the probe.
#[tokio::test]
async fn requests_waiting_when_the_breaker_opens_are_held_and_run_as_the_probe() {
    let cooldown = Duration::from_millis(300);
    // One sequence at a time, so the second request waits while the first one's step fails.
    let scheduler = SchedulerConfig { max_num_seqs: 1, ..SchedulerConfig::default() };
    let engine = engine(1, cooldown, scheduler);
    engine.inject_step_failures(1);
    let request = || sluice_engine::Request::text("Hello").max_tokens(3);
    let failing = engine.submit(request()).unwrap();
    let held = engine.submit(request()).unwrap();

    let failed = tokio::time::timeout(NO_HANG, failing.collect()).await.expect("no hang");
    assert!(matches!(failed, Err(sluice_engine::EngineError::Model(_))), "{failed:?}");
    let BreakerState::Open { until } = engine.breaker() else { panic!("open: {:?}", engine.breaker()) };
    let refused = engine.submit(request());
    assert!(matches!(refused, Err(sluice_engine::EngineError::BreakerOpen(_))), "{refused:?}");

    let mut held = held;
    let first = tokio::time::timeout(NO_HANG, held.next_event()).await.expect("no hang");
    assert!(matches!(first, Some(StreamEvent::Token(_))), "{first:?}");
    // Its first token came from the probe, after the cool-down.
    assert!(Instant::now() >= until, "a step ran while the breaker was open");
    let done = tokio::time::timeout(NO_HANG, held.collect()).await.expect("no hang");
    assert!(done.is_ok(), "{done:?}");
    assert_eq!(engine.breaker(), BreakerState::Closed);
}

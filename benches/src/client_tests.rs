//! The client against a scripted stub server on `127.0.0.1:0`: retries and backoff, error reports,
//! the usage fallback and deadlines. (Measuring the real server is `tests/serve.rs`.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::*;

/// One scripted answer.
#[derive(Clone)]
enum Reply {
    /// A status with an OpenAI error body and an optional `Retry-After`.
    Status(u16, Option<&'static str>),
    /// 200 with this event-stream body.
    Sse(&'static str),
    /// Never answers.
    Hang,
}

/// Answers the n-th request with `script[n]` (the last one again past its end).
struct Stub {
    script: Vec<Reply>,
    hits: AtomicUsize,
    /// Each request's headers and body.
    seen: Mutex<Vec<(HeaderMap, Value)>>,
}

const STREAM: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}\n\n\
:\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"}}]}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"!\"},\"finish_reason\":\"length\"}]}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3,\"total_tokens\":8}}\n\n\
data: [DONE]\n\n";

const COMPLETIONS_NO_USAGE: &str = "data: {\"choices\":[{\"index\":0,\"text\":\"a\"}]}\n\n\
data: {\"choices\":[{\"index\":0,\"text\":\"b\"}]}\n\n\
data: {\"choices\":[{\"index\":0,\"text\":\"c\",\"finish_reason\":\"length\"}]}\n\n\
data: [DONE]\n\n";

async fn answer(State(stub): State<Arc<Stub>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let n = stub.hits.fetch_add(1, Ordering::SeqCst);
    stub.seen.lock().expect("not poisoned").push((headers, body));
    let reply = stub.script[n.min(stub.script.len() - 1)].clone();
    match reply {
        Reply::Status(code, retry_after) => {
            let status = StatusCode::from_u16(code).expect("a status");
            let body = Json(
                json!({"error": {"message": format!("scripted {code}"), "type": "x", "param": null, "code": null}}),
            );
            let mut resp = (status, body).into_response();
            if let Some(secs) = retry_after {
                resp.headers_mut().insert("retry-after", secs.parse().expect("a header value"));
            }
            resp
        }
        Reply::Sse(text) => ([("content-type", "text/event-stream")], text).into_response(),
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
    }
}

async fn start(script: Vec<Reply>) -> (String, Arc<Stub>) {
    let stub = Arc::new(Stub { script, hits: AtomicUsize::new(0), seen: Mutex::new(Vec::new()) });
    let app = Router::new()
        .route("/v1/chat/completions", post(answer))
        .route("/v1/completions", post(answer))
        .route("/v1/models", get(|| async { Json(json!({"object": "list", "data": [{"id": "stub-model"}]})) }))
        .with_state(stub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a free port");
    let addr = listener.local_addr().expect("an address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), stub)
}

fn target(base_url: &str, endpoint: Endpoint, max_retries: u32) -> Target {
    Target {
        client: reqwest::Client::new(),
        base_url: base_url.to_string(),
        api_key: Some("sk-test".into()),
        model: "stub-model".into(),
        endpoint,
        ignore_eos: true,
        retry: RetryPolicy { max_retries, base: Duration::from_millis(10), cap: Duration::from_millis(100) },
    }
}

fn item() -> WorkItem {
    WorkItem { prompt: "Say hello.".into(), max_tokens: 8 }
}

fn in_ten_seconds() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_then_the_stream_is_measured() {
    let (url, stub) = start(vec![Reply::Status(429, Some("1")), Reply::Sse(STREAM)]).await;
    let started = Instant::now();
    let r = target(&url, Endpoint::Chat, 3).send(&item(), in_ten_seconds(), "timed out").await;
    assert_eq!(r.error, None);
    assert!(started.elapsed() >= Duration::from_secs(1), "Retry-After: 1 was not honoured");
    assert_eq!((r.retries, r.prompt_tokens, r.output_tokens, r.tokens_counted), (1, 5, 3, false));
    assert_eq!(r.itl.len(), 2, "three text chunks, two gaps; the role chunk is not a token");
    assert!(r.ttft <= r.e2e);
    assert_eq!(stub.hits.load(Ordering::SeqCst), 2);
    let seen = stub.seen.lock().expect("not poisoned");
    let (headers, body) = &seen[1];
    assert_eq!(headers["authorization"], "Bearer sk-test");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(
        (&body["stream"], &body["stream_options"]["include_usage"], &body["ignore_eos"], &body["max_tokens"]),
        (&json!(true), &json!(true), &json!(true), &json!(8))
    );
    assert_eq!(body["messages"], json!([{"role": "user", "content": "Say hello."}]));
}

#[tokio::test]
async fn a_503_is_retried_up_to_max_retries_then_reported() {
    let (url, stub) = start(vec![Reply::Status(503, None)]).await;
    let r = target(&url, Endpoint::Chat, 2).send(&item(), in_ten_seconds(), "timed out").await;
    let error = r.error.expect("a failure");
    assert!(error.contains("503") && error.contains("after 2 retries") && error.contains("scripted 503"), "{error}");
    assert_eq!(r.retries, 2);
    assert_eq!(stub.hits.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn other_errors_are_not_retried_and_keep_the_servers_message() {
    let (url, stub) = start(vec![Reply::Status(400, None), Reply::Sse(STREAM)]).await;
    let r = target(&url, Endpoint::Chat, 3).send(&item(), in_ten_seconds(), "timed out").await;
    assert_eq!(r.error.as_deref(), Some("HTTP 400 Bad Request: scripted 400"));
    assert_eq!((r.retries, stub.hits.load(Ordering::SeqCst)), (0, 1));
}

#[tokio::test]
async fn without_a_usage_chunk_the_text_chunks_are_counted() {
    let (url, stub) = start(vec![Reply::Sse(COMPLETIONS_NO_USAGE)]).await;
    let r = target(&url, Endpoint::Completions, 0).send(&item(), in_ten_seconds(), "timed out").await;
    assert_eq!(r.error, None);
    assert_eq!((r.output_tokens, r.prompt_tokens, r.tokens_counted), (3, 0, true));
    assert_eq!(stub.seen.lock().expect("not poisoned")[0].1["prompt"], "Say hello.");
}

#[tokio::test]
async fn broken_streams_deadlines_and_unreachable_servers_are_failures() {
    let (url, _) = start(vec![Reply::Sse("data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n")]).await;
    let r = target(&url, Endpoint::Chat, 0).send(&item(), in_ten_seconds(), "timed out").await;
    assert!(r.error.expect("a failure").contains("before [DONE]"));

    let (url, _) = start(vec![Reply::Sse("data: {\"error\":{\"message\":\"engine died\"}}\n\n")]).await;
    let r = target(&url, Endpoint::Chat, 0).send(&item(), in_ten_seconds(), "timed out").await;
    assert_eq!(r.error.as_deref(), Some("error event: engine died"));

    let (url, _) = start(vec![Reply::Hang]).await;
    let deadline = Instant::now() + Duration::from_millis(200);
    let r = target(&url, Endpoint::Chat, 0).send(&item(), deadline, "timed out after 200ms").await;
    assert_eq!(r.error.as_deref(), Some("timed out after 200ms"));

    // Port 1 on loopback: nothing listens there.
    let r = target("http://127.0.0.1:1", Endpoint::Chat, 3).send(&item(), in_ten_seconds(), "timed out").await;
    assert!(r.error.is_some_and(|e| !e.is_empty()));
    let r = target("not a url", Endpoint::Chat, 3).send(&item(), in_ten_seconds(), "timed out").await;
    assert!(r.error.is_some());
}

#[tokio::test]
async fn the_model_defaults_to_the_first_one_listed() {
    let (url, _) = start(vec![Reply::Hang]).await;
    let client = reqwest::Client::new();
    assert_eq!(first_model(&client, &base_url(&format!("{url}/v1/")), None).await, Ok("stub-model".to_string()));
    assert!(first_model(&client, "http://127.0.0.1:1", None).await.is_err());
}

#[test]
fn backoff_doubles_with_jitter_up_to_the_cap_and_honours_retry_after() {
    let p = RetryPolicy { max_retries: 5, base: Duration::from_millis(100), cap: Duration::from_secs(1) };
    for _ in 0..50 {
        let first = p.delay(0, None);
        assert!(first >= Duration::from_millis(50) && first < Duration::from_millis(100), "{first:?}");
        let third = p.delay(2, None);
        assert!(third >= Duration::from_millis(200) && third < Duration::from_millis(400), "{third:?}");
        assert!(p.delay(30, None) <= Duration::from_secs(1));
        assert!(p.delay(0, Some(Duration::from_secs(2))) >= Duration::from_secs(2));
    }
    assert_eq!(base_url("http://h:1/v1/"), "http://h:1");
    assert_eq!(base_url("http://h:1"), "http://h:1");
}

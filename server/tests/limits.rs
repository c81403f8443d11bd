//! API keys and rate limits through the real server on the real default model: keys from a keys
//! file with names, limits and priorities; 429 with `Retry-After` and the `x-ratelimit-*`
//! headers; refills; token charges refunded when a request ends early or its client leaves;
//! per-address buckets behind a trusted proxy; the `/metrics` key; and the engine's admission
//! control (503 when its queue is full) through the `sluice` binary.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::middleware::from_fn_with_state;
use axum::routing::get;
use futures_util::StreamExt;
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use sluice_server::auth::{self, ApiKey};
use sluice_server::config::{ServerConfig, Settings};
use sluice_server::rate_limit::RateLimitConfig;
use sluice_server::server::run;
use sluice_server::ApiConfig;
use tower::ServiceExt;

use common::child::ChildServer;
use common::{api_config, chat_body, model_path, ready_state, MODEL};

/// A server over the shared engine with `api` settings, on a real socket at `127.0.0.1:0`.
fn serve(api: ApiConfig) -> SocketAddr {
    let state = ready_state(api);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.set_nonblocking(true).expect("non-blocking listener");
    let addr = listener.local_addr().expect("bound address");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            run(listener, state, Duration::from_secs(1), std::future::pending()).await.expect("server runs");
        });
    });
    addr
}

fn limited(rpm: u32, tpm: u64) -> ApiConfig {
    ApiConfig { rate_limit: RateLimitConfig { rpm, tpm, trusted_proxy: false }, ..api_config() }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("client")
}

const FRANCE: &str = "What is the capital of France?";
const LIMIT_HEADERS: [&str; 6] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

/// A header as a number.
fn number(headers: &HeaderMap, name: &str) -> u64 {
    let value = headers.get(name).unwrap_or_else(|| panic!("no {name} in {headers:?}"));
    value.to_str().ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{name}: {value:?}"))
}

async fn chat(addr: SocketAddr, key: Option<&str>, body: &Value) -> (StatusCode, HeaderMap, Value) {
    let mut request = client().post(format!("http://{addr}/v1/chat/completions")).json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.expect("request sent");
    let (status, headers) = (response.status(), response.headers().clone());
    (status, headers, response.json().await.expect("a JSON body"))
}

async fn models(addr: SocketAddr, key: Option<&str>, forwarded_for: Option<&str>) -> (StatusCode, HeaderMap) {
    let mut request = client().get(format!("http://{addr}/v1/models"));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(forwarded) = forwarded_for {
        request = request.header("x-forwarded-for", forwarded);
    }
    let response = request.send().await.expect("request sent");
    (response.status(), response.headers().clone())
}

/// Asserts a 429 in the envelope with `type: rate_limit_exceeded`.
fn assert_rate_limited(status: StatusCode, body: &Value) {
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(
        (&body["error"]["type"], &body["error"]["code"]),
        (&json!("rate_limit_exceeded"), &json!("rate_limit_exceeded"))
    );
    assert!(body["error"]["message"].is_string(), "{body}");
}

#[tokio::test]
async fn a_burst_over_the_request_limit_gets_429_with_the_headers_then_the_bucket_refills() {
    // 60 a minute: a burst of 60, then one more each second.
    let addr = serve(limited(60, 100_000));
    let (status, headers, body) = chat(addr, None, &chat_body(FRANCE, json!({"max_tokens": 4}))).await;
    assert_eq!(status, 200, "{body}");
    for name in LIMIT_HEADERS {
        assert!(headers.contains_key(name), "{name} missing: {headers:?}");
    }
    assert_eq!(
        (number(&headers, "x-ratelimit-limit-requests"), number(&headers, "x-ratelimit-remaining-requests")),
        (60, 59)
    );
    assert_eq!(number(&headers, "x-ratelimit-limit-tokens"), 100_000);
    let mut admitted = 1;
    let refused = loop {
        let response = client().get(format!("http://{addr}/v1/models")).send().await.expect("request sent");
        if response.status() == 429 {
            break response;
        }
        assert_eq!(response.status(), 200);
        admitted += 1;
        assert!(admitted <= 65, "no 429 after {admitted} requests at 60 a minute");
    };
    assert!(admitted >= 60, "refused after only {admitted}");
    let headers = refused.headers().clone();
    assert_eq!(headers["retry-after"], "1", "one request comes back each second");
    assert_eq!(number(&headers, "x-ratelimit-remaining-requests"), 0);
    for name in LIMIT_HEADERS {
        assert!(headers.contains_key(name), "{name} missing on the 429: {headers:?}");
    }
    let reset = headers["x-ratelimit-reset-requests"].to_str().unwrap().to_string();
    assert!(reset.ends_with('s') && reset.len() >= 2, "{reset}");
    assert_rate_limited(StatusCode::TOO_MANY_REQUESTS, &refused.json().await.expect("JSON"));
    // Once `Retry-After` has passed, the bucket has refilled enough for a generation.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, headers, body) = chat(addr, None, &chat_body(FRANCE, json!({"max_tokens": 4}))).await;
    assert_eq!(status, 200, "{body}");
    assert!(number(&headers, "x-ratelimit-remaining-requests") <= 1, "{headers:?}");
}

#[tokio::test]
async fn unused_max_tokens_are_refunded_when_a_request_finishes_early() {
    let addr = serve(limited(0, 1000));
    // Charged prompt + 600 up front; the answer is about 8 tokens, so most of it comes back.
    let request = chat_body(FRANCE, json!({"temperature": 0, "max_tokens": 600}));
    let (status, headers, body) = chat(addr, None, &request).await;
    assert_eq!(status, 200, "{body}");
    assert!(!headers.contains_key("x-ratelimit-limit-requests"), "no request limit applies");
    let used = body["usage"]["total_tokens"].as_u64().expect("usage");
    assert!(used < 100, "{body}");
    let remaining = number(&headers, "x-ratelimit-remaining-tokens");
    // What is left is the limit less what was used (plus a little refill), not less the charge.
    assert!((1000 - used..=1000 - used + 20).contains(&remaining), "{remaining} left after using {used}");
    // Without the refund the same request would not fit again (2 × 630 > 1000).
    let (status, headers, body) = chat(addr, None, &request).await;
    assert_eq!(status, 200, "{body}");
    let remaining = number(&headers, "x-ratelimit-remaining-tokens");
    assert!((1000 - 2 * used..=1000 - 2 * used + 40).contains(&remaining), "{remaining} left after using 2 × {used}");
    // A streamed answer is refunded when its stream ends: the next response shows it.
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let response = client().post(format!("http://{addr}/v1/chat/completions")).json(&streamed).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let charged = number(response.headers(), "x-ratelimit-remaining-tokens");
    assert!(charged < remaining - 600, "{charged}: the stream is charged prompt + 600 while it runs");
    response.text().await.expect("the whole stream");
    let (_, headers) = models(addr, None, None).await;
    let after = number(&headers, "x-ratelimit-remaining-tokens");
    assert!(after + used + 5 >= remaining && after > charged + 500, "{after} left after the stream (was {remaining})");
}

#[tokio::test]
async fn a_request_without_max_tokens_fits_a_limit_smaller_than_the_context() {
    // 1,000 tokens a minute against an 8,192-token context: reserving the rest of the context
    // would refuse every request that leaves `max_tokens` out, as OpenAI's clients do by default.
    let addr = serve(limited(0, 1000));
    let (status, headers, body) = chat(addr, None, &chat_body(FRANCE, json!({"temperature": 0}))).await;
    assert_eq!(status, 200, "{body}");
    let used = body["usage"]["total_tokens"].as_u64().expect("usage");
    let remaining = number(&headers, "x-ratelimit-remaining-tokens");
    assert!((1000 - used..=1000 - used + 20).contains(&remaining), "{remaining} left after using {used}");
}

#[tokio::test]
async fn a_running_request_holds_its_tokens_until_its_client_leaves() {
    let addr = serve(limited(0, 1000));
    let long = chat_body("Count to a thousand.", json!({"max_tokens": 600, "ignore_eos": true, "stream": true}));
    let response = client().post(format!("http://{addr}/v1/chat/completions")).json(&long).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    stream.next().await.expect("a first chunk").expect("bytes");
    // The running stream holds prompt + 600 of 1000: another 600 does not fit yet.
    let (status, headers, body) = chat(addr, None, &chat_body(FRANCE, json!({"max_tokens": 600}))).await;
    assert_rate_limited(status, &body);
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("tokens per minute")), "{body}");
    let wait: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert!(number(&headers, "x-ratelimit-remaining-tokens") < 600, "{headers:?}");
    // More than the bucket ever holds: refused, and no point retrying.
    let (status, headers, body) = chat(addr, None, &chat_body(FRANCE, json!({"max_tokens": 2000}))).await;
    assert_rate_limited(status, &body);
    assert!(!headers.contains_key("retry-after"), "{headers:?}");
    // The client leaves: the stream is aborted and what it did not generate comes back.
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (_, headers) = models(addr, None, None).await;
        if number(&headers, "x-ratelimit-remaining-tokens") >= 700 {
            break;
        }
        assert!(Instant::now() < deadline, "no refund after the client left: {headers:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _, body) = chat(addr, None, &chat_body(FRANCE, json!({"max_tokens": 600}))).await;
    assert_eq!(status, 200, "{body}");
}

/// A keys file in the temporary folder, removed on drop.
struct KeysFile(std::path::PathBuf);

impl KeysFile {
    fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("sluice-limits-{}-{name}", std::process::id()));
        std::fs::write(&path, text).expect("keys file written");
        Self(path)
    }
}

impl Drop for KeysFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn keys_from_the_keys_file_authenticate_with_their_own_limits() {
    let file =
        KeysFile::new("keys", "# team keys\nsk-alpha-1111 alpha rpm=2\nsk-beta-2222 beta priority=3 # batch\n\n");
    let settings = Settings {
        model: Some(model_path()),
        served_model_name: Some(MODEL.into()),
        api_keys: Some(vec!["sk-env-3333".into()]),
        api_key_file: Some(file.0.clone()),
        rate_limit_rpm: Some(100),
        ..Settings::default()
    };
    let api = ServerConfig::load(settings).expect("a valid configuration").api;
    let names: Vec<&str> = api.api_keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names[1..], ["alpha", "beta"]);
    assert!(names[0].starts_with("key-") && names[0].len() == 12, "{names:?}");
    let addr = serve(api);
    let (status, headers) = models(addr, None, None).await;
    assert_eq!(status, 401);
    assert!(!headers.contains_key("x-ratelimit-limit-requests"), "limits apply after authentication");
    assert_eq!(models(addr, Some("sk-alpha-111"), None).await.0, 401);
    // alpha: its own 2 a minute.
    for remaining in [1, 0] {
        let (status, headers) = models(addr, Some("sk-alpha-1111"), None).await;
        assert_eq!((status, number(&headers, "x-ratelimit-remaining-requests")), (StatusCode::OK, remaining));
        assert_eq!(number(&headers, "x-ratelimit-limit-requests"), 2);
    }
    let (status, headers, body) = chat(addr, Some("sk-alpha-1111"), &chat_body(FRANCE, json!({"max_tokens": 2}))).await;
    assert_rate_limited(status, &body);
    assert!(headers.contains_key("retry-after"));
    // beta and the key from the environment: the default 100, each in a bucket of its own.
    let (status, headers, body) = chat(addr, Some("sk-beta-2222"), &chat_body(FRANCE, json!({"max_tokens": 2}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (number(&headers, "x-ratelimit-limit-requests"), number(&headers, "x-ratelimit-remaining-requests")),
        (100, 99)
    );
    let (status, headers) = models(addr, Some("sk-env-3333"), None).await;
    assert_eq!((status, number(&headers, "x-ratelimit-remaining-requests")), (StatusCode::OK, 99));
}

#[tokio::test]
async fn client_addresses_have_their_own_buckets_and_forwarded_ones_count_only_behind_a_trusted_proxy() {
    let direct = serve(limited(1, 0));
    assert_eq!(models(direct, None, Some("198.51.100.1")).await.0, 200);
    // Any client can write X-Forwarded-For: without a trusted proxy it is the socket's address that counts.
    assert_eq!(models(direct, None, Some("198.51.100.2")).await.0, 429);
    let proxied =
        serve(ApiConfig { rate_limit: RateLimitConfig { rpm: 1, tpm: 0, trusted_proxy: true }, ..api_config() });
    assert_eq!(models(proxied, None, Some("198.51.100.1")).await.0, 200);
    assert_eq!(models(proxied, None, Some("198.51.100.1")).await.0, 429);
    assert_eq!(models(proxied, None, Some("203.0.113.9, 198.51.100.2")).await.0, 200, "the proxy's entry is the last");
    assert_eq!(models(proxied, None, Some("198.51.100.2")).await.0, 429);
    assert_eq!(models(proxied, None, None).await.0, 200, "no header: the socket's address");
}

#[tokio::test]
async fn the_metrics_key_guards_what_it_is_put_on_and_nothing_else() {
    let api =
        ApiConfig { api_keys: vec!["sk-api".into()], metrics_key: Some(ApiKey::new("sk-metrics")), ..api_config() };
    let for_state = |api: ApiConfig| {
        let state = ready_state(api);
        axum::Router::new()
            .route("/metrics", get(|| async { "sluice_up 1\n" }))
            .route_layer(from_fn_with_state(state.clone(), auth::require_metrics_key))
            .with_state(state)
    };
    let metrics = |key: Option<&str>| {
        let request = Request::get("/metrics");
        let request = match key {
            Some(key) => request.header(header::AUTHORIZATION, format!("Bearer {key}")),
            None => request,
        };
        request.body(Body::empty()).unwrap()
    };
    let guarded = for_state(api.clone());
    for (key, status) in [(None, 401), (Some("sk-api"), 401), (Some("sk-metrics"), 200)] {
        let response = guarded.clone().oneshot(metrics(key)).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{key:?}");
    }
    // The metrics key is not an API key.
    let api_router = sluice_server::router(ready_state(api));
    let response = api_router
        .oneshot(
            Request::get("/v1/models").header(header::AUTHORIZATION, "Bearer sk-metrics").body(Body::empty()).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    // Without a metrics key, `/metrics` is open.
    let open = for_state(api_config());
    assert_eq!(open.oneshot(metrics(None)).await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_logs_key_names_not_keys_and_a_full_queue_answers_503_with_retry_after() {
    const SECRET: &str = "sk-ops-5f3c9a1d7e";
    let file = KeysFile::new("binary-keys", &format!("{SECRET} ops\n"));
    let keys = file.0.display().to_string();
    // One running, one waiting: a third at once finds the queue full.
    let args = ["--api-key-file", &keys, "--max-num-seqs", "1", "--max-waiting", "1", "--served-model-name", MODEL];
    let mut server = ChildServer::start(&args, &[]);
    let body = chat_body("Count to a thousand.", json!({"max_tokens": 200, "ignore_eos": true, "stream": true}));
    let send = || client().post(server.url("/v1/chat/completions")).bearer_auth(SECRET).json(&body).send();
    let responses = futures_util::future::join_all((0..4).map(|_| send())).await;
    let responses: Vec<reqwest::Response> = responses.into_iter().map(|r| r.expect("an answer")).collect();
    let statuses: Vec<u16> = responses.iter().map(|r| r.status().as_u16()).collect();
    assert!(statuses.contains(&200) && statuses.contains(&503), "{statuses:?}");
    for refused in responses.into_iter().filter(|r| r.status() == 503) {
        assert_eq!(refused.headers()["retry-after"], "1");
        let body: Value = refused.json().await.expect("JSON");
        assert_eq!((&body["error"]["type"], &body["error"]["code"]), (&json!("server_error"), &json!("overloaded")));
    }
    // Every line so far is free of the key; the request log names it.
    let line = server.wait_for_log(
        |v| {
            assert!(!v.to_string().contains(SECRET), "the key was logged: {v}");
            v["message"] == "request finished" && v["status"] == 200
        },
        Duration::from_secs(60),
    );
    assert_eq!(line["api_key"], "ops", "{line}");
}

//! The response cache and idempotency keys, end to end on a real socket with the real default
//! model. Tests that count the engine's generated tokens take the lock exclusively.

mod common;

use std::sync::LazyLock;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::RwLock;

use common::{api_config, chat_body, client, ready_state, TestServer};
use sluice_server::ApiConfig;

static SERVER: LazyLock<TestServer> = LazyLock::new(|| TestServer::start(ready_state(api_config())));

/// Shared by tests that only talk to the server; exclusive for those that count generated tokens.
static ENGINE_IDLE: RwLock<()> = RwLock::const_new(());

fn url(path: &str) -> String {
    SERVER.url(path)
}

/// Status, `x-cache`, and the body (JSON, or the raw text of a stream).
async fn send(body: &Value, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut req = client().post(url("/v1/chat/completions")).json(body);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let r = req.send().await.expect("request sent");
    let cache = r.headers().get("x-cache").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (r.status().as_u16(), cache, r.text().await.expect("a body"))
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The stream's events with `id` and `created` taken out (a replay gets fresh ones).
fn framing(raw: &str) -> Vec<Value> {
    assert!(raw.ends_with("data: [DONE]\n\n"), "{raw}");
    raw.split_terminator("\n\n")
        .filter(|e| !e.starts_with(':'))
        .map(|e| {
            let data = e.strip_prefix("data: ").unwrap_or_else(|| panic!("not a data event: {e:?}"));
            let mut v: Value = serde_json::from_str(data).unwrap_or(Value::String(data.into()));
            if let Some(o) = v.as_object_mut() {
                assert!(o.remove("id").is_some() && o.remove("created").is_some(), "{data}");
            }
            v
        })
        .collect()
}

fn generated_tokens() -> u64 {
    SERVER.state.engine().expect("ready").stats().generated_tokens
}

/// The engine's stats are published once per step: wait for them to settle.
async fn settled_generated_tokens() -> u64 {
    let mut last = generated_tokens();
    loop {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let now = generated_tokens();
        if now == last {
            return now;
        }
        last = now;
    }
}

#[tokio::test]
async fn deterministic_requests_miss_then_hit_and_no_cache_bypasses() {
    let _shared = ENGINE_IDLE.read().await;
    let body = chat_body("Name three colors.", json!({"temperature": 0, "max_tokens": 12}));
    let (status, first_cache, first) = send(&body, &[]).await;
    assert_eq!((status, first_cache.as_str()), (200, "miss"), "{first}");
    let (status, cache, second) = send(&body, &[]).await;
    assert_eq!((status, cache.as_str()), (200, "hit"), "{second}");
    let (first, second) = (json_of(&first), json_of(&second));
    assert_eq!(first["choices"], second["choices"]);
    assert_eq!(first["usage"], second["usage"]);
    assert_ne!(first["id"], second["id"], "a replay is a new response");
    let (_, cache, third) = send(&body, &[("cache-control", "no-cache")]).await;
    assert_eq!(cache, "bypass");
    assert_eq!(json_of(&third)["choices"], first["choices"]);
    // Sampled without a seed: never cached. With a seed: cached.
    let sampled = chat_body("Name three colors.", json!({"temperature": 0.9, "max_tokens": 12}));
    for _ in 0..2 {
        assert_eq!(send(&sampled, &[]).await.1, "bypass");
    }
    let seeded = chat_body("Name three colors.", json!({"temperature": 0.9, "seed": 7, "max_tokens": 12}));
    assert_eq!(send(&seeded, &[]).await.1, "miss");
    assert_eq!(send(&seeded, &[]).await.1, "hit");
    // Any sampling field is part of the key.
    let other = chat_body("Name three colors.", json!({"temperature": 0, "max_tokens": 12, "top_k": 5}));
    assert_eq!(send(&other, &[]).await.1, "miss");
}

#[tokio::test]
async fn a_replayed_stream_is_framed_like_the_live_one() {
    let _shared = ENGINE_IDLE.read().await;
    let body = chat_body(
        "Write a haiku about rivers.",
        json!({"temperature": 0, "max_tokens": 20, "stream": true, "stream_options": {"include_usage": true}}),
    );
    let (_, live_cache, live) = send(&body, &[]).await;
    let (_, replay_cache, replay) = send(&body, &[]).await;
    assert_eq!((live_cache.as_str(), replay_cache.as_str()), ("miss", "hit"));
    let (live, replay) = (framing(&live), framing(&replay));
    assert!(live.len() > 4, "{live:?}");
    assert_eq!(live, replay);
    assert_eq!(live.last(), Some(&Value::String("[DONE]".into())));
    // The same answer serves a whole (non-streamed) request: its text is the deltas'.
    let mut whole = body.clone();
    whole["stream"] = json!(false);
    let (_, cache, answer) = send(&whole, &[]).await;
    let deltas: String = live.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(
        (cache.as_str(), json_of(&answer)["choices"][0]["message"]["content"].as_str()),
        ("hit", Some(&*deltas))
    );
}

#[tokio::test]
async fn two_identical_requests_in_flight_generate_once() {
    let _exclusive = ENGINE_IDLE.write().await;
    let body = chat_body("Tell me about the sea.", json!({"temperature": 0, "max_tokens": 24, "ignore_eos": true}));
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let before = settled_generated_tokens().await;
    // The first streams; once its first event is here it is surely generating.
    let first = client().post(url("/v1/chat/completions")).json(&streamed).send().await.unwrap();
    assert_eq!(first.headers()["x-cache"], "miss");
    let mut first_events = first.bytes_stream();
    let head = first_events.next().await.expect("a first event").unwrap();
    let (second, rest) = tokio::join!(send(&body, &[]), async {
        let mut rest = head.to_vec();
        while let Some(chunk) = first_events.next().await {
            rest.extend_from_slice(&chunk.unwrap());
        }
        String::from_utf8(rest).unwrap()
    });
    let (status, cache, second) = second;
    assert_eq!((status, cache.as_str()), (200, "hit"), "{second}");
    let deltas: String = framing(&rest).iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(json_of(&second)["choices"][0]["message"]["content"].as_str(), Some(&*deltas));
    assert_eq!(json_of(&second)["usage"]["completion_tokens"], 24);
    // 24 tokens generated in all: one generation, not two.
    assert_eq!(settled_generated_tokens().await - before, 24);
}

#[tokio::test]
async fn a_waiter_takes_over_when_the_first_client_goes_away() {
    let _exclusive = ENGINE_IDLE.write().await;
    // Long enough that the first request is still generating when its client leaves (300 ms in):
    // 512 tokens take seconds even at this engine's single-stream speed.
    let body = chat_body("Describe a mountain.", json!({"temperature": 0, "max_tokens": 512, "ignore_eos": true}));
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let first = client().post(url("/v1/chat/completions")).json(&streamed).send().await.unwrap();
    let mut first_events = first.bytes_stream();
    first_events.next().await.expect("a first event").unwrap();
    let waiter = tokio::spawn(async move { send(&body, &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(first_events);
    let (status, cache, answer) =
        tokio::time::timeout(Duration::from_secs(60), waiter).await.expect("no hang").unwrap();
    assert_eq!((status, cache.as_str()), (200, "miss"), "{answer}");
    assert_eq!(json_of(&answer)["usage"]["completion_tokens"], 512);
}

async fn send_keyed(path: &str, body: &Value, key: &str, auth: Option<&str>) -> (u16, bool, String) {
    let mut req = client().post(url(path)).json(body).header("idempotency-key", key);
    if let Some(auth) = auth {
        req = req.header("authorization", auth);
    }
    let r = req.send().await.expect("request sent");
    let replayed = r.headers().get("idempotent-replayed").is_some();
    (r.status().as_u16(), replayed, r.text().await.unwrap())
}

#[tokio::test]
async fn a_retry_with_the_same_idempotency_key_gets_the_first_response() {
    let _shared = ENGINE_IDLE.read().await;
    // Sampled, so only the key (not the cache) can explain an identical answer.
    let body = chat_body("Invent a word.", json!({"temperature": 1.0, "max_tokens": 8}));
    let key = format!("retry-{}", std::process::id());
    let (status, replayed, first) = send_keyed("/v1/chat/completions", &body, &key, None).await;
    assert_eq!((status, replayed), (200, false), "{first}");
    let (status, replayed, retry) = send_keyed("/v1/chat/completions", &body, &key, None).await;
    assert_eq!((status, replayed), (200, true), "{retry}");
    assert_eq!(retry, first, "byte for byte, same id");
    assert!(json_of(&first)["id"].as_str().is_some_and(|id| id.starts_with("chatcmpl-")));
    // Another body with the same key: 409 in the envelope.
    let changed = chat_body("Invent two words.", json!({"temperature": 1.0, "max_tokens": 8}));
    let (status, _, conflict) = send_keyed("/v1/chat/completions", &changed, &key, None).await;
    assert_eq!(status, 409, "{conflict}");
    let error = json_of(&conflict);
    assert_eq!(
        (error["error"]["type"].as_str(), error["error"]["code"].as_str()),
        (Some("invalid_request_error"), Some("idempotency_key_reused"))
    );
    // Keys are scoped by the caller's credentials.
    let (status, replayed, other) = send_keyed("/v1/chat/completions", &body, &key, Some("Bearer someone-else")).await;
    assert_eq!((status, replayed), (200, false));
    assert_ne!(json_of(&other)["id"], json_of(&first)["id"]);
    // A malformed key is a 400.
    let (status, _, _) = send_keyed("/v1/chat/completions", &body, "", None).await;
    assert_eq!(status, 400);
    // A body over the limit is still a 413 when it carries a key.
    let huge = chat_body(&"word ".repeat(1 << 20), json!({"max_tokens": 1}));
    let (status, _, error) = send_keyed("/v1/chat/completions", &huge, &format!("{key}-huge"), None).await;
    assert_eq!(status, 413, "{error}");
    assert_eq!(json_of(&error)["error"]["code"], "request_too_large");
}

#[tokio::test]
async fn a_response_larger_than_the_idempotency_store_is_not_kept() {
    let _shared = ENGINE_IDLE.read().await;
    // A chat completion's JSON alone is over 200 bytes.
    let small = TestServer::start(ready_state(ApiConfig { idempotency_store_size: 200, ..api_config() }));
    let body = chat_body("Invent a word.", json!({"temperature": 1.0, "max_tokens": 8}));
    let send = || async {
        let request = client().post(small.url("/v1/chat/completions")).json(&body).header("idempotency-key", "big");
        let r = request.send().await.expect("request sent");
        let replayed = r.headers().get("idempotent-replayed").is_some();
        (r.status().as_u16(), replayed, json_of(&r.text().await.unwrap()))
    };
    let (status, replayed, first) = send().await;
    assert_eq!((status, replayed), (200, false), "{first}");
    let (status, replayed, retry) = send().await;
    assert_eq!((status, replayed), (200, false), "not kept, so the retry runs again: {retry}");
    assert_ne!(first["id"], retry["id"]);
}

#[tokio::test]
async fn idempotent_streams_and_concurrent_retries_replay_the_first_answer() {
    let _shared = ENGINE_IDLE.read().await;
    let key = format!("stream-{}", std::process::id());
    let body = json!({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "stream": true});
    let (first, second) = tokio::join!(send_keyed("/v1/completions", &body, &key, None), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        send_keyed("/v1/completions", &body, &key, None).await
    });
    assert_eq!((first.0, second.0), (200, 200));
    assert_eq!(first.1 as u8 + second.1 as u8, 1, "exactly one of them is the replay");
    assert_eq!(first.2, second.2, "the same events, byte for byte");
    assert!(first.2.ends_with("data: [DONE]\n\n"));
}

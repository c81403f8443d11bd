//! The `sluice` binary itself: its help, its configuration errors, keep-alive comments, and a
//! graceful SIGTERM while requests are in flight.

mod common;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;

use common::child::{sluice, ChildServer};
use common::{chat_body, MODEL};

#[test]
fn help_documents_every_flag_and_its_environment_twin() {
    let out = sluice().arg("--help").output().expect("sluice --help runs");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let settings = [
        "config",
        "model",
        "served-model-name",
        "host",
        "port",
        "device",
        "dtype",
        "cpu-weights",
        "max-batch-size",
        "batch-timeout",
        "max-batch-tokens",
        "max-num-seqs",
        "max-waiting",
        "kv-cache-memory",
        "block-size",
        "max-model-len",
        "seed",
        "max-prompt-tokens",
        "body-limit",
        "request-timeout",
        "shutdown-grace",
        "sse-keep-alive",
        "api-keys",
        "api-key-file",
        "metrics-key",
        "rate-limit-rpm",
        "rate-limit-tpm",
        "trusted-proxy",
        "log-format",
        "log-level",
    ];
    for flag in settings {
        assert!(help.contains(&format!("--{flag}")), "--{flag} missing from:\n{help}");
        let env = if flag == "log-level" {
            "SLUICE_LOG".to_string()
        } else {
            format!("SLUICE_{}", flag.replace('-', "_").to_uppercase())
        };
        assert!(help.contains(&format!("[env: {env}")), "{env} missing from:\n{help}");
    }
}

#[test]
fn an_invalid_setting_exits_with_a_message_naming_it() {
    let out = sluice().args(["serve", "--model", "/nonexistent/model.gguf"]).output().expect("sluice runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`model`"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = sluice().args(["serve", "--max-waiting", "0"]).env("SLUICE_MODEL", "/dev/null").output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`max_waiting`"));
}

/// Streamed chat requests to one server.
struct Chat {
    client: reqwest::Client,
    url: String,
}

impl Chat {
    async fn send(&self, content: &str, extra: serde_json::Value) -> reqwest::Response {
        let mut body = chat_body(content, extra);
        body["stream"] = json!(true);
        self.client.post(&self.url).json(&body).send().await.expect("request sent")
    }
}

/// Appends the rest of a byte stream to `raw`.
async fn read_rest(
    stream: &mut (impl futures_util::Stream<Item = reqwest::Result<axum::body::Bytes>> + Unpin),
    raw: &mut String,
) {
    while let Some(chunk) = stream.next().await {
        raw.push_str(&String::from_utf8_lossy(&chunk.expect("stream bytes")));
    }
}

/// A lone request waits out the admission window with keep-alive comments, then is logged once.
async fn keep_alive_and_request_log(server: &mut ChildServer, chat: &Chat) {
    let mut raw = String::new();
    read_rest(&mut chat.send("Say hi.", json!({"max_tokens": 2})).await.bytes_stream(), &mut raw).await;
    assert!(raw.contains("\n\n:\n\n"), "no keep-alive comment while queued: {raw:?}");
    // Its one log line, at the end of its stream, with id, route, status, tokens and timings.
    let line =
        server.wait_for_log(|v| v["message"] == "request finished" && v["status"] == 200, Duration::from_secs(10));
    assert_eq!(
        (&line["route"], &line["method"], &line["completion_tokens"]),
        (&json!("/v1/chat/completions"), &json!("POST"), &json!(2))
    );
    assert_eq!(line["request_id"].as_str().map(str::len), Some(32), "{line}");
    assert!(line["prompt_tokens"].as_u64() > Some(5), "{line}");
    // The 400 ms admission window is queue time, and counts towards the time to first token.
    let (queue, ttft, total) = (line["queue_ms"].as_f64(), line["ttft_ms"].as_f64(), line["total_ms"].as_f64());
    assert!(queue >= Some(300.0) && ttft >= queue && total >= ttft, "{line}");
}

/// After the signal: `/health` turns 503 `draining` and new requests get 503 with `Retry-After`.
async fn assert_draining(server: &ChildServer, chat: &Chat) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let health = chat.client.get(server.url("/health")).send().await.expect("health answers");
        if health.status() == 503 {
            assert_eq!(health.json::<serde_json::Value>().await.expect("JSON"), json!({"status": "draining"}));
            break;
        }
        assert!(Instant::now() < deadline, "/health never turned 503");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = chat.send("Hello?", json!({})).await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_while_queued_then_sigterm_drains_in_flight_requests_and_exits_zero() {
    // A 400 ms admission window keeps a lone request in the queue long enough for keep-alives.
    let args = [
        "--batch-timeout",
        "400ms",
        "--max-batch-size",
        "64",
        "--sse-keep-alive",
        "100ms",
        "--shutdown-grace",
        "5s",
        "--served-model-name",
        MODEL,
    ];
    let mut server = ChildServer::start(&args, &[]);
    let chat = Chat { client: reqwest::Client::new(), url: server.url("/v1/chat/completions") };
    keep_alive_and_request_log(&mut server, &chat).await;

    // One request that outlives the grace period, one that finishes within it.
    let long = chat.send("Count to a thousand.", json!({"max_tokens": 2000, "ignore_eos": true})).await;
    let short = chat.send("Count to ten.", json!({"max_tokens": 8, "ignore_eos": true})).await;
    assert_eq!((long.status().as_u16(), short.status().as_u16()), (200, 200));
    let (mut long, mut short) = (long.bytes_stream(), short.bytes_stream());
    let mut long_raw = String::new();
    while long_raw.matches("\"content\"").count() < 3 {
        long_raw.push_str(&String::from_utf8_lossy(&long.next().await.expect("more").expect("bytes")));
    }
    let mut short_raw = String::from_utf8_lossy(&short.next().await.expect("a chunk").expect("bytes")).into_owned();
    let signalled = Instant::now();
    server.sigterm();
    assert_draining(&server, &chat).await;

    read_rest(&mut short, &mut short_raw).await;
    let finished = short_raw.contains("\"finish_reason\":\"length\"") && short_raw.ends_with("data: [DONE]\n\n");
    assert!(finished && !short_raw.contains("\"error\""), "{short_raw}");
    read_rest(&mut long, &mut long_raw).await;
    assert!(signalled.elapsed() >= Duration::from_secs(5), "cut before the grace period: {:?}", signalled.elapsed());
    assert!(long_raw.contains("\"code\":\"shutting_down\""), "no error event: {long_raw}");
    assert!(long_raw.ends_with("data: [DONE]\n\n"), "{long_raw}");
    let status = tokio::task::spawn_blocking(move || server.wait(Duration::from_secs(20))).await.expect("joined");
    assert!(status.success(), "exit status {status:?}");
}

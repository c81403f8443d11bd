//! End to end on a real socket (`127.0.0.1:0`) with the real default model: one server for the
//! whole binary. Tests that count the engine's blocks take the lock exclusively; the others share it.

mod common;

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::RwLock;

use common::{api_config, chat_body, client, ready_state, TestServer, MODEL};

static SERVER: LazyLock<TestServer> = LazyLock::new(|| TestServer::start(ready_state(api_config())));

/// Shared by tests that only talk to the server; exclusive for those that count engine blocks.
static ENGINE_IDLE: RwLock<()> = RwLock::const_new(());

fn url(path: &str) -> String {
    SERVER.url(path)
}

async fn post_json(path: &str, body: &Value) -> (reqwest::StatusCode, reqwest::header::HeaderMap, Value) {
    let r = client().post(url(path)).json(body).send().await.expect("request sent");
    let (status, headers) = (r.status(), r.headers().clone());
    (status, headers, r.json().await.expect("a JSON body"))
}

/// A whole event stream: its headers and raw text.
async fn post_stream(path: &str, body: &Value) -> (reqwest::header::HeaderMap, String) {
    let r = client().post(url(path)).json(body).send().await.expect("request sent");
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    (headers, r.text().await.expect("the stream's text"))
}

/// The `data:` payloads of an event stream, `[DONE]` included; keep-alive comments are skipped.
fn events(raw: &str) -> Vec<String> {
    assert!(raw.ends_with("\n\n"), "the stream must end on an event boundary: {raw:?}");
    raw.split_terminator("\n\n")
        .filter(|e| !e.starts_with(':'))
        .map(|e| e.strip_prefix("data: ").unwrap_or_else(|| panic!("not a data event: {e:?}")).to_string())
        .collect()
}

/// The JSON chunks of a stream (everything before `[DONE]`, which must come last and once).
fn chunks(raw: &str) -> Vec<Value> {
    let events = events(raw);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{raw}");
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
    events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).expect("a JSON chunk")).collect()
}

/// Chat content of choice `index`, concatenated over the chunks.
fn content_of(chunks: &[Value], index: u64) -> String {
    let choice = |c: &Value| c["choices"].as_array().cloned().unwrap_or_default();
    chunks
        .iter()
        .flat_map(choice)
        .filter(|ch| ch["index"] == index)
        .filter_map(|ch| ch["delta"]["content"].as_str().map(str::to_string))
        .collect()
}

const FRANCE: &str = "What is the capital of France?";

#[tokio::test]
async fn chat_non_stream_answers_like_openai() {
    let _shared = ENGINE_IDLE.read().await;
    let (status, headers, body) =
        post_json("/v1/chat/completions", &chat_body(FRANCE, json!({"temperature": 0, "max_tokens": 20}))).await;
    assert_eq!(status, 200, "{body}");
    let id = headers["x-request-id"].to_str().unwrap();
    assert_eq!(body["id"], format!("chatcmpl-{id}"));
    assert_eq!((&body["object"], &body["model"]), (&json!("chat.completion"), &json!(MODEL)));
    let choice = &body["choices"][0];
    assert_eq!(choice["message"], json!({"role": "assistant", "content": "The capital of France is Paris."}));
    assert_eq!(choice["finish_reason"], "stop");
    let usage = &body["usage"];
    assert!(usage["prompt_tokens"].as_u64() > Some(5) && usage["completion_tokens"].as_u64() > Some(5), "{usage}");
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn chat_stream_is_framed_exactly_and_equals_the_non_stream_answer() {
    let _shared = ENGINE_IDLE.read().await;
    let request = chat_body(FRANCE, json!({"temperature": 0, "max_tokens": 20}));
    let (_, _, whole) = post_json("/v1/chat/completions", &request).await;
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let (headers, raw) = post_stream("/v1/chat/completions", &streamed).await;
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache");
    // Byte for byte around the end: the finish chunk's JSON, a blank line, [DONE], a blank line.
    assert!(raw.starts_with("data: {"), "{raw:?}");
    assert!(raw.ends_with("}\n\ndata: [DONE]\n\n"), "{raw:?}");
    assert!(!raw.contains('\r') && !raw.contains("\"usage\""), "{raw:?}");
    let chunks = chunks(&raw);
    let id = headers["x-request-id"].to_str().unwrap();
    assert!(chunks.iter().all(|c| c["id"] == format!("chatcmpl-{id}") && c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks[1..].iter().all(|c| c["choices"][0]["delta"].get("role").is_none()));
    let last = &chunks[chunks.len() - 1]["choices"][0];
    assert_eq!((&last["finish_reason"], &last["delta"]), (&json!("stop"), &json!({})));
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert_eq!(content_of(&chunks, 0), whole["choices"][0]["message"]["content"].as_str().unwrap());
}

#[tokio::test]
async fn include_usage_sends_a_last_chunk_with_empty_choices() {
    let _shared = ENGINE_IDLE.read().await;
    let request = chat_body(FRANCE, json!({"temperature": 0, "max_tokens": 4}));
    let (_, _, whole) = post_json("/v1/chat/completions", &request).await;
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (_, raw) = post_stream("/v1/chat/completions", &streamed).await;
    let chunks = chunks(&raw);
    let usage_chunk = &chunks[chunks.len() - 1];
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], whole["usage"]);
    assert_eq!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn usage_counts_the_prompt_tokens_found_in_the_prefix_cache() {
    let _shared = ENGINE_IDLE.read().await;
    let prompt = "In one line: what does a cache do?";
    // Other `max_tokens` each time, so the response cache does not answer in the engine's place.
    let body = |max_tokens: u64| chat_body(prompt, json!({"temperature": 0, "max_tokens": max_tokens}));
    let (_, _, first) = post_json("/v1/chat/completions", &body(3)).await;
    let (_, _, second) = post_json("/v1/chat/completions", &body(4)).await;
    let prompt_tokens = second["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(first["usage"]["prompt_tokens"].as_u64(), Some(prompt_tokens));
    // Every whole block of the prompt but the one holding its last token, which always runs.
    let all_cached = (prompt_tokens - 1) / 16 * 16;
    assert!(all_cached > 0);
    assert_eq!(second["usage"]["prompt_tokens_details"], json!({"cached_tokens": all_cached}), "{second}");
    let mut streamed = body(5);
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (_, raw) = post_stream("/v1/chat/completions", &streamed).await;
    let chunks = chunks(&raw);
    let usage = &chunks[chunks.len() - 1]["usage"];
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"].as_u64(), Some(all_cached), "{usage}");
}

#[tokio::test]
async fn response_format_json_schema_answers_json_that_matches_it() {
    let _shared = ENGINE_IDLE.read().await;
    let schema = json!({
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0}},
        "required": ["name", "age"],
        "additionalProperties": false
    });
    let format = json!({"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": true}});
    let request = chat_body("Invent a person.", json!({"temperature": 0, "max_tokens": 80, "response_format": format}));
    let (status, _, body) = post_json("/v1/chat/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    let person: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("not JSON ({e}): {content}"));
    assert!(person["name"].is_string() && person["age"].is_u64(), "{person}");
    assert_eq!(person.as_object().unwrap().len(), 2, "{person}");
    // Streamed, the deltas add up to the same JSON.
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let (_, raw) = post_stream("/v1/chat/completions", &streamed).await;
    assert_eq!(content_of(&chunks(&raw), 0), content);
    // The same request without the format answers in prose: the response cache keeps them apart.
    let mut free = request.clone();
    free.as_object_mut().unwrap().remove("response_format");
    let (_, _, prose) = post_json("/v1/chat/completions", &free).await;
    assert_ne!(prose["choices"][0]["message"]["content"].as_str(), Some(content));
    // json_object: any object.
    let object = chat_body(
        "Describe the sea.",
        json!({"temperature": 0, "max_tokens": 120, "response_format": {"type": "json_object"}}),
    );
    let (status, _, body) = post_json("/v1/chat/completions", &object).await;
    assert_eq!(status, 200, "{body}");
    if body["choices"][0]["finish_reason"] == "stop" {
        let text = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(serde_json::from_str::<Value>(text).is_ok_and(|v| v.is_object()), "{text}");
    }
}

#[tokio::test]
async fn vllm_structured_outputs_choice_and_regex_hold_the_answer() {
    let _shared = ENGINE_IDLE.read().await;
    let choices = ["yes", "no"];
    for extra in [
        json!({"structured_outputs": {"choice": choices}}),
        json!({"guided_choice": choices, "temperature": 1.0, "seed": 3}),
    ] {
        let mut fields = json!({"temperature": 0, "max_tokens": 8});
        fields.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (status, _, body) = post_json("/v1/chat/completions", &chat_body("Is water wet?", fields)).await;
        assert_eq!(status, 200, "{body}");
        let answer = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(choices.contains(&answer), "{extra}: {answer:?}");
    }
    let regex = json!({"prompt": "The year is", "max_tokens": 8, "temperature": 0, "guided_regex": " (19|20)[0-9]{2}"});
    let (status, _, body) = post_json("/v1/completions", &regex).await;
    assert_eq!(status, 200, "{body}");
    let text = body["choices"][0]["text"].as_str().unwrap();
    let year: u32 = text.trim().parse().unwrap_or_else(|_| panic!("{text:?}"));
    assert!((1900..2100).contains(&year) && text.len() == 5, "{text:?}");
    // vLLM also takes a schema as a JSON string.
    let integer = json!({"prompt": "Pick a number:", "max_tokens": 6, "temperature": 0, "guided_json": "{\"type\": \"integer\"}"});
    let (status, _, body) = post_json("/v1/completions", &integer).await;
    assert_eq!(status, 200, "{body}");
    let text = body["choices"][0]["text"].as_str().unwrap();
    assert!(body["choices"][0]["finish_reason"] == "length" || text.parse::<i64>().is_ok(), "{body}");
    // Two ways of constraining at once, a constraint we do not support, or one that does not
    // compile: 400 naming the field the request used.
    for (fields, param) in [
        (json!({"guided_choice": ["a"], "response_format": {"type": "json_object"}}), "guided_choice"),
        (json!({"structured_outputs": {"choice": ["a"], "regex": "b"}}), "structured_outputs.choice"),
        (json!({"structured_outputs": {"regex": "(unclosed"}}), "structured_outputs.regex"),
        (json!({"guided_regex": "a\\"}), "guided_regex"),
        (json!({"guided_choice": []}), "guided_choice"),
        (json!({"guided_grammar": "root ::= \"a\""}), "guided_grammar"),
        (json!({"structured_outputs": {}}), "structured_outputs"),
        (json!({"guided_json": "{\"type\": \"integer\", \"minimum\": 5, \"maximum\": 1}"}), "guided_json"),
        (json!({"structured_outputs": {"json": {"$ref": "#/nowhere"}}}), "structured_outputs.json"),
    ] {
        let (status, _, body) = post_json("/v1/chat/completions", &chat_body("hi", fields.clone())).await;
        assert_eq!(status, 400, "{fields}: {body}");
        assert_eq!(body["error"]["param"], param, "{fields}: {body}");
    }
    let (status, _, body) =
        post_json("/v1/chat/completions", &chat_body("hi", json!({"structured_outputs": {"grammar": "x"}}))).await;
    assert_eq!(status, 400, "an unsupported kind is refused, not ignored: {body}");
    assert!(body["error"]["param"].as_str().is_some_and(|p| p.starts_with("structured_outputs")), "{body}");
}

#[tokio::test]
async fn response_formats_that_cannot_work_are_400_naming_the_field() {
    let _shared = ENGINE_IDLE.read().await;
    for format in [
        json!({"type": "xml"}),
        json!({"type": "json_schema"}),
        json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/definitions/missing"}}}),
        json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 3, "maximum": 1}}}),
    ] {
        let request = chat_body("hi", json!({"max_tokens": 8, "response_format": format}));
        let (status, _, body) = post_json("/v1/chat/completions", &request).await;
        assert_eq!(status, 400, "{format}: {body}");
        let param = body["error"]["param"].as_str().unwrap_or_default();
        assert!(param.starts_with("response_format"), "{format}: {body}");
    }
}

#[tokio::test]
async fn stop_strings_end_the_answer_before_them() {
    let _shared = ENGINE_IDLE.read().await;
    let request = chat_body(FRANCE, json!({"temperature": 0, "max_tokens": 20, "stop": ["Paris", "Rome"]}));
    let (_, _, whole) = post_json("/v1/chat/completions", &request).await;
    assert_eq!(whole["choices"][0]["message"]["content"], "The capital of France is ");
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let (_, raw) = post_stream("/v1/chat/completions", &streamed).await;
    let chunks = chunks(&raw);
    assert_eq!(content_of(&chunks, 0), "The capital of France is ");
    assert_eq!(chunks[chunks.len() - 1]["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn n_choices_each_run_and_stream_under_their_index() {
    let _shared = ENGINE_IDLE.read().await;
    let request = chat_body("Name a colour.", json!({"n": 3, "temperature": 1.0, "seed": 11, "max_tokens": 6}));
    let (status, _, whole) = post_json("/v1/chat/completions", &request).await;
    assert_eq!(status, 200, "{whole}");
    let choices = whole["choices"].as_array().unwrap();
    assert_eq!(choices.iter().map(|c| c["index"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1, 2]);
    let completion = whole["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((3..=18).contains(&completion), "{whole}");
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let (_, raw) = post_stream("/v1/chat/completions", &streamed).await;
    let chunks = chunks(&raw);
    for (i, choice) in choices.iter().enumerate() {
        let mine: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]).filter(|c| c["index"] == i).collect();
        assert_eq!(mine[0]["delta"]["role"], "assistant", "choice {i}");
        assert_eq!(mine.iter().filter(|c| !c["finish_reason"].is_null()).count(), 1, "choice {i}");
        // Seeded sampling does not depend on the batch, so streamed choices equal whole ones.
        assert_eq!(content_of(&chunks, i as u64), choice["message"]["content"].as_str().unwrap(), "choice {i}");
    }
}

#[tokio::test]
async fn logprobs_in_chat_and_completions() {
    let _shared = ENGINE_IDLE.read().await;
    let request = chat_body(FRANCE, json!({"temperature": 0, "max_tokens": 5, "logprobs": true, "top_logprobs": 3}));
    let (_, _, whole) = post_json("/v1/chat/completions", &request).await;
    let content = whole["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    assert_eq!(content.len() as u64, whole["usage"]["completion_tokens"].as_u64().unwrap());
    let text: String = content.iter().map(|e| e["token"].as_str().unwrap()).collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
    for entry in &content {
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!((&top[0]["token"], &top[0]["logprob"]), (&entry["token"], &entry["logprob"]));
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(entry["bytes"], json!(entry["token"].as_str().unwrap().as_bytes()));
    }
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let (_, raw) = post_stream("/v1/chat/completions", &streamed).await;
    let streamed_content: Vec<Value> = chunks(&raw)
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(streamed_content, content);

    let body =
        json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "logprobs": 2});
    let (_, _, legacy) = post_json("/v1/completions", &body).await;
    let lp = &legacy["choices"][0]["logprobs"];
    let n = lp["tokens"].as_array().unwrap().len();
    assert_eq!(n, 4);
    assert_eq!((lp["token_logprobs"].as_array().unwrap().len(), lp["top_logprobs"].as_array().unwrap().len()), (n, n));
    assert!(lp["top_logprobs"].as_array().unwrap().iter().all(|t| t.as_object().unwrap().len() == 2));
    let offsets: Vec<u64> = lp["text_offset"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect();
    assert!(offsets[0] == 0 && offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
}

#[tokio::test]
async fn completions_stream_equals_the_non_stream_answer() {
    let _shared = ENGINE_IDLE.read().await;
    let body = json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0});
    let (_, _, whole) = post_json("/v1/completions", &body).await;
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (_, raw) = post_stream("/v1/completions", &streamed).await;
    let chunks = chunks(&raw);
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    assert_eq!(chunks[chunks.len() - 1]["choices"][0]["finish_reason"], whole["choices"][0]["finish_reason"]);
}

#[tokio::test]
async fn thirty_two_concurrent_streams_each_equal_their_own_non_stream_answer() {
    let _shared = ENGINE_IDLE.read().await;
    let topics = ["the sea", "a cat", "rain", "bread", "a clock", "the moon", "snow", "a river"];
    let styles = ["one sentence about", "a short title for", "three words about", "a question about"];
    let requests: Vec<Value> = styles
        .iter()
        .flat_map(|s| topics.iter().map(move |t| format!("Write {s} {t}.")))
        .map(|prompt| chat_body(&prompt, json!({"temperature": 0, "max_tokens": 12})))
        .collect();
    assert_eq!(requests.len(), 32);
    let whole = futures_util::future::join_all(requests.iter().map(|r| post_json("/v1/chat/completions", r))).await;
    let streamed = futures_util::future::join_all(requests.iter().map(|r| {
        let mut r = r.clone();
        r["stream"] = json!(true);
        async move { post_stream("/v1/chat/completions", &r).await.1 }
    }))
    .await;
    for ((_, _, whole), raw) in whole.iter().zip(&streamed) {
        let expected = whole["choices"][0]["message"]["content"].as_str().expect("an answer");
        assert!(!expected.is_empty());
        assert_eq!(content_of(&chunks(raw), 0), expected);
    }
}

/// Waits until the engine holds no request and no block.
async fn assert_engine_empties() {
    let engine = SERVER.state.engine().expect("ready").clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = engine.stats();
        if s.running == 0 && s.waiting == 0 && s.kv_blocks_used == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "blocks never came back: {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_frees_its_blocks() {
    let _exclusive = ENGINE_IDLE.write().await;
    let body =
        chat_body("Count from one to five hundred.", json!({"max_tokens": 1000, "ignore_eos": true, "stream": true}));
    let response = client().post(url("/v1/chat/completions")).json(&body).send().await.unwrap();
    let mut stream = response.bytes_stream();
    let mut seen = String::new();
    while seen.matches("\"content\"").count() < 4 {
        seen.push_str(&String::from_utf8_lossy(&stream.next().await.expect("more events").unwrap()));
    }
    let engine = SERVER.state.engine().unwrap().clone();
    assert!(engine.stats().running == 1 && engine.stats().kv_blocks_used > 0, "{:?}", engine.stats());
    drop(stream);
    assert_engine_empties().await;
}

#[tokio::test]
async fn a_client_that_disconnects_before_a_whole_answer_frees_its_blocks() {
    let _exclusive = ENGINE_IDLE.write().await;
    let body =
        chat_body("Count from one to five hundred.", json!({"max_tokens": 1000, "ignore_eos": true})).to_string();
    let mut socket = tokio::net::TcpStream::connect(SERVER.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(body.as_bytes()).await.unwrap();
    let engine = SERVER.state.engine().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while engine.stats().kv_blocks_used == 0 {
        assert!(Instant::now() < deadline, "the request never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(socket);
    assert_engine_empties().await;
    // The server is still fine afterwards.
    let mut probe = tokio::net::TcpStream::connect(SERVER.addr).await.unwrap();
    probe.write_all(b"GET /live HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    probe.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

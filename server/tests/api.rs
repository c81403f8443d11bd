//! The router, driven with `oneshot` (no socket): routing, validation, error envelopes, auth,
//! readiness and request ids. Generation runs on the real default model.

mod common;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};
use sluice_server::{router, ApiConfig, AppState};
use tower::ServiceExt;

use common::{api_config, chat_body, ready_state, MODEL};

async fn send(state: &AppState, req: Request<Body>) -> (Response<()>, Value) {
    let response = router(state.clone()).oneshot(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (Response::from_parts(parts, ()), json)
}

fn post(path: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(path).header(header::CONTENT_TYPE, "application/json").body(body.into()).unwrap()
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

/// Asserts the OpenAI envelope with this status and `param`, and returns the message.
fn assert_error(r: &Response<()>, body: &Value, status: u16, param: Option<&str>) -> String {
    assert_eq!(r.status().as_u16(), status, "{body}");
    let e = &body["error"];
    assert!(e["message"].is_string() && e["type"].is_string(), "not an envelope: {body}");
    assert!(e.as_object().is_some_and(|o| o.contains_key("param") && o.contains_key("code")), "{body}");
    assert_eq!(e["param"].as_str(), param, "{body}");
    e["message"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn while_loading_health_says_so_and_the_api_answers_503_with_retry_after() {
    let state = AppState::new(api_config());
    let (r, body) = send(&state, get("/health")).await;
    assert_eq!((r.status(), body), (StatusCode::SERVICE_UNAVAILABLE, json!({"status": "loading"})));
    let (r, body) = send(&state, get("/live")).await;
    assert_eq!((r.status(), &body["status"]), (StatusCode::OK, &json!("alive")));
    for req in [post("/v1/chat/completions", chat_body("hi", json!({})).to_string()), get("/v1/models")] {
        let (r, body) = send(&state, req).await;
        assert_error(&r, &body, 503, None);
        assert_eq!(body["error"]["code"], "model_loading");
        assert!(r.headers().contains_key(header::RETRY_AFTER));
    }
}

#[tokio::test]
async fn draining_turns_health_and_new_requests_to_503() {
    let state = ready_state(api_config());
    let (r, body) = send(&state, get("/health")).await;
    assert_eq!((r.status(), &body["status"], &body["model"]), (StatusCode::OK, &json!("ok"), &json!(MODEL)));
    state.shutdown().begin_drain();
    let (r, body) = send(&state, get("/health")).await;
    assert_eq!((r.status(), body), (StatusCode::SERVICE_UNAVAILABLE, json!({"status": "draining"})));
    let (r, body) = send(&state, post("/v1/chat/completions", chat_body("hi", json!({})).to_string())).await;
    assert_error(&r, &body, 503, None);
    assert!(r.headers().contains_key(header::RETRY_AFTER));
}

#[tokio::test]
async fn unknown_routes_and_methods_get_the_envelope() {
    let state = ready_state(api_config());
    let (r, body) = send(&state, get("/v1/nothing")).await;
    assert_error(&r, &body, 404, None);
    let (r, body) = send(&state, get("/v1/chat/completions")).await;
    assert_error(&r, &body, 405, None);
    let (r, body) =
        send(&state, Request::builder().method(Method::DELETE).uri("/health").body(Body::empty()).unwrap()).await;
    assert_error(&r, &body, 405, None);
}

#[tokio::test]
async fn bad_requests_are_400_naming_the_field() {
    let state = ready_state(api_config());
    let cases: Vec<(String, Option<&str>)> = vec![
        ("{\"messages\": [".into(), None),
        ("[1, 2]".into(), None),
        (json!({"model": MODEL}).to_string(), Some("messages")),
        (chat_body("hi", json!({"temperature": "warm"})).to_string(), Some("temperature")),
        (chat_body("hi", json!({"max_tokens": -5})).to_string(), Some("max_tokens")),
        (chat_body("hi", json!({"n": "two"})).to_string(), Some("n")),
        (chat_body("hi", json!({"stop": {"a": 1}})).to_string(), Some("stop")),
        (
            chat_body("hi", json!({"stream_options": {"include_usage": 1}})).to_string(),
            Some("stream_options.include_usage"),
        ),
        (json!({"messages": []}).to_string(), Some("messages")),
        (json!({"messages": [{"role": "wizard", "content": "x"}]}).to_string(), Some("messages[0].role")),
        (chat_body("hi", json!({"top_p": 1.5})).to_string(), Some("top_p")),
        (chat_body("hi", json!({"logit_bias": {"99999999": 1}})).to_string(), Some("logit_bias")),
        (chat_body("hi", json!({"max_tokens": 100000})).to_string(), Some("max_tokens")),
    ];
    for (body, param) in cases {
        let (r, answer) = send(&state, post("/v1/chat/completions", body.clone())).await;
        assert_error(&r, &answer, 400, param);
        assert_eq!(answer["error"]["type"], "invalid_request_error", "{body}");
    }
}

#[tokio::test]
async fn unknown_models_are_404() {
    let state = ready_state(api_config());
    let mut body = chat_body("hi", json!({}));
    body["model"] = json!("gpt-4o");
    let (r, answer) = send(&state, post("/v1/chat/completions", body.to_string())).await;
    assert_error(&r, &answer, 404, Some("model"));
    assert_eq!(answer["error"]["code"], "model_not_found");
    let (r, answer) = send(&state, get("/v1/models/gpt-4o")).await;
    assert_error(&r, &answer, 404, Some("model"));
}

#[tokio::test]
async fn limits_on_prompt_tokens_and_body_size() {
    let state = ready_state(ApiConfig { max_prompt_tokens: 10, body_limit: 2048, ..api_config() });
    let (r, body) =
        send(&state, post("/v1/chat/completions", chat_body("What is the capital of France?", json!({})).to_string()))
            .await;
    let message = assert_error(&r, &body, 400, Some("messages"));
    assert!(message.contains("limit of 10"), "{message}");
    let (r, body) = send(
        &state,
        post(
            "/v1/completions",
            json!({"prompt": "one two three four five six seven eight nine ten eleven"}).to_string(),
        ),
    )
    .await;
    assert_error(&r, &body, 400, Some("prompt"));
    let big = chat_body(&"x".repeat(4096), json!({})).to_string();
    let (r, body) = send(&state, post("/v1/chat/completions", big)).await;
    assert_error(&r, &body, 413, None);
}

#[tokio::test]
async fn api_keys_guard_the_api_but_not_the_probes() {
    let state = ready_state(ApiConfig { api_keys: vec!["sk-right".into()], ..api_config() });
    let (r, body) = send(&state, get("/v1/models")).await;
    assert_error(&r, &body, 401, None);
    let wrong =
        Request::get("/v1/models").header(header::AUTHORIZATION, "Bearer sk-wrong").body(Body::empty()).unwrap();
    let (r, body) = send(&state, wrong).await;
    assert_error(&r, &body, 401, None);
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let right =
        Request::get("/v1/models").header(header::AUTHORIZATION, "Bearer sk-right").body(Body::empty()).unwrap();
    let (r, body) = send(&state, right).await;
    assert_eq!((r.status(), &body["data"][0]["id"]), (StatusCode::OK, &json!(MODEL)), "{body}");
    for open in ["/health", "/live", "/openapi.json"] {
        assert_eq!(send(&state, get(open)).await.0.status(), StatusCode::OK, "{open}");
    }
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated_and_end_the_completion_id() {
    let state = ready_state(api_config());
    let mut req =
        post("/v1/chat/completions", chat_body("Say hi.", json!({"max_tokens": 2, "temperature": 0})).to_string());
    req.headers_mut().insert("x-request-id", "trace-42".parse().unwrap());
    let (r, body) = send(&state, req).await;
    assert_eq!(r.status(), StatusCode::OK, "{body}");
    assert_eq!(r.headers()["x-request-id"], "trace-42");
    assert_eq!(body["id"], "chatcmpl-trace-42");
    let (r, _) = send(&state, get("/v1/nowhere")).await;
    assert_eq!(r.headers()["x-request-id"].len(), 32);
}

#[tokio::test]
async fn models_tokenize_and_detokenize() {
    let state = ready_state(api_config());
    let (r, body) = send(&state, get("/v1/models")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        (&body["object"], &body["data"][0]["id"], &body["data"][0]["object"]),
        (&json!("list"), &json!(MODEL), &json!("model"))
    );
    let (_, tokens) =
        send(&state, post("/tokenize", json!({"prompt": "Hello world", "add_special_tokens": false}).to_string()))
            .await;
    let ids = tokens["tokens"].as_array().unwrap().clone();
    assert_eq!(tokens["count"].as_u64(), Some(ids.len() as u64));
    let (_, text) = send(&state, post("/detokenize", json!({"tokens": ids}).to_string())).await;
    assert_eq!(text["prompt"], "Hello world");
    let (_, chat) =
        send(&state, post("/tokenize", json!({"messages": [{"role": "user", "content": "Hello world"}]}).to_string()))
            .await;
    assert!(chat["count"].as_u64() > tokens["count"].as_u64(), "the template adds its markers: {chat}");
    let (r, body) = send(&state, post("/detokenize", json!({"tokens": [u32::MAX]}).to_string())).await;
    assert_error(&r, &body, 400, Some("tokens"));
    let (r, body) = send(&state, post("/tokenize", json!({}).to_string())).await;
    assert_error(&r, &body, 400, Some("prompt"));
}

#[tokio::test]
async fn openapi_describes_every_route_from_the_handler_types() {
    let state = AppState::new(api_config());
    let (r, doc) = send(&state, get("/openapi.json")).await;
    assert_eq!(r.status(), StatusCode::OK);
    for path in ["/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health"] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
    let schemas = &doc["components"]["schemas"];
    for schema in
        ["ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk", "CompletionRequest", "ErrorResponse"]
    {
        assert!(schemas[schema].is_object(), "{schema} missing");
    }
    assert!(schemas["ChatCompletionRequest"]["properties"]["top_logprobs"].is_object());
}

#[tokio::test]
async fn completions_answer_each_prompt_n_times() {
    let state = ready_state(api_config());
    let body = json!({"model": MODEL, "prompt": ["The sky is", "Water is"], "n": 2, "max_tokens": 3, "temperature": 0});
    let (r, answer) = send(&state, post("/v1/completions", body.to_string())).await;
    assert_eq!(r.status(), StatusCode::OK, "{answer}");
    assert_eq!(answer["object"], "text_completion");
    let choices = answer["choices"].as_array().unwrap();
    let indices: Vec<u64> = choices.iter().filter_map(|c| c["index"].as_u64()).collect();
    assert_eq!(indices, [0, 1, 2, 3]);
    // Greedy: both choices of a prompt agree, and the two prompts differ.
    assert_eq!(choices[0]["text"], choices[1]["text"]);
    assert_eq!(choices[2]["text"], choices[3]["text"]);
    assert_ne!(choices[0]["text"], choices[2]["text"]);
    let usage = &answer["usage"];
    assert_eq!(usage["completion_tokens"].as_u64(), Some(12), "{usage}");
    assert_eq!(usage["total_tokens"].as_u64(), Some(usage["prompt_tokens"].as_u64().unwrap() + 12));
}

#[tokio::test]
async fn requests_past_the_timeout_end_with_504_or_an_error_event() {
    let state = ready_state(ApiConfig { request_timeout: std::time::Duration::from_millis(200), ..api_config() });
    let long = json!({"max_tokens": 1000, "ignore_eos": true});
    let (r, body) =
        send(&state, post("/v1/chat/completions", chat_body("Count to a thousand.", long.clone()).to_string())).await;
    assert_error(&r, &body, 504, None);
    assert_eq!(body["error"]["code"], "timeout");
    let mut streamed = chat_body("Count to a thousand.", long);
    streamed["stream"] = json!(true);
    let (r, body) = send(&state, post("/v1/chat/completions", streamed.to_string())).await;
    assert_eq!(r.status(), StatusCode::OK);
    let raw = body.as_str().expect("an event stream");
    assert!(raw.contains("\"code\":\"timeout\"") && raw.ends_with("data: [DONE]\n\n"), "{raw}");
}

//! One streamed request to an OpenAI-compatible server, measured, with retries on 429 and 503.
//!
//! Timings are taken from the send of the attempt that succeeded: time to first token is the
//! arrival of the first chunk carrying text, each later text chunk adds an inter-token gap, and
//! the end is the `[DONE]` event. Token counts come from the usage chunk
//! (`stream_options.include_usage`); a server that sends none has its text chunks counted instead,
//! and the result says so. Every failure, from a refused connection to an error event mid-stream,
//! becomes the result's error message: nothing here panics on what a server sends.

use std::error::Error as _;
use std::time::Duration;

use futures_util::StreamExt;
use rand::Rng;
use reqwest::{header, Response, StatusCode};
use serde_json::{json, Value};
use tokio::time::{sleep, timeout_at, Instant};

use crate::report::RequestResult;
use crate::sse::SseParser;
use crate::workload::WorkItem;

/// Which API route the requests go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Endpoint {
    /// `/v1/chat/completions`, the prompt as one user message.
    Chat,
    /// `/v1/completions`, the prompt as raw text.
    Completions,
}

/// When to send again after a 429 or 503.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Re-sends at most, per request.
    pub max_retries: u32,
    /// Wait before the first re-send; doubles with each one.
    pub base: Duration,
    /// Longest wait between two sends, `Retry-After` aside.
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_retries: 3, base: Duration::from_millis(500), cap: Duration::from_secs(30) }
    }
}

impl RetryPolicy {
    /// The wait before re-send number `attempt + 1`: exponential backoff with equal jitter (half
    /// fixed, half random), and never less than the server's `Retry-After`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self.base.saturating_mul(2u32.saturating_pow(attempt)).min(self.cap);
        let jittered = exp / 2 + exp.mul_f64(rand::rng().random_range(0.0..0.5));
        retry_after.map_or(jittered, |r| r.max(jittered))
    }
}

/// Where and how requests are sent.
#[derive(Debug, Clone)]
pub struct Target {
    /// Shared connection pool.
    pub client: reqwest::Client,
    /// Server address without `/v1`, e.g. `http://127.0.0.1:8080`.
    pub base_url: String,
    /// Sent as `Authorization: Bearer`.
    pub api_key: Option<String>,
    /// The `model` field.
    pub model: String,
    /// Chat or completions.
    pub endpoint: Endpoint,
    /// Sends `ignore_eos: true`, so every request generates its `max_tokens`.
    pub ignore_eos: bool,
    /// Retries on 429 and 503.
    pub retry: RetryPolicy,
}

/// `url` without a trailing `/` or `/v1`: the base the API paths are appended to.
pub fn base_url(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    url.strip_suffix("/v1").unwrap_or(url).to_string()
}

/// An error and its causes, one after another (reqwest's own message omits them).
fn describe(e: &reqwest::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// The first model id from `GET /v1/models`.
pub async fn first_model(client: &reqwest::Client, base_url: &str, api_key: Option<&str>) -> Result<String, String> {
    let url = format!("{base_url}/v1/models");
    let mut req = client.get(&url).timeout(Duration::from_secs(30));
    if let Some(key) = api_key {
        req = req.bearer_auth(key);
    }
    let resp = req.send().await.map_err(|e| format!("GET {url}: {}", describe(&e)))?;
    let status = resp.status();
    let body: Value = resp.json().await.map_err(|e| format!("GET {url}: {status}, {}", describe(&e)))?;
    if !status.is_success() {
        return Err(format!("GET {url}: {status}: {}", error_message(&body)));
    }
    body["data"][0]["id"].as_str().map(str::to_string).ok_or_else(|| format!("GET {url}: no model listed in {body}"))
}

/// The message of an OpenAI error envelope, or the body itself.
fn error_message(body: &Value) -> String {
    body["error"]["message"].as_str().map_or_else(|| body.to_string(), str::to_string)
}

/// `Retry-After` in seconds (the HTTP-date form is not used by inference servers and is ignored).
fn retry_after(resp: &Response) -> Option<Duration> {
    let secs: f64 = resp.headers().get(header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

impl Target {
    fn body(&self, item: &WorkItem) -> Value {
        let mut body = json!({
            "model": self.model,
            "max_tokens": item.max_tokens,
            "temperature": 0.0,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        match self.endpoint {
            Endpoint::Chat => body["messages"] = json!([{"role": "user", "content": item.prompt}]),
            Endpoint::Completions => body["prompt"] = json!(item.prompt),
        }
        if self.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        body
    }

    fn url(&self) -> String {
        match self.endpoint {
            Endpoint::Chat => format!("{}/v1/chat/completions", self.base_url),
            Endpoint::Completions => format!("{}/v1/completions", self.base_url),
        }
    }

    /// Sends `item` (again after a 429 or 503, up to the retry policy) and measures it; gives up
    /// at `deadline`, whose expiry is reported as `on_timeout`.
    pub async fn send(&self, item: &WorkItem, deadline: Instant, on_timeout: &str) -> RequestResult {
        let mut r = RequestResult::default();
        let outcome = loop {
            // The response cache is bypassed: a benchmark measures generation, not cache hits.
            let mut req = self.client.post(self.url()).header(header::CACHE_CONTROL, "no-cache").json(&self.body(item));
            if let Some(key) = &self.api_key {
                req = req.bearer_auth(key);
            }
            let sent = Instant::now();
            let resp = match timeout_at(deadline, req.send()).await {
                Err(_) => break Err(on_timeout.to_string()),
                Ok(Err(e)) => break Err(describe(&e)),
                Ok(Ok(resp)) => resp,
            };
            let status = resp.status();
            if matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE)
                && r.retries < self.retry.max_retries
            {
                let wait = self.retry.delay(r.retries, retry_after(&resp));
                if Instant::now() + wait >= deadline {
                    break Err(format!(
                        "{status}, and its Retry-After or backoff runs past the deadline: {on_timeout}"
                    ));
                }
                sleep(wait).await;
                r.retries += 1;
                continue;
            }
            if !status.is_success() {
                let body = timeout_at(deadline, resp.text()).await.ok().and_then(Result::ok).unwrap_or_default();
                let body = serde_json::from_str(&body).map_or(body, |v| error_message(&v));
                let retried = if r.retries > 0 { format!(" after {} retries", r.retries) } else { String::new() };
                break Err(format!("HTTP {status}{retried}: {body}"));
            }
            break match timeout_at(deadline, self.read_stream(resp, sent, &mut r)).await {
                Err(_) => Err(on_timeout.to_string()),
                Ok(result) => result,
            };
        };
        if let Err(e) = outcome {
            r.error = Some(e);
        }
        r
    }

    /// Reads a streamed response into `r`, timed from `sent`.
    async fn read_stream(&self, resp: Response, sent: Instant, r: &mut RequestResult) -> Result<(), String> {
        let mut bytes = resp.bytes_stream();
        let mut parser = SseParser::default();
        let (mut chunks, mut last, mut usage, mut done) = (0usize, sent, None, false);
        while !done {
            let events = match bytes.next().await {
                Some(Ok(b)) => parser.push(&b),
                Some(Err(e)) => return Err(format!("reading the stream: {}", describe(&e))),
                None => {
                    let rest: Vec<String> = parser.finish().into_iter().collect();
                    if rest.is_empty() {
                        break;
                    }
                    rest
                }
            };
            let now = Instant::now();
            for data in events {
                if data.trim() == "[DONE]" {
                    done = true;
                    break;
                }
                let v: Value = serde_json::from_str(&data).map_err(|e| format!("bad chunk {data:?}: {e}"))?;
                if !v["error"].is_null() {
                    return Err(format!("error event: {}", error_message(&v)));
                }
                if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                    usage = Some((u["prompt_tokens"].as_u64(), u["completion_tokens"].as_u64()));
                }
                let choice = &v["choices"][0];
                let text = match self.endpoint {
                    Endpoint::Chat => &choice["delta"]["content"],
                    Endpoint::Completions => &choice["text"],
                };
                if text.as_str().is_some_and(|t| !t.is_empty()) {
                    if chunks == 0 {
                        r.ttft = now - sent;
                    } else {
                        r.itl.push(now - last);
                    }
                    last = now;
                    chunks += 1;
                }
            }
        }
        if !done {
            return Err(format!("the stream ended before [DONE] after {chunks} text chunks"));
        }
        r.e2e = sent.elapsed();
        if chunks == 0 {
            r.ttft = r.e2e;
        }
        match usage {
            Some((prompt, Some(completion))) => {
                r.prompt_tokens = prompt.unwrap_or(0) as usize;
                r.output_tokens = completion as usize;
            }
            _ => {
                r.tokens_counted = true;
                r.output_tokens = chunks;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;

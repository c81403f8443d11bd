//! Logging: the `tracing` subscriber (text on a terminal, or JSON lines), and [`observe`], the
//! outermost middleware, which gives every request its id (`x-request-id`, taken from the request
//! when sane, else generated), a span carrying it, an in-flight guard for graceful shutdown, and
//! exactly one log line when its response body ends (streams included) or the client goes away.

use std::io::IsTerminal;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use serde::Deserialize;
use sluice_engine::Finish;
use tracing::Instrument;

use crate::shutdown::InFlight;
use crate::state::AppState;

/// The request id header, read and written.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest request id accepted from a client; longer (or non-printable) ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// How logs are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (colours on a terminal).
    #[default]
    Text,
    /// One JSON object per line, span fields (the request id) included.
    Json,
}

/// Installs the global subscriber; `filter` is an `EnvFilter` directive (validated by the config).
pub fn init(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    // `try_init` fails only when a subscriber is already set (tests): keep that one.
    let _ = match format {
        LogFormat::Text => builder.with_ansi(std::io::stdout().is_terminal()).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init(),
    };
}

/// What the per-request log line reports, filled in by handlers through the request extension.
#[derive(Debug, Clone)]
pub struct RequestLog(Arc<LogRecord>);

#[derive(Debug)]
struct LogRecord {
    id: String,
    method: String,
    route: String,
    arrived: Instant,
    // A std mutex: held for a few field writes, never across an await.
    fields: Mutex<LogFields>,
}

#[derive(Debug, Default)]
struct LogFields {
    /// The API key's name (or fingerprint), never the key.
    api_key: Option<String>,
    user: Option<String>,
    prompt_tokens: usize,
    completion_tokens: usize,
    queue: Option<Duration>,
    ttft: Option<Duration>,
    error: Option<String>,
}

impl RequestLog {
    fn new(id: String, method: String, route: String) -> Self {
        Self(Arc::new(LogRecord {
            id,
            method,
            route,
            arrived: Instant::now(),
            fields: Mutex::new(LogFields::default()),
        }))
    }

    /// The request's id.
    pub fn id(&self) -> &str {
        &self.0.id
    }

    fn with(&self, f: impl FnOnce(&mut LogFields)) {
        if let Ok(mut fields) = self.0.fields.lock() {
            f(&mut fields);
        }
    }

    /// Records which API key the request carried, by its name.
    pub fn authenticated(&self, key_name: &str) {
        self.with(|f| f.api_key = Some(key_name.to_string()));
    }

    /// Records the prompt's size (all prompts, once each) and the end-user id.
    pub fn started(&self, prompt_tokens: usize, user: Option<String>) {
        self.with(|f| (f.prompt_tokens, f.user) = (prompt_tokens, user));
    }

    /// Records one finished choice: its tokens add up; queue time is the longest, TTFT the shortest.
    pub fn finished(&self, finish: &Finish) {
        self.with(|f| {
            f.completion_tokens += finish.usage.completion_tokens;
            f.queue = f.queue.max(Some(finish.timings.queue));
            f.ttft =
                Some(f.ttft.map_or(finish.timings.time_to_first_token, |t| t.min(finish.timings.time_to_first_token)));
        });
    }

    /// Records an error sent inside a stream (the status was already 200).
    pub fn failed(&self, code: &str) {
        self.with(|f| f.error = Some(code.to_string()));
    }

    /// Writes the line.
    fn emit(&self, status: StatusCode, completed: bool) {
        let Ok(f) = self.0.fields.lock() else { return };
        let ms = |d: Option<Duration>| d.map(|d| d.as_micros() as f64 / 1e3);
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    request_id = %self.0.id,
                    method = %self.0.method,
                    route = %self.0.route,
                    status = status.as_u16(),
                    api_key = f.api_key.as_deref(),
                    user = f.user.as_deref(),
                    prompt_tokens = f.prompt_tokens,
                    completion_tokens = f.completion_tokens,
                    queue_ms = ms(f.queue),
                    ttft_ms = ms(f.ttft),
                    total_ms = ms(Some(self.0.arrived.elapsed())),
                    stream_error = f.error.as_deref(),
                    client_disconnected = !completed,
                    "request finished"
                )
            };
        }
        match status {
            StatusCode::INTERNAL_SERVER_ERROR => line!(error),
            _ if f.error.is_some() => line!(warn),
            _ => line!(info),
        }
    }
}

/// The client's id when it is 1 to 128 printable ASCII characters, else a fresh UUID.
fn request_id(given: Option<&HeaderValue>) -> String {
    match given.and_then(|v| v.to_str().ok()) {
        Some(id) if (1..=MAX_REQUEST_ID_LEN).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic()) => {
            id.to_string()
        }
        _ => uuid::Uuid::new_v4().simple().to_string(),
    }
}

/// The outermost middleware: request id, span, in-flight guard, one log line per request, and
/// the request counter (`sluice_requests_total{route,status}`).
pub async fn observe(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    // The route's pattern, not the path, so that the counter's labels stay few.
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str).to_string();
    let id = request_id(req.headers().get(&X_REQUEST_ID));
    // INVARIANT: `request_id` returns printable ASCII only, which is always a valid header value.
    let header = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    req.headers_mut().insert(X_REQUEST_ID, header.clone());
    let log = RequestLog::new(id.clone(), req.method().to_string(), req.uri().path().to_string());
    req.extensions_mut().insert(log.clone());
    let span = tracing::info_span!("request", id = %id);
    let in_flight = state.shutdown().track();
    let mut response = next.run(req).instrument(span.clone()).await;
    response.headers_mut().insert(X_REQUEST_ID, header);
    let status = response.status();
    crate::metrics::record_request(&route, status);
    response.map(|inner| Body::new(ObservedBody { inner, span, log, status, completed: false, _in_flight: in_flight }))
}

/// A response body that polls inside the request's span and logs the request when dropped.
struct ObservedBody {
    inner: Body,
    span: tracing::Span,
    log: RequestLog,
    status: StatusCode,
    /// Whether the body reached its end (false when the client went away first).
    completed: bool,
    _in_flight: InFlight,
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let _entered = this.span.enter();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.completed = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        // An empty body is complete as soon as it is sent, though it may never be polled.
        let completed = self.completed || http_body::Body::is_end_stream(&self.inner);
        self.log.emit(self.status, completed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sane_ids_are_kept_and_others_replaced() {
        assert_eq!(request_id(Some(&HeaderValue::from_static("abc-123"))), "abc-123");
        for bad in [
            HeaderValue::from_static(""),
            HeaderValue::from_static("has space"),
            HeaderValue::from_str(&"x".repeat(129)).unwrap(),
        ] {
            let id = request_id(Some(&bad));
            assert_eq!(id.len(), 32, "{bad:?} -> {id}");
        }
        assert_ne!(request_id(None), request_id(None));
    }
}

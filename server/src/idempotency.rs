//! `Idempotency-Key`: a retried request is answered with the first one's response instead of
//! being generated again.
//!
//! A middleware on the generation routes. The key is scoped by the caller's `Authorization`
//! header (two API keys never share one); the request is fingerprinted by a SHA-256 of its
//! method, path and body bytes. Then, within the TTL (`--idempotency-ttl`):
//! - same key, same fingerprint, first one finished: its stored response, byte for byte (same
//!   `id`, and for a stream the same events), with `idempotent-replayed: true`;
//! - same key, same fingerprint, first one still running: wait for it, then the same;
//! - same key, another fingerprint: 409 in the OpenAI envelope.
//!
//! Only complete successes are stored: a 4xx/5xx answer, a stream that ended with an error event,
//! or a client that went away mid-answer releases the key, and a retry (or a waiter) runs anew.
//! Stored bodies are bounded in bytes (`--idempotency-store-size`, 64 MiB by default; a longer
//! body is not kept) as well as by the TTL.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::{Frame, SizeHint};
use sha2::{Digest, Sha256};

use crate::cache::X_CACHE;
use crate::error::ApiError;
use crate::single_flight::{Join, Leader, SingleFlight};
use crate::state::AppState;

/// The request header.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set on a response replayed for a retried request.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 255;

type Digest32 = [u8; 32];

/// A finished response, kept for retries.
#[derive(Debug)]
struct Stored {
    fingerprint: Digest32,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Stored {
    fn response(&self) -> Response {
        let mut response = (self.status, self.body.clone()).into_response();
        response.headers_mut().extend(self.headers.clone());
        response.headers_mut().insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        response
    }
}

struct Shared {
    done: moka::sync::Cache<Digest32, Arc<Stored>>,
    // Keys whose first request is running, tagged with its fingerprint.
    running: SingleFlight<Digest32, Arc<Stored>, Digest32>,
    /// Most bytes of stored bodies, and of any one body.
    max_bytes: u64,
}

/// The idempotency keys seen within the TTL; disabled with a TTL of 0. Cheap to share.
#[derive(Clone)]
pub struct IdempotencyStore(Option<Arc<Shared>>);

impl fmt::Debug for IdempotencyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyStore").field("enabled", &self.0.is_some()).finish()
    }
}

enum Begin {
    Replay(Arc<Stored>),
    Conflict,
    Lead(Flight),
    InProgress,
}

impl IdempotencyStore {
    /// A store whose keys live `ttl` and whose responses take at most `max_bytes` (no single
    /// response more); `ttl == 0` or `max_bytes == 0` disables idempotency keys (they are ignored).
    pub fn new(ttl: Duration, max_bytes: usize) -> Self {
        if ttl.is_zero() || max_bytes == 0 {
            return Self(None);
        }
        let max_bytes = max_bytes as u64;
        let done = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &Digest32, s: &Arc<Stored>| u32::try_from(s.body.len() + 512).unwrap_or(u32::MAX))
            .time_to_live(ttl)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        Self(Some(Arc::new(Shared { done, running: SingleFlight::new(), max_bytes })))
    }

    /// Waits for a running first request with this key at most `patience`; when it fails or goes
    /// away, this one runs.
    async fn begin(shared: &Arc<Shared>, scope: Digest32, fingerprint: Digest32, patience: Duration) -> Begin {
        match shared.running.join(scope, fingerprint, patience, || shared.done.get(&scope)).await {
            // A stored response of the same key with another fingerprint; one waited for has this one's.
            Join::Done(stored) if stored.fingerprint != fingerprint => Begin::Conflict,
            Join::Done(stored) => Begin::Replay(stored),
            Join::Conflict => Begin::Conflict,
            Join::Lead(leader) => Begin::Lead(Flight { shared: shared.clone(), scope, fingerprint, leader }),
            Join::TimedOut => Begin::InProgress,
        }
    }
}

/// The first request with a key, running; see [`IdempotencyStore`].
struct Flight {
    shared: Arc<Shared>,
    scope: Digest32,
    fingerprint: Digest32,
    leader: Leader<Digest32, Arc<Stored>, Digest32>,
}

impl Flight {
    fn complete(self, status: StatusCode, headers: HeaderMap, body: Bytes) {
        let stored = Arc::new(Stored { fingerprint: self.fingerprint, status, headers, body });
        self.shared.done.insert(self.scope, stored.clone());
        self.leader.complete(stored);
    }
}

/// Middleware for the generation routes; see the module's documentation.
pub async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Result<Response, ApiError> {
    let (Some(shared), Some(key)) = (&state.idempotency().0, req.headers().get(IDEMPOTENCY_KEY)) else {
        return Ok(next.run(req).await);
    };
    let key = key.as_bytes();
    if key.is_empty() || key.len() > MAX_KEY_LEN || !key.iter().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::InvalidRequest {
            message: format!("The `Idempotency-Key` header must be 1 to {MAX_KEY_LEN} visible ASCII characters."),
            param: None,
        });
    }
    let scope = digest(&[req.headers().get(header::AUTHORIZATION).map_or(&b""[..], |v| v.as_bytes()), key]);
    let (parts, body) = req.into_parts();
    let limit = state.config().body_limit;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        let over_limit = std::iter::from_fn(|| {
            let c = cause?;
            cause = c.source();
            Some(c)
        })
        .any(|c| c.is::<http_body_util::LengthLimitError>());
        if over_limit {
            ApiError::BodyTooLarge(limit)
        } else {
            ApiError::InvalidRequest { message: format!("The request body could not be read: {e}"), param: None }
        }
    })?;
    let fingerprint = digest(&[parts.method.as_str().as_bytes(), parts.uri.path().as_bytes(), &bytes]);
    // A first request whose client stopped reading must not hold its retries forever.
    let patience = state.config().request_timeout;
    let flight = match IdempotencyStore::begin(shared, scope, fingerprint, patience).await {
        Begin::Replay(stored) => return Ok(stored.response()),
        Begin::Conflict => return Err(ApiError::IdempotencyConflict),
        Begin::InProgress => return Err(ApiError::IdempotencyInProgress),
        Begin::Lead(flight) => flight,
    };
    let response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    if !response.status().is_success() {
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let mut kept = HeaderMap::new();
    for name in [header::CONTENT_TYPE, header::CACHE_CONTROL, X_CACHE] {
        if let Some(value) = parts.headers.get(&name) {
            kept.insert(name, value.clone());
        }
    }
    let capture = Capture { inner: body, bytes: Vec::new(), flight: Some((flight, parts.status, kept)) };
    Ok(Response::from_parts(parts, Body::new(capture)))
}

/// SHA-256 of `parts`, each prefixed by its length.
fn digest(parts: &[&[u8]]) -> Digest32 {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part);
    }
    hash.finalize().into()
}

/// A response body passed through and kept; stored when it ends complete and without an error.
struct Capture {
    inner: Body,
    bytes: Vec<u8>,
    flight: Option<(Flight, StatusCode, HeaderMap)>,
}

impl Capture {
    fn finish(&mut self) {
        let Some((flight, status, headers)) = self.flight.take() else { return };
        // A stream that failed midway ends with an error event (see `sse`): not a result to keep.
        let needle = b"data: {\"error\":";
        let failed = self.bytes.windows(needle.len()).any(|w| w == needle);
        if !failed {
            flight.complete(status, headers, Bytes::from(std::mem::take(&mut self.bytes)));
        }
    }
}

impl http_body::Body for Capture {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let limit = this.flight.as_ref().map_or(0, |(flight, ..)| flight.shared.max_bytes);
                    if (this.bytes.len() + data.len()) as u64 > limit {
                        // Too large to keep: the key is released when this body ends.
                        this.flight = None;
                    }
                    if this.flight.is_some() {
                        this.bytes.extend_from_slice(data);
                    }
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => this.flight = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

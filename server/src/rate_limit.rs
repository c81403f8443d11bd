//! Rate limits per caller, as OpenAI's: requests per minute and tokens per minute, each a bucket
//! that holds one minute's worth and refills continuously. The caller is its API key (the key's
//! own `rpm`/`tpm`, else the server's defaults) or, for requests without a key, its client
//! address; `X-Forwarded-For` is believed only behind a trusted proxy.
//!
//! - Requests: every API request costs one, checked by [`limit`] right after authentication,
//!   with `governor` (GCRA).
//! - Tokens, cost-aware: a generation is charged its prompt tokens plus the completion tokens it
//!   reserves (each choice's `max_tokens`, or up to [`DEFAULT_RESERVATION`] without one) once its
//!   prompt is tokenized ([`Caller::charge`]); the [`TokenCharge`] it holds takes the tokens it
//!   generates past its reservation as they come (the bucket may then go below empty, delaying
//!   the caller's next requests) and gives back the reserved tokens not generated when it is
//!   dropped, however the request ended (finished, failed, client gone). governor cannot give
//!   cells back, so tokens use a [`TokenBucket`] of our own.
//!
//! A limited caller's API responses, refusals included, carry
//! `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for each limit that applies. Resets
//! are the time until the bucket is full again, written as OpenAI writes them: `250ms`, `12s`,
//! `6m0s`. A refusal is 429 `rate_limit_exceeded` with `Retry-After` in whole seconds.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::Quota;

use crate::auth::{ApiKey, KeyIndex};
use crate::error::ApiError;
use crate::state::AppState;

mod bucket;

pub use bucket::TokenBucket;

/// Most client addresses with buckets of their own. Past it, buckets that have been idle for a
/// minute (so are full again, no different from new ones) are dropped; if none is, new clients
/// share one bucket until some are.
const MAX_CLIENTS: usize = 10_000;
/// Completion tokens reserved per choice by a request without `max_tokens` (OpenAI's clients
/// mostly send none; reserving the rest of the context would refuse every such request under a
/// tokens-per-minute limit smaller than the context).
pub const DEFAULT_RESERVATION: usize = 256;
const MINUTE: Duration = Duration::from_secs(60);

type RequestLimiter = governor::RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// The server's rate-limit settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Requests per minute of a caller whose key sets none; 0: unlimited.
    pub rpm: u32,
    /// Tokens per minute of a caller whose key sets none; 0: unlimited.
    pub tpm: u64,
    /// Take the client address from `X-Forwarded-For`: its last entry, the one our proxy added.
    pub trusted_proxy: bool,
}

/// Every caller's buckets. Keys' buckets are made at start-up; client addresses' on first sight.
#[derive(Debug)]
pub struct RateLimiter {
    config: RateLimitConfig,
    /// Per configured key, in `ApiConfig::api_keys` order: its default priority and buckets.
    keys: Vec<(Option<i32>, Arc<Buckets>)>,
    clients: DashMap<Option<IpAddr>, Arc<Buckets>>,
    /// Shared by new clients while `clients` is full of active ones.
    overflow: Arc<Buckets>,
    /// Shared by every caller when no default limit is set.
    unlimited: Arc<Buckets>,
    /// Origin of `Buckets::last_seen`.
    epoch: Instant,
}

impl RateLimiter {
    /// Buckets for `keys` (their own limits, else `config`'s) and for clients without a key.
    pub fn new(keys: &[ApiKey], config: RateLimitConfig) -> Self {
        let buckets = |rpm, tpm| Arc::new(Buckets::new(rpm, tpm));
        Self {
            keys: keys
                .iter()
                .map(|k| (k.priority, buckets(k.rpm.unwrap_or(config.rpm), k.tpm.unwrap_or(config.tpm))))
                .collect(),
            clients: DashMap::new(),
            overflow: buckets(config.rpm, config.tpm),
            unlimited: buckets(0, 0),
            epoch: Instant::now(),
            config,
        }
    }

    /// The settings.
    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// The caller with `key` (when the request carried one) or else from address `client`.
    pub fn caller(&self, key: Option<KeyIndex>, client: Option<IpAddr>) -> Caller {
        if let Some((priority, buckets)) = key.and_then(|KeyIndex(i)| self.keys.get(i)) {
            return Caller { priority: *priority, buckets: buckets.clone() };
        }
        let buckets = if self.config.rpm == 0 && self.config.tpm == 0 {
            self.unlimited.clone()
        } else {
            self.client_buckets(client)
        };
        Caller { priority: None, buckets }
    }

    fn client_buckets(&self, client: Option<IpAddr>) -> Arc<Buckets> {
        // An IPv6 client is its /64 (one host usually holds a whole /64), so that one host cannot
        // fill the table with addresses of its own.
        let client = client.map(|ip| match ip {
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !(u64::MAX as u128)).into()),
            v4 => v4,
        });
        let now = self.epoch.elapsed().as_nanos() as u64;
        if let Some(buckets) = self.clients.get(&client) {
            buckets.last_seen.store(now, Ordering::Relaxed);
            return buckets.clone();
        }
        if self.clients.len() >= MAX_CLIENTS {
            let minute = MINUTE.as_nanos() as u64;
            // Unshared (no charge outstanding) and untouched for a minute: full again.
            self.clients.retain(|_, b| {
                Arc::strong_count(b) > 1 || now.saturating_sub(b.last_seen.load(Ordering::Relaxed)) < minute
            });
            if self.clients.len() >= MAX_CLIENTS {
                return self.overflow.clone();
            }
        }
        let entry =
            self.clients.entry(client).or_insert_with(|| Arc::new(Buckets::new(self.config.rpm, self.config.tpm)));
        entry.last_seen.store(now, Ordering::Relaxed);
        entry.clone()
    }
}

/// One caller's buckets; either may be off.
#[derive(Debug)]
struct Buckets {
    requests: Option<RequestLimiter>,
    // A std mutex: held for a little arithmetic, never across an await.
    tokens: Option<Mutex<TokenBucket>>,
    /// Nanoseconds from `RateLimiter::epoch` to this caller's latest request.
    last_seen: AtomicU64,
}

impl Buckets {
    fn new(rpm: u32, tpm: u64) -> Self {
        Self {
            requests: NonZeroU32::new(rpm)
                .map(|rpm| governor::RateLimiter::direct(Quota::per_minute(rpm)).with_middleware()),
            tokens: (tpm > 0).then(|| Mutex::new(TokenBucket::new(tpm, MINUTE, Instant::now()))),
            last_seen: AtomicU64::new(0),
        }
    }

    fn with_tokens<T>(&self, f: impl FnOnce(&mut TokenBucket, Instant) -> T) -> Option<T> {
        let bucket = self.tokens.as_ref()?;
        let mut bucket = bucket.lock().unwrap_or_else(PoisonError::into_inner);
        Some(f(&mut bucket, Instant::now()))
    }
}

/// The state of one limit for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Capacity of the bucket.
    pub limit: u64,
    /// What is left now.
    pub remaining: u64,
    /// Time until the bucket is full again.
    pub reset: Duration,
}

/// Who is calling, as far as limits and defaults go: a request extension set by [`limit`].
#[derive(Debug, Clone)]
pub struct Caller {
    priority: Option<i32>,
    buckets: Arc<Buckets>,
}

impl Caller {
    /// A caller with no key and no limits.
    pub fn unlimited() -> Self {
        Self { priority: None, buckets: Arc::new(Buckets::new(0, 0)) }
    }

    /// The request's priority: its own when it set one, else its key's, else 0.
    pub fn priority(&self, requested: Option<i32>) -> i32 {
        requested.or(self.priority).unwrap_or(0)
    }

    /// Takes one request from the requests bucket; a refusal is the 429 to answer with.
    fn take_request(&self) -> (Option<Window>, Result<(), ApiError>) {
        let Some(limiter) = &self.buckets.requests else { return (None, Ok(())) };
        match limiter.check() {
            Ok(snapshot) => {
                let quota = snapshot.quota();
                let (limit, remaining) = (quota.burst_size().get(), snapshot.remaining_burst_capacity());
                let reset = quota.replenish_interval() * limit.saturating_sub(remaining);
                (Some(Window { limit: limit.into(), remaining: remaining.into(), reset }), Ok(()))
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(limiter.clock().now());
                let quota = not_until.quota();
                let limit = quota.burst_size().get();
                let reset = wait + quota.replenish_interval() * (limit - 1);
                metrics::counter!("sluice_rate_limited_requests_total", "limit" => "requests").increment(1);
                let message = format!(
                    "Rate limit reached for requests per minute (RPM): limit {limit}. Please try again in {}.",
                    format_reset(wait)
                );
                let window = Window { limit: limit.into(), remaining: 0, reset };
                (Some(window), Err(ApiError::RateLimited { message, retry_after: Some(wait) }))
            }
        }
    }

    /// Charges a generation its prompt tokens plus `reserved` completion tokens (all choices); the
    /// charge takes what is generated past them as it comes and gives back what is not generated
    /// when dropped. 429 when the bucket lacks them.
    pub fn charge(&self, prompt_tokens: usize, reserved: usize) -> Result<TokenCharge, ApiError> {
        let cost = (prompt_tokens + reserved) as u64;
        let taken =
            self.buckets.with_tokens(|bucket, now| bucket.take(cost, now).map_err(|wait| (wait, bucket.capacity())));
        match taken {
            None => Ok(TokenCharge(None)),
            Some(Ok(())) => {
                let budget = reserved as u64;
                Ok(TokenCharge(Some(Charged { buckets: self.buckets.clone(), budget, used: AtomicU64::new(0) })))
            }
            Some(Err((wait, limit))) => {
                metrics::counter!("sluice_rate_limited_requests_total", "limit" => "tokens").increment(1);
                let message = match wait {
                    Some(wait) => format!(
                        "Rate limit reached for tokens per minute (TPM): limit {limit}, requested {cost} (prompt plus the completion tokens reserved). Please try again in {}.",
                        format_reset(wait)
                    ),
                    None => format!(
                        "Request too large for tokens per minute (TPM): limit {limit}, requested {cost} (prompt plus `max_tokens`). Lower `max_tokens` or shorten the prompt."
                    ),
                };
                Err(ApiError::RateLimited { message, retry_after: wait })
            }
        }
    }

    /// Writes the `x-ratelimit-*` headers of each limit that applies.
    fn write_headers(&self, headers: &mut HeaderMap, requests: Option<Window>) {
        let tokens = self.buckets.with_tokens(|bucket, now| bucket.window(now));
        for (window, [limit, remaining, reset]) in [(requests, REQUEST_HEADERS), (tokens, TOKEN_HEADERS)] {
            let Some(w) = window else { continue };
            headers.insert(limit, HeaderValue::from(w.limit));
            headers.insert(remaining, HeaderValue::from(w.remaining));
            if let Ok(value) = HeaderValue::from_str(&format_reset(w.reset)) {
                headers.insert(reset, value);
            }
        }
    }
}

const REQUEST_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];
const TOKEN_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];

/// Tokens a generation was charged for but may not use; dropping it gives back the unused part.
/// Inert when the caller has no token limit.
#[derive(Debug, Default)]
pub struct TokenCharge(Option<Charged>);

#[derive(Debug)]
struct Charged {
    buckets: Arc<Buckets>,
    /// Completion tokens reserved over all choices, as charged.
    budget: u64,
    /// Tokens generated so far (atomic: choices are gathered concurrently).
    used: AtomicU64,
}

impl TokenCharge {
    /// Counts `tokens` generated tokens against the reservation; those past it are taken from the
    /// bucket now.
    pub fn record(&self, tokens: usize) {
        if let Some(c) = &self.0 {
            let before = c.used.fetch_add(tokens as u64, Ordering::Relaxed);
            let over = (before + tokens as u64).saturating_sub(c.budget) - before.saturating_sub(c.budget);
            if over > 0 {
                c.buckets.with_tokens(|bucket, now| bucket.take_spent(over, now));
            }
        }
    }
}

impl Drop for TokenCharge {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            let unused = c.budget.saturating_sub(c.used.load(Ordering::Relaxed));
            c.buckets.with_tokens(|bucket, now| bucket.give(unused, now));
        }
    }
}

/// Middleware for the API routes, after authentication: takes one request from the caller's
/// requests bucket (429 when empty), leaves the [`Caller`] in the request's extensions for the
/// token charge, and writes the `x-ratelimit-*` headers on the response, whatever it is.
pub async fn limit(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let limiter = state.rate_limiter();
    // In-process tests (`oneshot`) have no connection: they all count as one unknown client.
    let connected = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let client = client_addr(req.headers(), connected, limiter.config().trusted_proxy);
    let caller = limiter.caller(req.extensions().get::<KeyIndex>().copied(), client);
    let (requests, admitted) = caller.take_request();
    let mut response = match admitted {
        Ok(()) => {
            req.extensions_mut().insert(caller.clone());
            next.run(req).await
        }
        Err(refused) => refused.into_response(),
    };
    caller.write_headers(response.headers_mut(), requests);
    response
}

/// The client's address: the peer's, or behind a trusted proxy the last `X-Forwarded-For`
/// entry (the one the proxy appended; earlier ones are whatever the client claimed).
pub fn client_addr(headers: &HeaderMap, peer: Option<IpAddr>, trusted_proxy: bool) -> Option<IpAddr> {
    let forwarded = || {
        let last = headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(','));
        let entry = last.last()?.trim();
        entry.parse::<IpAddr>().ok().or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
    };
    trusted_proxy.then(forwarded).flatten().or(peer)
}

/// OpenAI's form: `120ms` under a second, `12s` under a minute, else `6m0s` (rounded up).
pub fn format_reset(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_nanos().div_ceil(1_000_000));
    }
    let secs = d.as_nanos().div_ceil(1_000_000_000);
    match secs {
        0..=59 => format!("{secs}s"),
        _ => format!("{}m{}s", secs / 60, secs % 60),
    }
}

#[cfg(test)]
mod tests;

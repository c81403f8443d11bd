//! The response cache: finished answers to deterministic requests (temperature 0, or a fixed
//! `seed`), replayed instead of generated again.
//!
//! - Key: SHA-256 of the served model's name, every prompt's token ids (after the chat
//!   template), `n`, `max_tokens` and every sampling field. Presentation (`stream`,
//!   `stream_options`, `user`, `priority`) is not part of it, so a streamed request can be answered
//!   from a non-streamed one and the other way round.
//! - Value: each choice's token events (text deltas, logprobs) and finish, raw (the output
//!   filter runs on replays as on live answers). A replay goes through the same writers as a live
//!   answer, so its JSON and its event stream are framed alike; it gets the new request's `id`
//!   and `created`, and zero timings.
//! - Bounds: a TTL and an LRU bounded in bytes (moka, with a weigher).
//! - Single flight: while a request for a key is generating, identical requests wait for it and
//!   replay its result. If it fails or its client goes away, one waiter generates instead.
//! - `Cache-Control: no-cache` (or `no-store`) skips the cache. `x-cache` says `hit`, `miss` or
//!   `bypass` (not deterministic, skipped, or the cache is off).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::Response;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use sluice_engine::{Finish, StreamEvent, Timings, TokenEvent};

use crate::generate::Events;
use crate::single_flight::{Join, Leader, SingleFlight};
use crate::validate::GenerateRequest;

/// The response header that says how the cache answered.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// A cache key: SHA-256 of what determines an answer.
pub type CacheKey = [u8; 32];

/// How the cache answered a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Replayed from the cache (or from an identical request that was in flight).
    Hit,
    /// Generated, and stored when it finishes.
    Miss,
    /// Not looked up: not deterministic, `Cache-Control: no-cache`, or the cache is off.
    Bypass,
}

impl CacheStatus {
    /// The `x-cache` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Bypass => "bypass",
        }
    }

    /// `response` with the `x-cache` header.
    pub fn tag(self, mut response: Response) -> Response {
        response.headers_mut().insert(X_CACHE, HeaderValue::from_static(self.as_str()));
        response
    }
}

/// The request's `Cache-Control` directives that concern the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheControl {
    /// `no-cache` or `no-store`: neither read nor write the cache.
    pub skip: bool,
}

impl CacheControl {
    /// Reads `Cache-Control` from request headers.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let skip =
            headers.get_all(header::CACHE_CONTROL).iter().filter_map(|v| v.to_str().ok()).any(|v| {
                v.split(',').any(|d| matches!(d.trim().to_ascii_lowercase().as_str(), "no-cache" | "no-store"))
            });
        Self { skip }
    }
}

/// The key of `req` whose prompts tokenized to `prompts`; `None` when its answer is not
/// deterministic (temperature above 0 and no seed).
pub fn key(model: &str, prompts: &[Vec<u32>], req: &GenerateRequest) -> Option<CacheKey> {
    if req.params.temperature > 0.0 && req.params.seed.is_none() {
        return None;
    }
    let mut hash = Sha256::new();
    hash.update((model.len() as u64).to_le_bytes());
    hash.update(model.as_bytes());
    hash.update((prompts.len() as u64).to_le_bytes());
    for ids in prompts {
        hash.update((ids.len() as u64).to_le_bytes());
        ids.iter().for_each(|id| hash.update(id.to_le_bytes()));
    }
    // `Debug` prints every field of the sampling parameters (floats exactly), so a field added
    // later is part of the key without anyone remembering to add it here. Keys live in memory
    // only, so the format need not be stable across builds.
    hash.update(format!("n={} max_tokens={:?} {:?}", req.n, req.max_tokens, req.params).as_bytes());
    Some(hash.finalize().into())
}

/// One choice of a finished answer.
#[derive(Debug, Clone)]
pub struct RecordedChoice {
    /// Its token events, in order.
    pub tokens: Vec<TokenEvent>,
    /// How it ended.
    pub finish: Finish,
}

/// A finished answer: every choice, in `index` order.
#[derive(Debug, Clone)]
pub struct Recording {
    /// The choices.
    pub choices: Vec<RecordedChoice>,
}

impl Recording {
    /// Approximate bytes held, for the cache's weigher.
    fn weight(&self) -> u32 {
        let per_token = std::mem::size_of::<TokenEvent>();
        let bytes: usize = self
            .choices
            .iter()
            .flat_map(|c| &c.tokens)
            .map(|t| per_token + t.text.len() + t.logprob.as_ref().map_or(0, |l| 16 + l.top.len() * 8))
            .sum();
        u32::try_from(bytes + 256).unwrap_or(u32::MAX)
    }

    /// The answer's events again, choice after choice, with zero timings (nothing was queued
    /// or computed).
    pub fn replay(&self) -> Events {
        let events: Vec<(usize, StreamEvent)> = self
            .choices
            .iter()
            .enumerate()
            .flat_map(|(index, choice)| {
                let finish = Finish { timings: Timings::default(), ..choice.finish.clone() };
                let tokens = choice.tokens.iter().cloned().map(StreamEvent::Token);
                tokens.chain([StreamEvent::Finished(finish)]).map(move |event| (index, event))
            })
            .collect();
        Box::pin(futures_util::stream::iter(events))
    }
}

struct Shared {
    entries: moka::sync::Cache<CacheKey, Arc<Recording>>,
    // Keys being generated now.
    flights: SingleFlight<CacheKey, Arc<Recording>>,
    queries: AtomicU64,
    hits: AtomicU64,
}

/// The response cache; disabled when built with a size of 0. Cheap to share.
#[derive(Clone)]
pub struct ResponseCache(Option<Arc<Shared>>);

impl fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (queries, hits) = self.counts();
        f.debug_struct("ResponseCache")
            .field("enabled", &self.0.is_some())
            .field("queries", &queries)
            .field("hits", &hits)
            .finish()
    }
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// A finished answer to replay.
    Hit(Arc<Recording>),
    /// Nothing: generate, passing the events through [`Flight::record`].
    Miss(Flight),
    /// Not looked up.
    Bypass,
}

impl ResponseCache {
    /// A cache of at most `max_bytes` whose entries live `ttl`; `max_bytes == 0` disables it.
    pub fn new(max_bytes: usize, ttl: Duration) -> Self {
        if max_bytes == 0 {
            return Self(None);
        }
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes as u64)
            .weigher(|_: &CacheKey, rec: &Arc<Recording>| rec.weight())
            .time_to_live(ttl)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        Self(Some(Arc::new(Shared {
            entries,
            flights: SingleFlight::new(),
            queries: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        })))
    }

    /// Lookups and hits since start (also counted in `sluice_response_cache_{queries,hits}_total`).
    pub fn counts(&self) -> (u64, u64) {
        self.0.as_ref().map_or((0, 0), |s| (s.queries.load(Ordering::Relaxed), s.hits.load(Ordering::Relaxed)))
    }

    /// Looks `key` up (`None`: not deterministic). When an identical request is generating,
    /// waits for it, at most `patience` in all; when it fails or goes away, tries again, leading
    /// the generation itself if no one else does. Past `patience` (a leader whose client stopped
    /// reading holds its answer back), it generates on its own, uncached.
    pub async fn lookup(&self, key: Option<CacheKey>, control: CacheControl, patience: Duration) -> Lookup {
        let (Some(shared), Some(key), false) = (&self.0, key, control.skip) else { return Lookup::Bypass };
        shared.queries.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("sluice_response_cache_queries_total").increment(1);
        match shared.flights.join(key, (), patience, || shared.entries.get(&key)).await {
            Join::Done(recording) => {
                shared.hits.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("sluice_response_cache_hits_total").increment(1);
                Lookup::Hit(recording)
            }
            Join::Lead(leader) => Lookup::Miss(Flight { shared: shared.clone(), key, leader }),
            // Flights of the cache all have the same tag: a conflict does not happen.
            Join::TimedOut | Join::Conflict => Lookup::Bypass,
        }
    }
}

/// The generation of one key, led by one request. Completing it stores the answer and hands it
/// to the waiters; dropping it unfinished lets them go (one of them then generates).
pub struct Flight {
    shared: Arc<Shared>,
    key: CacheKey,
    leader: Leader<CacheKey, Arc<Recording>, ()>,
}

impl fmt::Debug for Flight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flight").field("id", &self.leader.id()).finish_non_exhaustive()
    }
}

impl Flight {
    fn complete(self, recording: Recording) {
        let recording = Arc::new(recording);
        self.shared.entries.insert(self.key, recording.clone());
        // The flight ends: new requests find the entry from now on.
        self.leader.complete(recording);
    }

    /// Passes `events` (of `choices` choices) through, recording them; when every choice has
    /// finished, the answer is stored. An error, or a stream dropped early, stores nothing.
    pub fn record(self, events: Events, choices: usize) -> Events {
        let mut tokens: Vec<Vec<TokenEvent>> = vec![Vec::new(); choices];
        let mut finishes: Vec<Option<Finish>> = vec![None; choices];
        let mut flight = Some(self);
        Box::pin(async_stream::stream! {
            let mut events = events;
            while let Some((index, event)) = events.next().await {
                match &event {
                    StreamEvent::Token(token) => {
                        if let Some(list) = tokens.get_mut(index) {
                            list.push(token.clone());
                        }
                    }
                    StreamEvent::Finished(finish) => {
                        if let Some(slot) = finishes.get_mut(index) {
                            *slot = Some(finish.clone());
                        }
                        if finishes.iter().all(Option::is_some) {
                            let choices = std::mem::take(&mut tokens)
                                .into_iter()
                                .zip(finishes.iter_mut().filter_map(Option::take))
                                .map(|(tokens, finish)| RecordedChoice { tokens, finish })
                                .collect();
                            if let Some(flight) = flight.take() {
                                flight.complete(Recording { choices });
                            }
                        }
                    }
                    StreamEvent::Error(_) => drop(flight.take()),
                }
                yield (index, event);
            }
        })
    }
}

//! [`AppState`]: what every handler shares. The engine arrives after start-up (the port opens
//! first), so readiness is part of the state: [`AppState::engine`] is the one place that says
//! whether a request may run now, and why not.

use std::sync::{Arc, OnceLock};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use sluice_engine::{BreakerState, Engine};

use crate::cache::ResponseCache;
use crate::config::ApiConfig;
use crate::error::ApiError;
use crate::idempotency::IdempotencyStore;
use crate::openai::{unix_now, HealthResponse};
use crate::rate_limit::RateLimiter;
use crate::shutdown::Shutdown;

/// Shared state of the server; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    config: ApiConfig,
    // Set once, when the model is loaded and warmed up; never unset (draining is separate).
    engine: OnceLock<Arc<Engine>>,
    shutdown: Arc<Shutdown>,
    started: u64,
    rate_limiter: RateLimiter,
    response_cache: ResponseCache,
    idempotency: IdempotencyStore,
}

impl AppState {
    /// A server that is still loading its model.
    pub fn new(config: ApiConfig) -> Self {
        Self(Arc::new(Inner {
            rate_limiter: RateLimiter::new(&config.api_keys, config.rate_limit),
            response_cache: ResponseCache::new(config.response_cache_size, config.response_cache_ttl),
            idempotency: IdempotencyStore::new(config.idempotency_ttl, config.idempotency_store_size),
            config,
            engine: OnceLock::new(),
            shutdown: Arc::new(Shutdown::default()),
            started: unix_now(),
        }))
    }

    /// The HTTP layer's settings.
    pub fn config(&self) -> &ApiConfig {
        &self.0.config
    }

    /// Every caller's rate-limit buckets.
    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.0.rate_limiter
    }

    /// The response cache.
    pub fn response_cache(&self) -> &ResponseCache {
        &self.0.response_cache
    }

    /// The idempotency keys.
    pub fn idempotency(&self) -> &IdempotencyStore {
        &self.0.idempotency
    }

    /// Unix time the server started (`created` of the model card).
    pub fn started(&self) -> u64 {
        self.0.started
    }

    /// The shutdown state.
    pub fn shutdown(&self) -> &Arc<Shutdown> {
        &self.0.shutdown
    }

    /// Marks the server ready with its loaded, warmed-up engine. A second call is ignored.
    pub fn set_engine(&self, engine: Arc<Engine>) {
        let _ = self.0.engine.set(engine);
    }

    /// The engine, if the server may take a request now; else the 503 that says why.
    pub fn engine(&self) -> Result<&Arc<Engine>, ApiError> {
        if self.0.shutdown.is_draining() {
            return Err(ApiError::Draining);
        }
        match self.0.engine.get() {
            None => Err(ApiError::NotReady),
            Some(engine) if !engine.is_alive() => Err(ApiError::EngineStopped),
            Some(engine) => Ok(engine),
        }
    }

    /// `Ok` when `model` is absent or the served model's name.
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(name) if name != self.0.config.served_model_name => Err(ApiError::ModelNotFound(name.to_string())),
            _ => Ok(()),
        }
    }

    /// The readiness answer of `/health`.
    pub fn health(&self) -> (StatusCode, HealthResponse) {
        let status = |s: &str| HealthResponse {
            status: s.to_string(),
            model: None,
            waiting: None,
            running: None,
            kv_cache_usage: None,
            breaker: None,
        };
        match self.engine() {
            Ok(engine) => {
                let stats = engine.stats();
                let usage = stats.kv_blocks_used as f64 / stats.kv_blocks_total.max(1) as f64;
                // Open until its cool-down is over; then half-open, and traffic must come back
                // for the probe step to run, so readiness is 200 again.
                let open = stats.breaker.retry_after(std::time::Instant::now()).is_some();
                let breaker = match stats.breaker {
                    BreakerState::Open { .. } if !open => "half_open",
                    state => state.as_str(),
                };
                let (code, word) =
                    if open { (StatusCode::SERVICE_UNAVAILABLE, "breaker_open") } else { (StatusCode::OK, "ok") };
                let body = HealthResponse {
                    model: Some(self.0.config.served_model_name.clone()),
                    waiting: Some(stats.waiting),
                    running: Some(stats.running),
                    kv_cache_usage: Some(usage),
                    breaker: Some(breaker.to_string()),
                    ..status(word)
                };
                (code, body)
            }
            Err(ApiError::Draining) => (StatusCode::SERVICE_UNAVAILABLE, status("draining")),
            Err(ApiError::NotReady) => (StatusCode::SERVICE_UNAVAILABLE, status("loading")),
            Err(_) => (StatusCode::SERVICE_UNAVAILABLE, status("engine_stopped")),
        }
    }
}

/// Middleware for the API routes: 503 (with `Retry-After`) unless the server is ready.
pub async fn require_ready(State(state): State<AppState>, req: Request, next: Next) -> Result<Response, ApiError> {
    state.engine()?;
    Ok(next.run(req).await)
}

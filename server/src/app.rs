//! [`router`]: every route and every layer, in one place.
//!
//! Layers, outermost first: `observe` (request id, span, in-flight guard, one log line, request
//! counter), panic
//! catcher (a panicking handler answers 500 in the envelope, never a dropped connection), body
//! limit (413); then, on the API routes only, `require_key` (401), `rate_limit::limit` (429, and
//! the `x-ratelimit-*` headers) and `require_ready` (503); innermost, on the generation routes,
//! `idempotency::guard` (`Idempotency-Key`: replay or 409). `/metrics` has its own key check,
//! `auth::require_metrics_key` (open when no metrics key is configured).

use std::any::Any;

use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;

use crate::error::ApiError;
use crate::routes::{self, chat, completions, health, models, openapi, tokenize};
use crate::state::{require_ready, AppState};
use crate::{auth, idempotency, logging, metrics, rate_limit};

/// The whole HTTP API over `state`. Installs the process's metrics recorder on first call.
pub fn router(state: AppState) -> Router {
    metrics::install();
    let api = Router::new()
        .route("/v1/chat/completions", post(chat::create).layer(from_fn_with_state(state.clone(), idempotency::guard)))
        .route(
            "/v1/completions",
            post(completions::create).layer(from_fn_with_state(state.clone(), idempotency::guard)),
        )
        .route("/v1/models", get(models::list))
        .route("/v1/models/{model}", get(models::retrieve))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        // Route layers run last-added first: the key is checked before readiness is revealed.
        .route_layer(from_fn_with_state(state.clone(), require_ready))
        .route_layer(from_fn_with_state(state.clone(), rate_limit::limit))
        .route_layer(from_fn_with_state(state.clone(), auth::require_key));
    Router::new()
        .route("/health", get(health::health))
        .route("/live", get(health::live))
        .route("/openapi.json", get(openapi::spec))
        .route(
            "/metrics",
            get(metrics::render).route_layer(from_fn_with_state(state.clone(), auth::require_metrics_key)),
        )
        .merge(api)
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config().body_limit))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(from_fn_with_state(state.clone(), logging::observe))
        .with_state(state)
}

/// A handler panicked: log what it said, answer a generic 500.
fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    ApiError::Internal(format!("handler panicked: {what}")).into_response()
}

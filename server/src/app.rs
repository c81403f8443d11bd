//! [`router`]: every route and every layer, in one place.
//!
//! Layers, outermost first: `observe` (request id, span, in-flight guard, one log line), panic
//! catcher (a panicking handler answers 500 in the envelope, never a dropped connection), body
//! limit (413); then, on the API routes only, `require_key` (401) and `require_ready` (503).

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
use crate::{auth, logging};

/// The whole HTTP API over `state`.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat::create))
        .route("/v1/completions", post(completions::create))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{model}", get(models::retrieve))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        // Route layers run last-added first: the key is checked before readiness is revealed.
        .route_layer(from_fn_with_state(state.clone(), require_ready))
        .route_layer(from_fn_with_state(state.clone(), auth::require_key));
    Router::new()
        .route("/health", get(health::health))
        .route("/live", get(health::live))
        .route("/openapi.json", get(openapi::spec))
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

//! [`ApiError`]: every way a request can fail, and the one place where a failure becomes an HTTP
//! status and OpenAI's error envelope `{"error": {"message", "type", "param", "code"}}`.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use sluice_engine::EngineError;

use crate::openai::{ErrorBody, ErrorResponse};

/// Seconds a client is told to wait (`Retry-After`) when the server is not ready or overloaded.
const RETRY_AFTER_SECS: u64 = 1;

/// A failed request. Messages are safe to show to the client; internal details are only logged.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Bad JSON, wrong types, out-of-range values, prompts over a limit. `param` names the field.
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong, naming the field in backticks.
        message: String,
        /// The field, as OpenAI reports it (`temperature`, `messages[0].content`).
        param: Option<String>,
    },
    /// Keys are configured and the request carries none.
    #[error("You didn't provide an API key. Pass it as a bearer token: `Authorization: Bearer YOUR_KEY`.")]
    MissingApiKey,
    /// Keys are configured and the request's key is not one of them.
    #[error("Incorrect API key provided.")]
    InvalidApiKey,
    /// The request names a model this server does not serve.
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    /// No route has this path.
    #[error("Unknown route: {method} {path}")]
    RouteNotFound {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
    },
    /// The path exists, the method does not.
    #[error("Method not allowed: {method} {path}")]
    MethodNotAllowed {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
    },
    /// The body is over the configured limit (bytes).
    #[error("The request body is larger than this server's limit of {0} bytes.")]
    BodyTooLarge(usize),
    /// The model is still loading or warming up.
    #[error("The model is still loading; retry shortly.")]
    NotReady,
    /// The server is shutting down and admits nothing new.
    #[error("The server is shutting down; retry on another replica.")]
    Draining,
    /// The caller's requests-per-minute or tokens-per-minute limit is used up (see `rate_limit`).
    #[error("{message}")]
    RateLimited {
        /// Which limit, its size and when to retry.
        message: String,
        /// When the request would fit; `None` when it never will (larger than the limit).
        retry_after: Option<Duration>,
    },
    /// The engine's waiting queue is full (back-pressure).
    #[error("The server is overloaded ({0} requests waiting); retry shortly.")]
    Overloaded(usize),
    /// The engine thread has stopped.
    #[error("The inference engine is not running.")]
    EngineStopped,
    /// Model execution failed repeatedly and the circuit breaker is open for this much longer.
    #[error("Model execution is failing and this server's circuit breaker is open; retry in {} s.", retry_secs(*.0))]
    BreakerOpen(Duration),
    /// The request ran past the configured request timeout.
    #[error("The request did not finish within this server's request timeout of {} s.", .0.as_secs())]
    Timeout(Duration),
    /// An `Idempotency-Key` reused with another request body.
    #[error("This `Idempotency-Key` was already used with a different request; use a new key for a new request.")]
    IdempotencyConflict,
    /// An `Idempotency-Key` whose first request is still running past this one's patience.
    #[error("A request with this `Idempotency-Key` is still in progress; retry later.")]
    IdempotencyInProgress,
    /// A user message matched an instruction-override rule and the server blocks them.
    #[error("The request was blocked by this server's input policy (rule `{rule}`).")]
    PromptInjection {
        /// The message at fault (`messages[1].content`).
        param: String,
        /// The rule that matched.
        rule: String,
    },
    /// Anything else; the detail is logged, the client sees a generic message.
    #[error("The server had an internal error while processing your request.")]
    Internal(String),
}

impl ApiError {
    /// An `InvalidRequest` whose `param` is the first backticked name in `message`.
    pub fn invalid(message: impl Into<String>) -> Self {
        let message = message.into();
        let param = param_from_message(&message);
        Self::InvalidRequest { message, param }
    }

    /// The HTTP status OpenAI uses for this failure.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::MissingApiKey | Self::InvalidApiKey => StatusCode::UNAUTHORIZED,
            Self::ModelNotFound(_) | Self::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::NotReady | Self::Draining | Self::Overloaded(_) | Self::EngineStopped | Self::BreakerOpen(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::IdempotencyConflict | Self::IdempotencyInProgress => StatusCode::CONFLICT,
            Self::PromptInjection { .. } => StatusCode::BAD_REQUEST,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The envelope's `type`.
    fn kind(&self) -> &'static str {
        match self.status() {
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_exceeded",
            s if s.is_client_error() => "invalid_request_error",
            _ => "server_error",
        }
    }

    /// The envelope's `code`.
    fn code(&self) -> Option<&'static str> {
        Some(match self {
            Self::InvalidRequest { .. } | Self::MissingApiKey => return None,
            Self::InvalidApiKey => "invalid_api_key",
            Self::ModelNotFound(_) => "model_not_found",
            Self::RouteNotFound { .. } => "unknown_url",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::BodyTooLarge(_) => "request_too_large",
            Self::RateLimited { .. } => "rate_limit_exceeded",
            Self::NotReady => "model_loading",
            Self::Draining => "shutting_down",
            Self::Overloaded(_) => "overloaded",
            Self::EngineStopped => "engine_stopped",
            Self::BreakerOpen(_) => "breaker_open",
            Self::Timeout(_) => "timeout",
            Self::IdempotencyConflict => "idempotency_key_reused",
            Self::IdempotencyInProgress => "idempotency_key_in_use",
            Self::PromptInjection { .. } => "prompt_injection",
            Self::Internal(_) => "internal_error",
        })
    }

    /// The envelope's `param`.
    fn param(&self) -> Option<String> {
        match self {
            Self::InvalidRequest { param, .. } => param.clone(),
            Self::PromptInjection { param, .. } => Some(param.clone()),
            Self::ModelNotFound(_) => Some("model".into()),
            _ => None,
        }
    }

    /// The error envelope, also sent as the last event of a stream that fails midway.
    pub fn body(&self) -> ErrorResponse {
        if let Self::Internal(detail) = self {
            // The one place internal details go: the log line (which carries the request id).
            tracing::error!(detail = %detail, "internal error");
        }
        crate::metrics::record_error(self.code().unwrap_or(self.kind()));
        ErrorResponse {
            error: ErrorBody {
                message: self.to_string(),
                kind: self.kind().to_string(),
                param: self.param(),
                code: self.code().map(str::to_string),
            },
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidRequest(message) => Self::invalid(message),
            EngineError::QueueFull(n) => Self::Overloaded(n),
            EngineError::EngineStopped => Self::EngineStopped,
            EngineError::BreakerOpen(retry_after) => Self::BreakerOpen(retry_after),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry_after = match &self {
            Self::RateLimited { retry_after, .. } => retry_after.map(|d| d.as_secs_f64().ceil().max(1.0) as u64),
            Self::BreakerOpen(remaining) => Some(retry_secs(*remaining)),
            _ => (status == StatusCode::SERVICE_UNAVAILABLE).then_some(RETRY_AFTER_SECS),
        };
        let mut response = (status, Json(self.body())).into_response();
        if let Some(secs) = retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Whole seconds to wait for `d`, at least 1 (`Retry-After` has no fractions).
fn retry_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

/// The first name in backticks in `message` (engine messages name their field that way).
fn param_from_message(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_string()).filter(|p| !p.is_empty() && !p.contains(' '))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_is_the_first_backticked_name() {
        assert_eq!(param_from_message("`top_p` must be in (0, 1], got 2").as_deref(), Some("top_p"));
        assert_eq!(param_from_message("`min_tokens` (3) must not exceed `max_tokens`").as_deref(), Some("min_tokens"));
        assert_eq!(param_from_message("no field here"), None);
        assert_eq!(param_from_message("`not a field` here"), None);
    }

    #[test]
    fn engine_errors_map_to_openai_statuses() {
        let cases = [
            (EngineError::InvalidRequest("`top_p` bad".into()), 400),
            (EngineError::QueueFull(4), 503),
            (EngineError::EngineStopped, 503),
            (EngineError::BreakerOpen(Duration::from_millis(300)), 503),
            (EngineError::Model("cuda out of memory at 0xdead".into()), 500),
        ];
        for (e, status) in cases {
            assert_eq!(ApiError::from(e).status().as_u16(), status);
        }
    }

    #[test]
    fn internal_details_never_reach_the_client() {
        let body = ApiError::from(EngineError::Model("secret path /opt/x".into())).body();
        assert!(!body.error.message.contains("secret"), "{}", body.error.message);
        assert_eq!(body.error.kind, "server_error");
    }

    #[test]
    fn rate_limited_answers_are_429_with_retry_after_in_whole_seconds() {
        let limited = |retry_after| ApiError::RateLimited { message: "limit".into(), retry_after };
        let r = limited(Some(Duration::from_millis(1200))).into_response();
        assert_eq!(
            (r.status(), &r.headers()[header::RETRY_AFTER]),
            (StatusCode::TOO_MANY_REQUESTS, &HeaderValue::from(2))
        );
        assert!(!limited(None).into_response().headers().contains_key(header::RETRY_AFTER));
        let body = limited(None).body();
        assert_eq!(
            (body.error.kind.as_str(), body.error.code.as_deref()),
            ("rate_limit_exceeded", Some("rate_limit_exceeded"))
        );
    }

    #[test]
    fn an_open_breaker_answers_503_with_its_remaining_cooldown() {
        let r = ApiError::from(EngineError::BreakerOpen(Duration::from_millis(2100))).into_response();
        assert_eq!(
            (r.status(), &r.headers()[header::RETRY_AFTER]),
            (StatusCode::SERVICE_UNAVAILABLE, &HeaderValue::from(3))
        );
        let r = ApiError::BreakerOpen(Duration::from_millis(10)).into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], HeaderValue::from(1));
        assert_eq!(ApiError::BreakerOpen(Duration::ZERO).body().error.code.as_deref(), Some("breaker_open"));
    }

    #[test]
    fn unavailable_answers_carry_retry_after() {
        for e in [ApiError::NotReady, ApiError::Draining, ApiError::Overloaded(1), ApiError::EngineStopped] {
            let r = e.into_response();
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert!(r.headers().contains_key(header::RETRY_AFTER));
        }
    }
}

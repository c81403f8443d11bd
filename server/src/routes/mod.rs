//! The handlers, one file per route family. Each one parses with [`crate::extract::ApiJson`],
//! converts with the `TryFrom`s of [`crate::validate`], and returns `Result<_, ApiError>`.

pub mod chat;
pub mod completions;
pub mod health;
pub mod models;
pub mod openapi;
pub mod tokenize;

use axum::http::{Method, Uri};
use sluice_engine::Tokenizer;

use crate::error::ApiError;

/// The text of one token, as logprobs report it (special tokens included).
pub(crate) fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

/// Fallback for unknown paths: 404 in the OpenAI envelope.
pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::RouteNotFound { method: method.to_string(), path: uri.path().to_string() }
}

/// Fallback for known paths with another method: 405 in the OpenAI envelope.
pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed { method: method.to_string(), path: uri.path().to_string() }
}

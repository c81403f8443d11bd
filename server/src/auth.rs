//! Bearer API keys. With keys configured, API routes need `Authorization: Bearer <key>`; with
//! none, the API is open (and the start-up log says so). `/health`, `/live` and `/openapi.json`
//! are always open, for probes and tooling.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;

use crate::error::ApiError;
use crate::state::AppState;

/// Middleware: 401 unless the request carries one of the configured keys.
pub async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Result<Response, ApiError> {
    check(&state.config().api_keys, req.headers())?;
    Ok(next.run(req).await)
}

/// `Ok` when `keys` is empty or the bearer token is one of them.
fn check(keys: &[String], headers: &HeaderMap) -> Result<(), ApiError> {
    if keys.is_empty() {
        return Ok(());
    }
    let token = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty())
        .ok_or(ApiError::MissingApiKey)?;
    // Every key is compared, each in constant time, so timing tells nothing about which matched.
    let matched = keys.iter().fold(false, |found, key| found | constant_time_eq(key.as_bytes(), token.as_bytes()));
    if matched {
        Ok(())
    } else {
        Err(ApiError::InvalidApiKey)
    }
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(AUTHORIZATION, a.parse().unwrap());
        }
        h
    }

    #[test]
    fn keys_are_checked_only_when_configured() {
        let keys = vec!["sk-one".to_string(), "sk-two".to_string()];
        assert!(check(&[], &headers(None)).is_ok());
        assert!(check(&keys, &headers(Some("Bearer sk-two"))).is_ok());
        assert!(check(&keys, &headers(Some("bearer  sk-one "))).is_ok());
        assert!(matches!(check(&keys, &headers(None)), Err(ApiError::MissingApiKey)));
        assert!(matches!(check(&keys, &headers(Some("Basic sk-one"))), Err(ApiError::MissingApiKey)));
        assert!(matches!(check(&keys, &headers(Some("Bearer sk-on"))), Err(ApiError::InvalidApiKey)));
        assert!(matches!(check(&keys, &headers(Some("Bearer sk-one2"))), Err(ApiError::InvalidApiKey)));
    }
}

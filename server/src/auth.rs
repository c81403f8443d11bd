//! Bearer API keys. With keys configured, API routes need `Authorization: Bearer <key>`; with
//! none, the API is open (and the start-up log says so). `/health`, `/live` and `/openapi.json`
//! are always open, for probes and tooling; `/metrics` is open unless a metrics key is configured
//! ([`require_metrics_key`]).
//!
//! A key is never logged: logs name it by its name from the keys file, or by its fingerprint
//! (`key-` and the first 8 hex digits of its SHA-256).

use std::fmt;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::logging::RequestLog;
use crate::state::AppState;

/// One accepted key and its settings. `Debug` shows the name, never the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    secret: String,
    /// What logs call the key: its name in the keys file, else `key-<fingerprint>`.
    pub name: String,
    /// Scheduling priority of requests that carry none.
    pub priority: Option<i32>,
    /// Requests per minute; `None` takes the server's default, `Some(0)` means unlimited.
    pub rpm: Option<u32>,
    /// Tokens per minute (prompt + `max_tokens`); `None` and `Some(0)` as for `rpm`.
    pub tpm: Option<u64>,
}

impl ApiKey {
    /// A key with no settings of its own, named by its fingerprint.
    pub fn new(secret: impl Into<String>) -> Self {
        let secret = secret.into();
        Self { name: format!("key-{}", fingerprint(&secret)), secret, priority: None, rpm: None, tpm: None }
    }

    /// One line of a keys file: `KEY [NAME] [priority=N] [rpm=N] [tpm=N]`; a `#` at the start of
    /// the line or of a word starts a comment (so a key may contain `#`, never start with it).
    /// `Ok(None)` for a blank or comment-only line; the error says what is wrong (never the key).
    pub fn parse_line(line: &str) -> Result<Option<Self>, String> {
        let mut words = line.split_whitespace().take_while(|w| !w.starts_with('#'));
        let Some(secret) = words.next() else { return Ok(None) };
        let mut key = Self::new(secret);
        let mut named = false;
        for word in words {
            let number =
                |v: &str| format!("`{}` must be a whole number, got `{v}`", word.split('=').next().unwrap_or(""));
            match word.split_once('=') {
                Some(("priority", v)) => key.priority = Some(v.parse().map_err(|_| number(v))?),
                Some(("rpm", v)) => key.rpm = Some(v.parse().map_err(|_| number(v))?),
                Some(("tpm", v)) => key.tpm = Some(v.parse().map_err(|_| number(v))?),
                Some((other, _)) => return Err(format!("unknown setting `{other}` (expected priority, rpm or tpm)")),
                None if !named => (key.name, named) = (word.to_string(), true),
                None => return Err(format!("unexpected `{word}` after the name (settings are `name=value`)")),
            }
        }
        Ok(Some(key))
    }
}

impl From<&str> for ApiKey {
    fn from(secret: &str) -> Self {
        Self::new(secret)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("priority", &self.priority)
            .field("rpm", &self.rpm)
            .field("tpm", &self.tpm)
            .finish_non_exhaustive()
    }
}

/// The first 8 hex digits of the SHA-256 of `secret`: enough to tell keys apart in logs, far
/// too little to recover one.
pub fn fingerprint(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// Which configured key a request carried: its index in `ApiConfig::api_keys`. Inserted as a
/// request extension by [`require_key`]; absent when the API is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyIndex(pub usize);

/// Middleware: 401 unless the request carries one of the configured keys. Records the key's name
/// in the request log and its [`KeyIndex`] in the request's extensions.
pub async fn require_key(State(state): State<AppState>, mut req: Request, next: Next) -> Result<Response, ApiError> {
    if let Some(index) = check(&state.config().api_keys, req.headers())? {
        if let (Some(log), Some(key)) = (req.extensions().get::<RequestLog>(), state.config().api_keys.get(index)) {
            log.authenticated(&key.name);
        }
        req.extensions_mut().insert(KeyIndex(index));
    }
    Ok(next.run(req).await)
}

/// Middleware for `/metrics`: 401 unless the request carries the metrics key
/// (`--metrics-key` / `SLUICE_METRICS_KEY`), which is separate from the API keys; with none
/// configured, `/metrics` is open. Put it on the route with
/// `.route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_metrics_key))`.
pub async fn require_metrics_key(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(key) = &state.config().metrics_key {
        check(std::slice::from_ref(key), req.headers())?;
    }
    Ok(next.run(req).await)
}

/// `Ok(None)` when `keys` is empty; `Ok(Some(index))` of the key the bearer token matches.
fn check(keys: &[ApiKey], headers: &HeaderMap) -> Result<Option<usize>, ApiError> {
    if keys.is_empty() {
        return Ok(None);
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
    let matched = keys.iter().enumerate().fold(None, |found, (i, key)| {
        let equal = constant_time_eq(key.secret.as_bytes(), token.as_bytes());
        found.or(equal.then_some(i))
    });
    matched.map(Some).ok_or(ApiError::InvalidApiKey)
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
        let keys: Vec<ApiKey> = vec!["sk-one".into(), "sk-two".into()];
        assert_eq!(check(&[], &headers(None)).unwrap(), None);
        assert_eq!(check(&keys, &headers(Some("Bearer sk-two"))).unwrap(), Some(1));
        assert_eq!(check(&keys, &headers(Some("bearer  sk-one "))).unwrap(), Some(0));
        assert!(matches!(check(&keys, &headers(None)), Err(ApiError::MissingApiKey)));
        assert!(matches!(check(&keys, &headers(Some("Basic sk-one"))), Err(ApiError::MissingApiKey)));
        assert!(matches!(check(&keys, &headers(Some("Bearer sk-on"))), Err(ApiError::InvalidApiKey)));
        assert!(matches!(check(&keys, &headers(Some("Bearer sk-one2"))), Err(ApiError::InvalidApiKey)));
    }

    #[test]
    fn key_lines_carry_a_name_and_settings() {
        let key = ApiKey::parse_line("  sk-abc  batch  priority=-2 rpm=60 tpm=100000 # nightly jobs").unwrap().unwrap();
        assert_eq!((key.name.as_str(), key.priority, key.rpm, key.tpm), ("batch", Some(-2), Some(60), Some(100_000)));
        assert_eq!(check(std::slice::from_ref(&key), &headers(Some("Bearer sk-abc"))).unwrap(), Some(0));
        let bare = ApiKey::parse_line("sk-abc").unwrap().unwrap();
        assert_eq!((bare.priority, bare.rpm, bare.tpm), (None, None, None));
        assert_eq!(bare.name, format!("key-{}", fingerprint("sk-abc")));
        assert_eq!(ApiKey::parse_line("   # only a comment"), Ok(None));
        // A `#` inside a key is part of it.
        let hashed = ApiKey::parse_line("sk#abc ops #comment").unwrap().unwrap();
        assert_eq!(check(std::slice::from_ref(&hashed), &headers(Some("Bearer sk#abc"))).unwrap(), Some(0));
        assert!(check(std::slice::from_ref(&hashed), &headers(Some("Bearer sk"))).is_err());
        assert_eq!(ApiKey::parse_line(""), Ok(None));
        for bad in ["sk-x rpm=many", "sk-x name other", "sk-x burst=3", "sk-x priority=1.5"] {
            let e = ApiKey::parse_line(bad).unwrap_err();
            assert!(!e.contains("sk-x"), "the error must not echo the key: {e}");
        }
    }

    #[test]
    fn logs_see_a_fingerprint_never_the_key() {
        // The SHA-256 of "sk-test" is f3abf2a6cc4f...: the fingerprint is stable across runs and machines.
        let fp = fingerprint("sk-test");
        assert_eq!(fp, "f3abf2a6");
        assert_ne!(fp, fingerprint("sk-tesu"));
        let key = ApiKey::new("sk-test-secret-value");
        let shown = format!("{key:?}");
        assert!(shown.contains(&key.name) && !shown.contains("secret-value"), "{shown}");
    }
}

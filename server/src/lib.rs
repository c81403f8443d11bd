//! # Sluice server
//!
//! The OpenAI-compatible HTTP API in front of a [`sluice_engine::Engine`]: an application written
//! against the official OpenAI SDKs works by changing only `base_url` and `api_key`.
//!
//! # Layout
//! - `app`: [`router`], every route and layer in one place.
//! - `state`: [`AppState`], what handlers share (engine once loaded, phase, settings).
//! - `openai`: the wire types (serde + utoipa), and nothing else.
//! - `validate`: the one `TryFrom` per route from wire request to [`validate::GenerateRequest`];
//!   the only place a request is rejected for its shape.
//! - `extract`: [`extract::ApiJson`], the JSON body extractor whose rejections are OpenAI errors.
//! - `generate`: tokenize, check limits, submit `n` choices, gather them (non-stream).
//! - `sse`: drives token streams to server-sent events (keep-alive, deadline, forced shutdown).
//! - `routes`: one file per route family (chat, completions, models, tokenize, health, openapi).
//! - `error`: [`ApiError`], the one mapping from any failure to a status and the error envelope.
//! - `auth`: bearer API keys (names, fingerprints, per-key settings) and the `/metrics` key.
//! - `rate_limit`: requests and tokens per minute per key or client address, `x-ratelimit-*`.
//! - `cache`: the response cache of deterministic answers, with single flight (`x-cache`).
//! - `idempotency`: `Idempotency-Key`, a retried request gets the first one's response.
//! - `single_flight`: identical requests wait for the one computing their answer (cache, idempotency).
//! - `filter`: input checks (control characters, instruction overrides) and output redaction.
//! - `config`: flags, `SLUICE_*` environment and TOML file merged into one validated [`ServerConfig`].
//! - `logging`: the `tracing` subscriber and the per-request middleware (id, span, one log line).
//! - `metrics`: `GET /metrics` (Prometheus text, vLLM's metric names with a `sluice_` prefix).
//! - `shutdown`: draining, in-flight tracking and the grace period.
//! - `server`: [`serve`], start-up (port first, model behind it) to exit.

pub mod app;
pub mod auth;
pub mod cache;
pub mod config;
pub mod error;
pub mod extract;
pub mod filter;
pub mod generate;
pub mod idempotency;
pub mod logging;
pub mod metrics;
pub mod openai;
pub mod rate_limit;
pub mod routes;
pub mod server;
pub mod shutdown;
pub mod single_flight;
pub mod sse;
pub mod state;
pub mod validate;

pub use app::router;
pub use config::{ApiConfig, ServerConfig};
pub use error::ApiError;
pub use server::{load_engine, serve};
pub use state::AppState;

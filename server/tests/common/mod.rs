//! Shared helpers for the server's tests: one engine on the real default model per test binary.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, LazyLock};

use sluice_engine::{Engine, EngineConfig};
use sluice_server::{ApiConfig, AppState};

/// The served model name the tests use.
pub const MODEL: &str = "smol";

/// The default model. Missing it is a failure with instructions, never a silent skip.
pub fn model_path() -> PathBuf {
    let path = EngineConfig::default_model_path();
    assert!(path.is_file(), "the default model is missing at {}: run `make model` first", path.display());
    path
}

static ENGINE: LazyLock<Arc<Engine>> = LazyLock::new(|| {
    let mut config = EngineConfig::new(model_path());
    // Room for the concurrent tests (32 streams of ~60 tokens) without a gigabyte of cache.
    config.kv_cache_memory = 256 << 20;
    Arc::new(Engine::new(config).expect("the engine loads the default model"))
});

/// The test binary's one engine, loaded on first use.
pub fn engine() -> Arc<Engine> {
    ENGINE.clone()
}

/// The API settings of the tests: the model served as [`MODEL`].
pub fn api_config() -> ApiConfig {
    ApiConfig { served_model_name: MODEL.into(), ..ApiConfig::default() }
}

/// A ready state over the shared engine with `api` settings.
pub fn ready_state(api: ApiConfig) -> AppState {
    let state = AppState::new(api);
    state.set_engine(engine());
    state
}

/// A chat request body for one user message.
pub fn chat_body(content: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut body = serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": content}]});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

pub mod child;

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
    config.kv_cache_memory = Some(256 << 20);
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

/// A server on a real socket (`127.0.0.1:0`) over `state`, run on its own thread and runtime.
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub state: AppState,
}

impl TestServer {
    /// Binds, then serves `state` until the process ends.
    pub fn start(state: AppState) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let addr = listener.local_addr().expect("bound address");
        let served = state.clone();
        std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                let grace = std::time::Duration::from_secs(1);
                sluice_server::server::run(listener, served, grace, std::future::pending()).await.expect("server runs");
            });
        });
        Self { addr, state }
    }

    /// The URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// A reqwest client for the socket tests (a generous timeout: the model runs on the CPU).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(std::time::Duration::from_secs(120)).build().expect("client")
}

pub mod child;

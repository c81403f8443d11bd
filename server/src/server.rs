//! [`serve`]: from a validated configuration to a running server, and back to exit. The port
//! opens first; the model loads behind it (answering 503 `loading` meanwhile); a signal drains.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use sluice_engine::{Engine, EngineConfig, Request};
use tokio::net::TcpListener;

use crate::app::router;
use crate::config::ServerConfig;
use crate::logging::LogFormat;
use crate::shutdown;
use crate::state::AppState;

/// Runs `sluice serve` until a signal has drained it. Fails when the port cannot be bound or the
/// model cannot be loaded.
pub async fn serve(config: ServerConfig) -> anyhow::Result<()> {
    let listener = TcpListener::bind((config.host.as_str(), config.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", config.host, config.port))?;
    let addr = listener.local_addr()?;
    // Before the engine starts, so that its first steps (the warm-up) are counted too.
    crate::metrics::install();
    let state = AppState::new(config.api.clone());
    match state.config().api_keys.len() {
        0 => tracing::warn!(
            "no API keys configured (SLUICE_API_KEYS or --api-key-file): the API is open to anyone who can reach it"
        ),
        n => {
            // Names (or fingerprints) only: keys themselves are never logged.
            let names: Vec<&str> = state.config().api_keys.iter().map(|k| k.name.as_str()).collect();
            tracing::info!(keys = n, names = ?names, "API keys required");
        }
    }
    let limits = state.config().rate_limit;
    if limits.rpm > 0 || limits.tpm > 0 || state.config().api_keys.iter().any(|k| k.rpm.is_some() || k.tpm.is_some()) {
        tracing::info!(rpm = limits.rpm, tpm = limits.tpm, trusted_proxy = limits.trusted_proxy, "rate limits on");
    }
    tracing::info!(%addr, model = %config.engine.model.display(), "listening; loading the model");
    let server = run(listener, state.clone(), config.shutdown_grace, shutdown::signal());
    tokio::pin!(server);
    tokio::select! {
        // A signal while loading: drained at once, nothing to wait for.
        done = &mut server => return done.context("server failed"),
        loaded = load_engine(&state, config.engine.clone()) => {
            loaded.context("cannot load the model")?;
        }
    }
    announce(addr, &state, config.log_format);
    server.await.context("server failed")
}

/// Serves `router(state)` on `listener` until `signal` resolves, then drains for up to `grace`.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    grace: std::time::Duration,
    signal: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state.clone());
    // The peer's address is what rate limits key clients without an API key on.
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move {
            signal.await;
            state.shutdown().drain(grace).await;
        })
        .await
}

/// Loads the model on a blocking thread, runs one warm-up step, and marks `state` ready.
pub async fn load_engine(state: &AppState, config: EngineConfig) -> anyhow::Result<Arc<Engine>> {
    let started = Instant::now();
    let engine = tokio::task::spawn_blocking(move || -> anyhow::Result<Engine> {
        let engine = Engine::new(config)?;
        // One real step before `/health` says ok: the first step pays for lazy initialisation.
        engine.generate(Request::text("Hello").max_tokens(1)).context("warm-up step failed")?;
        Ok(engine)
    })
    .await
    .context("the loading thread panicked")??;
    let engine = Arc::new(engine);
    state.set_engine(engine.clone());
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "model loaded and warmed up: ready");
    Ok(engine)
}

/// Tells the user where to point a client.
fn announce(addr: SocketAddr, state: &AppState, format: LogFormat) {
    let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    let base_url = format!("http://{host}:{}/v1", addr.port());
    let auth = if state.config().api_keys.is_empty() { "" } else { " -H \"Authorization: Bearer $SLUICE_API_KEY\"" };
    let curl = format!(
        "curl {base_url}/chat/completions -H 'Content-Type: application/json'{auth} -d '{{\"model\": \"{}\", \"messages\": [{{\"role\": \"user\", \"content\": \"What is the capital of France?\"}}], \"max_tokens\": 32}}'",
        state.config().served_model_name
    );
    match format {
        LogFormat::Text => println!("\nSluice is ready. OpenAI base URL: {base_url}\nTry it:\n  {curl}\n"),
        LogFormat::Json => tracing::info!(base_url = %base_url, curl = %curl, "ready"),
    }
}

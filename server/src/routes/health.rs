//! `GET /health` (readiness) and `GET /live` (liveness).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use crate::openai::HealthResponse;
use crate::state::AppState;

/// Readiness: 200 `{"status":"ok",...}` once the model is loaded and warmed up and the engine
/// runs; 503 with `loading`, `draining`, `engine_stopped` or `breaker_open` otherwise.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses(
        (status = 200, description = "Ready", body = HealthResponse),
        (status = 503, description = "Loading, draining, the engine has stopped, or the circuit breaker is open", body = HealthResponse),
    )
)]
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<HealthResponse>) {
    let (status, body) = state.health();
    (status, Json(body))
}

/// Liveness: 200 while the process answers.
#[utoipa::path(get, path = "/live", tag = "operations", responses((status = 200, description = "Alive")))]
pub async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "alive"}))
}

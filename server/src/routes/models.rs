//! `GET /v1/models` and `GET /v1/models/{model}`.

use axum::extract::{Path, State};
use axum::Json;

use crate::error::ApiError;
use crate::openai::{ErrorResponse, ModelCard, ModelList};
use crate::state::AppState;

fn card(state: &AppState) -> Result<ModelCard, ApiError> {
    let engine = state.engine()?;
    Ok(ModelCard {
        id: state.config().served_model_name.clone(),
        object: "model".into(),
        created: state.started(),
        owned_by: "sluice".into(),
        max_model_len: engine.model_info().max_model_len,
    })
}

/// Lists the served model.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    responses(
        (status = 200, description = "The served model", body = ModelList),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 503, description = "Loading or draining", body = ErrorResponse),
    ),
    security(("api_key" = []))
)]
pub async fn list(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    Ok(Json(ModelList { object: "list".into(), data: vec![card(&state)?] }))
}

/// Describes one model: the served one, else 404.
#[utoipa::path(
    get,
    path = "/v1/models/{model}",
    tag = "openai",
    params(("model" = String, Path, description = "The served model's name")),
    responses(
        (status = 200, description = "The model", body = ModelCard),
        (status = 404, description = "Unknown model", body = ErrorResponse),
    ),
    security(("api_key" = []))
)]
pub async fn retrieve(State(state): State<AppState>, Path(model): Path<String>) -> Result<Json<ModelCard>, ApiError> {
    state.check_model(Some(&model))?;
    Ok(Json(card(&state)?))
}

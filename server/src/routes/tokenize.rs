//! `POST /tokenize` and `POST /detokenize` (vLLM's shapes).

use axum::extract::State;
use axum::Json;
use sluice_engine::Prompt;

use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::openai::{DetokenizeRequest, DetokenizeResponse, ErrorResponse, TokenizeRequest, TokenizeResponse};
use crate::state::AppState;
use crate::validate::chat_message;

/// Tokenizes a prompt, or chat messages through the model's chat template.
#[utoipa::path(
    post,
    path = "/tokenize",
    tag = "tokenizer",
    request_body = TokenizeRequest,
    responses(
        (status = 200, description = "The token ids", body = TokenizeResponse),
        (status = 400, description = "Neither or both of `prompt` and `messages`", body = ErrorResponse),
    ),
    security(("api_key" = []))
)]
pub async fn tokenize(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let engine = state.engine()?;
    state.check_model(req.model.as_deref())?;
    let tokens = match (req.prompt, req.messages) {
        (Some(prompt), None) => engine.tokenizer().encode(&prompt, req.add_special_tokens.unwrap_or(true))?,
        (None, Some(messages)) => {
            let messages = messages.into_iter().enumerate().map(chat_message).collect::<Result<Vec<_>, _>>()?;
            engine.tokenize_prompt(&Prompt::Chat(messages))?
        }
        _ => return Err(ApiError::invalid("give exactly one of `prompt` and `messages`")),
    };
    Ok(Json(TokenizeResponse { count: tokens.len(), max_model_len: engine.model_info().max_model_len, tokens }))
}

/// Turns token ids back into text.
#[utoipa::path(
    post,
    path = "/detokenize",
    tag = "tokenizer",
    request_body = DetokenizeRequest,
    responses(
        (status = 200, description = "The text", body = DetokenizeResponse),
        (status = 400, description = "A token id outside the vocabulary", body = ErrorResponse),
    ),
    security(("api_key" = []))
)]
pub async fn detokenize(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let engine = state.engine()?;
    state.check_model(req.model.as_deref())?;
    let vocab = engine.tokenizer().vocab_size();
    if let Some(bad) = req.tokens.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::invalid(format!("`tokens` holds {bad}, outside the vocabulary of {vocab}")));
    }
    Ok(Json(DetokenizeResponse { prompt: engine.tokenizer().decode(&req.tokens, false)? }))
}

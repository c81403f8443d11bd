//! `POST /v1/chat/completions`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use sluice_engine::{Completion, Engine, Finish, TokenEvent, TokenLogprob};

use super::token_text;
use crate::cache::CacheControl;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::filter;
use crate::generate::{self, Cutoff};
use crate::logging::RequestLog;
use crate::openai::{
    unix_now, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatDelta,
    ChatLogprobs, ChatMessageOut, ErrorResponse, TokenLogprobEntry, TopLogprob, Usage,
};
use crate::rate_limit::Caller;
use crate::sse::{self, json_event, ChunkWriter, StreamOptions};
use crate::state::AppState;
use crate::validate::GenerateRequest;

/// Creates a chat completion, whole or streamed.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "A `chat.completion`, or with `stream` a `text/event-stream` of `chat.completion.chunk`s ending with `data: [DONE]`", body = ChatCompletion),
        (status = 400, description = "Invalid request; `param` names the field", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 413, description = "Body over the limit", body = ErrorResponse),
        (status = 429, description = "Over the caller's requests or tokens per minute; see `Retry-After` and `x-ratelimit-*`", body = ErrorResponse),
        (status = 503, description = "Loading, draining or overloaded; see `Retry-After`", body = ErrorResponse),
    ),
    security(("api_key" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    Extension(log): Extension<RequestLog>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let req = filter::screen(state.config(), GenerateRequest::try_from(body)?)?;
    let mut cutoff = Cutoff::new(&state);
    let caller = caller.map_or_else(Caller::unlimited, |Extension(c)| c);
    let generation = generate::start(&state, &req, &caller, &log, CacheControl::from_headers(&headers)).await?;
    let cache = generation.cache;
    let chunks = ChatChunks {
        id: format!("chatcmpl-{}", log.id()),
        created: unix_now(),
        model: state.config().served_model_name.clone(),
        engine: generation.engine.clone(),
    };
    if req.stream {
        let options = StreamOptions { include_usage: req.include_usage, keep_alive: state.config().sse_keep_alive };
        return Ok(cache.tag(sse::respond(generation, chunks, options, cutoff, log)));
    }
    let prompt_tokens = generation.prompt_tokens;
    let completions = generate::gather(generation, &mut cutoff).await?;
    completions.iter().for_each(|c| log.finished(&c.finish));
    let completion_tokens = completions.iter().map(|c| c.finish.usage.completion_tokens).sum();
    let cached_tokens = completions.iter().map(|c| c.finish.usage.cached_tokens).max().unwrap_or(0);
    let logprobs = req.params.logprobs.is_some();
    let choices = completions.into_iter().enumerate().map(|(i, c)| chunks.choice(i, c, logprobs)).collect();
    let body = ChatCompletion {
        id: chunks.id,
        object: "chat.completion".into(),
        created: chunks.created,
        model: chunks.model,
        choices,
        usage: Usage::new(prompt_tokens, completion_tokens, cached_tokens),
    };
    Ok(cache.tag(Json(body).into_response()))
}

/// Writes chat responses and chunks for one request.
struct ChatChunks {
    id: String,
    created: u64,
    model: String,
    engine: Arc<Engine>,
}

impl ChatChunks {
    fn logprob_entry(&self, lp: &TokenLogprob) -> TokenLogprobEntry {
        let tokenizer = self.engine.tokenizer();
        let top = |&(id, logprob): &(u32, f32)| {
            let token = token_text(tokenizer, id);
            TopLogprob { bytes: token.clone().into_bytes(), token, logprob }
        };
        let token = token_text(tokenizer, lp.token);
        TokenLogprobEntry {
            bytes: token.clone().into_bytes(),
            token,
            logprob: lp.logprob,
            top_logprobs: lp.top.iter().map(top).collect(),
        }
    }

    fn choice(&self, index: usize, c: Completion, logprobs: bool) -> ChatChoice {
        ChatChoice {
            index,
            message: ChatMessageOut { role: "assistant".into(), content: c.text },
            logprobs: logprobs
                .then(|| ChatLogprobs { content: c.logprobs.iter().map(|l| self.logprob_entry(l)).collect() }),
            finish_reason: c.finish.reason.as_str().into(),
        }
    }

    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> Event {
        json_event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }
}

impl ChunkWriter for ChatChunks {
    fn start(&mut self, index: usize) -> Option<Event> {
        let delta = ChatDelta { role: Some("assistant".into()), content: Some(String::new()) };
        Some(self.chunk(vec![ChatChunkChoice { index, delta, logprobs: None, finish_reason: None }], None))
    }

    fn token(&mut self, index: usize, token: TokenEvent) -> Option<Event> {
        if token.text.is_empty() && token.logprob.is_none() {
            return None;
        }
        let logprobs = token.logprob.map(|lp| ChatLogprobs { content: vec![self.logprob_entry(&lp)] });
        let delta = ChatDelta { role: None, content: Some(token.text) };
        Some(self.chunk(vec![ChatChunkChoice { index, delta, logprobs, finish_reason: None }], None))
    }

    fn finish(&mut self, index: usize, finish: &Finish) -> Event {
        let finish_reason = Some(finish.reason.as_str().to_string());
        self.chunk(vec![ChatChunkChoice { index, delta: ChatDelta::default(), logprobs: None, finish_reason }], None)
    }

    fn usage(&mut self, usage: Usage) -> Event {
        self.chunk(Vec::new(), Some(usage))
    }
}

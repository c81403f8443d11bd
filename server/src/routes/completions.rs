//! `POST /v1/completions` (legacy text completions).

use std::collections::HashMap;
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
    unix_now, CompletionChoice, CompletionLogprobs, CompletionRequest, ErrorResponse, TextCompletion, Usage,
};
use crate::rate_limit::Caller;
use crate::sse::{self, json_event, ChunkWriter, StreamOptions};
use crate::state::AppState;
use crate::validate::GenerateRequest;

/// Creates a text completion, whole or streamed.
#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "openai",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "A `text_completion`, or with `stream` a `text/event-stream` of them ending with `data: [DONE]`", body = TextCompletion),
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
    ApiJson(body): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let req = filter::screen(state.config(), GenerateRequest::try_from(body)?)?;
    let mut cutoff = Cutoff::new(&state);
    let caller = caller.map_or_else(Caller::unlimited, |Extension(c)| c);
    let generation = generate::start(&state, &req, &caller, &log, CacheControl::from_headers(&headers)).await?;
    let cache = generation.cache;
    let choices = generation.choices;
    let chunks = TextChunks {
        id: format!("cmpl-{}", log.id()),
        created: unix_now(),
        model: state.config().served_model_name.clone(),
        engine: generation.engine.clone(),
        offsets: vec![0; choices],
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
    let body = TextCompletion {
        id: chunks.id,
        object: "text_completion".into(),
        created: chunks.created,
        model: chunks.model,
        choices,
        usage: Some(Usage::new(prompt_tokens, completion_tokens, cached_tokens)),
    };
    Ok(cache.tag(Json(body).into_response()))
}

/// Writes text completions and chunks for one request.
struct TextChunks {
    id: String,
    created: u64,
    model: String,
    engine: Arc<Engine>,
    /// Per choice: characters of text sent so far (the next token's `text_offset`).
    offsets: Vec<usize>,
}

impl TextChunks {
    /// Appends one token to legacy logprobs; `offset` is its position in the choice's text.
    fn push_logprob(&self, out: &mut CompletionLogprobs, lp: &TokenLogprob, offset: usize) -> usize {
        let tokenizer = self.engine.tokenizer();
        let token = token_text(tokenizer, lp.token);
        let len = token.chars().count();
        let top: HashMap<String, f32> = lp.top.iter().map(|&(id, l)| (token_text(tokenizer, id), l)).collect();
        out.tokens.push(token);
        out.token_logprobs.push(lp.logprob);
        out.top_logprobs.push(top);
        out.text_offset.push(offset);
        offset + len
    }

    fn choice(&self, index: usize, c: Completion, logprobs: bool) -> CompletionChoice {
        let logprobs = logprobs.then(|| {
            let mut out = CompletionLogprobs::default();
            c.logprobs.iter().fold(0, |offset, lp| self.push_logprob(&mut out, lp, offset));
            out
        });
        CompletionChoice { index, text: c.text, logprobs, finish_reason: Some(c.finish.reason.as_str().into()) }
    }

    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> Event {
        json_event(&TextCompletion {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }
}

impl ChunkWriter for TextChunks {
    fn start(&mut self, _index: usize) -> Option<Event> {
        None
    }

    fn token(&mut self, index: usize, token: TokenEvent) -> Option<Event> {
        if token.text.is_empty() && token.logprob.is_none() {
            return None;
        }
        let offset = self.offsets.get(index).copied().unwrap_or(0);
        let logprobs = token.logprob.map(|lp| {
            let mut out = CompletionLogprobs::default();
            self.push_logprob(&mut out, &lp, offset);
            out
        });
        if let Some(o) = self.offsets.get_mut(index) {
            *o += token.text.chars().count();
        }
        Some(self.chunk(vec![CompletionChoice { index, text: token.text, logprobs, finish_reason: None }], None))
    }

    fn finish(&mut self, index: usize, finish: &Finish) -> Event {
        let finish_reason = Some(finish.reason.as_str().to_string());
        self.chunk(vec![CompletionChoice { index, text: String::new(), logprobs: None, finish_reason }], None)
    }

    fn usage(&mut self, usage: Usage) -> Event {
        self.chunk(Vec::new(), Some(usage))
    }
}

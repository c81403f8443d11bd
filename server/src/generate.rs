//! From a [`GenerateRequest`] to token streams: tokenize each prompt once, check it against the
//! prompt limit, resolve `max_tokens`, submit `n` choices that share the prompt's ids; then, for
//! non-streamed answers, gather them. [`Cutoff`] ends a request early at its deadline or when a
//! shutdown's grace period is over. Dropping the streams (a client that went away) aborts them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sluice_engine::{Completion, Engine, Prompt, Request, TokenStream};
use tokio::time::{Instant, Sleep};

use crate::error::ApiError;
use crate::logging::RequestLog;
use crate::state::AppState;
use crate::validate::GenerateRequest;

/// Submitted choices, in `index` order (`prompt * n + choice`).
#[derive(Debug)]
pub struct Generation {
    /// The engine that runs them (its tokenizer decodes logprobs).
    pub engine: Arc<Engine>,
    /// One stream per choice.
    pub streams: Vec<TokenStream>,
    /// Prompt tokens, each prompt counted once however many choices share it.
    pub prompt_tokens: usize,
}

/// Tokenizes, checks and submits every choice of `req`. Fails before anything runs when any
/// prompt is over a limit; a later failure (queue full) drops, and so aborts, what was submitted.
pub fn start(state: &AppState, req: &GenerateRequest, log: &RequestLog) -> Result<Generation, ApiError> {
    let engine = state.engine()?.clone();
    state.check_model(req.model.as_deref())?;
    let info = engine.model_info();
    let limit = state.config().max_prompt_tokens.min(info.max_model_len);
    let mut prompts = Vec::with_capacity(req.prompts.len());
    for prompt in &req.prompts {
        let ids = engine.tokenize_prompt(prompt)?;
        if ids.len() > limit {
            return Err(prompt_too_long(prompt, ids.len(), limit));
        }
        prompts.push(ids);
    }
    let prompt_tokens = prompts.iter().map(Vec::len).sum();
    log.started(prompt_tokens, req.user.clone());
    let mut streams = Vec::with_capacity(prompts.len() * req.n);
    for ids in prompts {
        let max_tokens = req.max_tokens.unwrap_or_else(|| info.max_model_len.saturating_sub(ids.len()).max(1));
        for choice in 0..req.n {
            let mut params = req.params.clone();
            params.max_tokens = max_tokens;
            // Seeded choices must still differ from one another.
            params.seed = params.seed.map(|seed| seed.wrapping_add(choice as u64));
            let request = Request::tokens(Vec::new()).with_params(params).with_priority(req.priority);
            streams.push(engine.submit_tokens(ids.clone(), request)?);
        }
    }
    Ok(Generation { engine, streams, prompt_tokens })
}

fn prompt_too_long(prompt: &Prompt, tokens: usize, limit: usize) -> ApiError {
    let param = if matches!(prompt, Prompt::Chat(_)) { "messages" } else { "prompt" };
    ApiError::InvalidRequest {
        message: format!(
            "The prompt (`{param}`) is {tokens} tokens long, more than this server's limit of {limit} tokens."
        ),
        param: Some(param.to_string()),
    }
}

/// Waits for every choice to finish; the first failure, the deadline or the cut ends them all.
pub async fn gather(streams: Vec<TokenStream>, cutoff: &mut Cutoff) -> Result<Vec<Completion>, ApiError> {
    let all = futures_util::future::try_join_all(streams.into_iter().map(TokenStream::collect));
    tokio::select! {
        done = all => done.map_err(ApiError::from),
        error = cutoff.reached() => Err(error),
    }
}

/// When a running request must end early: its deadline (the request timeout from arrival), or
/// the end of a shutdown's grace period.
pub struct Cutoff {
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    cut: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Cutoff {
    /// A cutoff for a request arriving now.
    pub fn new(state: &AppState) -> Self {
        let timeout = state.config().request_timeout;
        Self {
            timeout,
            deadline: Box::pin(tokio::time::sleep_until(Instant::now() + timeout)),
            cut: Box::pin(state.shutdown().on_cut()),
        }
    }

    /// Resolves with the error to end the request with. Cancel-safe: a `select!` may drop it
    /// and call it again.
    pub async fn reached(&mut self) -> ApiError {
        tokio::select! {
            () = &mut self.deadline => ApiError::Timeout(self.timeout),
            () = &mut self.cut => ApiError::Draining,
        }
    }
}

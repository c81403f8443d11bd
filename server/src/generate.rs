//! From a [`GenerateRequest`] to token streams: tokenize each prompt once, check it against the
//! prompt limit, resolve `max_tokens`, charge the caller's tokens-per-minute bucket, submit `n`
//! choices that share the prompt's ids; then, for non-streamed answers, gather them. [`Cutoff`] ends a request early at its deadline or when a
//! shutdown's grace period is over. Dropping the streams (a client that went away) aborts them.
//!
//! Between tokenizing and submitting sits the response cache ([`crate::cache`]): a deterministic
//! request may be answered by replaying a finished answer, or by waiting for an identical one in
//! flight. Live or replayed, the events then pass the output filter ([`crate::filter::output`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use sluice_engine::{Completion, Engine, EngineError, Finish, ModelInfo, Prompt, Request, StreamEvent, TokenLogprob};
use tokio::time::{Instant, Sleep};

use crate::cache::{self, CacheControl, CacheStatus, Lookup};
use crate::filter::output;

use crate::error::ApiError;
use crate::logging::RequestLog;
use crate::rate_limit::{self, Caller, TokenCharge};
use crate::state::AppState;
use crate::validate::GenerateRequest;

/// Every choice's events, merged, each tagged with its choice's `index` (`prompt * n + choice`).
/// Each choice ends with `Finished` or `Error`. Dropping it aborts what is still running.
pub type Events = Pin<Box<dyn Stream<Item = (usize, StreamEvent)> + Send>>;

/// A request's answer under way: live from the engine or replayed from the response cache.
pub struct Generation {
    /// The engine (its tokenizer decodes logprobs).
    pub engine: Arc<Engine>,
    /// The choices' events, output filter applied.
    pub events: Events,
    /// Number of choices.
    pub choices: usize,
    /// Prompt tokens, each prompt counted once however many choices share it.
    pub prompt_tokens: usize,
    /// The tokens charged to the caller; record generated tokens on it, and drop it when the
    /// request is over (its unused `max_tokens` go back to the caller's bucket).
    pub charge: TokenCharge,
    /// How the response cache answered (`x-cache`).
    pub cache: CacheStatus,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("choices", &self.choices)
            .field("prompt_tokens", &self.prompt_tokens)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

/// Tokenizes, checks and charges `req`, then answers it from the response cache (per `control`)
/// or submits every choice. Fails before anything runs when any prompt is over a limit or the
/// caller is out of tokens; a later failure (queue full) drops, and so aborts and refunds, what
/// was submitted.
pub async fn start(
    state: &AppState,
    req: &GenerateRequest,
    caller: &Caller,
    log: &RequestLog,
    control: CacheControl,
) -> Result<Generation, ApiError> {
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
    let reserved = prompts.iter().map(|ids| max_tokens_of(req, info, ids).min(reservation(req)) * req.n).sum();
    let charge = caller.charge(prompt_tokens, reserved)?;
    if req.params.response_format.is_structured() {
        // Compile the schema or pattern off the async threads (the submissions below find it
        // compiled), and name the request's own field if it cannot be.
        let (compiler, format) = (engine.clone(), req.params.response_format.clone());
        tokio::task::spawn_blocking(move || compiler.prepare_response_format(&format))
            .await
            .map_err(|e| ApiError::Internal(format!("compiling the output constraint: {e}")))?
            .map_err(|e| named(e, req.format_field))?;
    }
    log.started(prompt_tokens, req.user.clone());
    let choices = prompts.len() * req.n;
    let key = cache::key(&state.config().served_model_name, &prompts, req);
    // Waiting on an identical request's answer takes at most half of this one's deadline.
    let patience = state.config().request_timeout / 2;
    let (events, cache) = match state.response_cache().lookup(key, control, patience).await {
        Lookup::Hit(recording) => (recording.replay(), CacheStatus::Hit),
        Lookup::Miss(flight) => (flight.record(submit(&engine, req, caller, prompts)?, choices), CacheStatus::Miss),
        Lookup::Bypass => (submit(&engine, req, caller, prompts)?, CacheStatus::Bypass),
    };
    let events = output::redact_events(events, choices, &state.config().redact);
    Ok(Generation { engine, events, choices, prompt_tokens, charge, cache })
}

/// Completion tokens a choice reserves against the caller's tokens per minute (at most its
/// `max_tokens`): the client's `max_tokens`, else [`rate_limit::DEFAULT_RESERVATION`].
fn reservation(req: &GenerateRequest) -> usize {
    req.max_tokens.unwrap_or(rate_limit::DEFAULT_RESERVATION)
}

/// `max_tokens` of a prompt: the client's, or what is left of the context, and of the KV cache
/// when it holds less than a whole context (a sequence's last token is never stored).
fn max_tokens_of(req: &GenerateRequest, info: &ModelInfo, ids: &[u32]) -> usize {
    req.max_tokens.unwrap_or_else(|| {
        let room = info.max_model_len.min(info.num_kv_blocks * info.block_size + 1);
        room.saturating_sub(ids.len()).max(1)
    })
}

/// Submits `n` choices per prompt; their streams, merged.
fn submit(engine: &Engine, req: &GenerateRequest, caller: &Caller, prompts: Vec<Vec<u32>>) -> Result<Events, ApiError> {
    let mut streams = Vec::with_capacity(prompts.len() * req.n);
    for ids in prompts {
        let max_tokens = max_tokens_of(req, engine.model_info(), &ids);
        for choice in 0..req.n {
            let mut params = req.params.clone();
            params.max_tokens = max_tokens;
            // Seeded choices must still differ from one another.
            params.seed = params.seed.map(|seed| seed.wrapping_add(choice as u64));
            let request = Request::tokens(Vec::new()).with_params(params).with_priority(caller.priority(req.priority));
            streams.push(engine.submit_tokens(ids.clone(), request)?);
        }
    }
    let tagged = streams.into_iter().enumerate().map(|(index, s)| StreamExt::map(s, move |event| (index, event)));
    Ok(Box::pin(futures_util::stream::select_all(tagged)))
}

/// An engine error about the output constraint, its field renamed to the one the request used.
fn named(error: EngineError, field: Option<&str>) -> ApiError {
    match (error, field) {
        (EngineError::InvalidRequest(message), Some(field)) => match message.split_once("`: ") {
            Some((_, rest)) if message.starts_with('`') => ApiError::invalid(format!("`{field}`: {rest}")),
            _ => ApiError::invalid(message),
        },
        (error, _) => error.into(),
    }
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

/// Waits for every choice to finish, recording each token on the caller's charge as it comes
/// (so that a request cut short is still charged for what it generated); the first failure, the
/// deadline or the cut ends them all.
pub async fn gather(generation: Generation, cutoff: &mut Cutoff) -> Result<Vec<Completion>, ApiError> {
    let Generation { mut events, choices, charge, .. } = generation;
    let all = async {
        let mut parts: Vec<(String, Vec<u32>, Vec<TokenLogprob>)> = vec![Default::default(); choices];
        let mut finishes: Vec<Option<Finish>> = vec![None; choices];
        while finishes.iter().any(Option::is_none) {
            match events.next().await {
                Some((index, StreamEvent::Token(token))) => {
                    charge.record(1);
                    if let Some((text, ids, logprobs)) = parts.get_mut(index) {
                        text.push_str(&token.text);
                        ids.push(token.token_id);
                        logprobs.extend(token.logprob);
                    }
                }
                Some((index, StreamEvent::Finished(finish))) => {
                    if let Some(slot) = finishes.get_mut(index) {
                        *slot = Some(finish);
                    }
                }
                Some((_, StreamEvent::Error(e))) => return Err(ApiError::from(e)),
                None => return Err(ApiError::from(EngineError::EngineStopped)),
            }
        }
        let finished = parts.into_iter().zip(finishes.into_iter().flatten());
        Ok(finished
            .map(|((text, token_ids, logprobs), finish)| Completion { text, token_ids, logprobs, finish })
            .collect())
    };
    tokio::select! {
        done = all => done,
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

//! Streamed answers: drives a request's token streams and writes server-sent events,
//! `data: <json>\n\n` each, then `data: [DONE]\n\n`, with `Content-Type: text/event-stream` and
//! `Cache-Control: no-cache` (axum's `Sse` framing). While a request waits in the queue, or between
//! tokens, idle periods get keep-alive comments (`:\n\n`) so that proxies keep the connection.
//!
//! The route decides what its chunks look like ([`ChunkWriter`]); the order of events is decided
//! here, once: each choice's first chunk, its tokens, its finish chunk (`finish_reason`); then the
//! usage chunk (empty `choices`) when asked for; then `[DONE]`. A failure midway (engine error,
//! timeout, shutdown) sends one `{"error": ...}` event and then `[DONE]`, as vLLM does; the OpenAI
//! SDKs raise it as an `APIError`.
//!
//! Dropping the response body (the client went away) drops the token streams, which aborts the
//! requests in the engine.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Serialize;
use sluice_engine::{Finish, StreamEvent, TokenEvent};

use crate::error::ApiError;
use crate::generate::{Cutoff, Generation};
use crate::logging::RequestLog;
use crate::openai::Usage;

/// Turns one route's engine events into its chunks.
pub trait ChunkWriter: Send + 'static {
    /// The first chunk of choice `index` (chat: the role), if the route sends one.
    fn start(&mut self, index: usize) -> Option<Event>;
    /// A token of choice `index`; `None` when there is nothing to send yet (held-back text).
    fn token(&mut self, index: usize, token: TokenEvent) -> Option<Event>;
    /// The last chunk of choice `index`, carrying its `finish_reason`.
    fn finish(&mut self, index: usize, finish: &Finish) -> Event;
    /// The final chunk with empty `choices` and the request's usage.
    fn usage(&mut self, usage: Usage) -> Event;
}

/// How a stream should end besides its tokens.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Send the usage chunk before `[DONE]`.
    pub include_usage: bool,
    /// Idle time before a keep-alive comment.
    pub keep_alive: std::time::Duration,
}

/// An event whose data is `value` as JSON.
pub fn json_event<T: Serialize>(value: &T) -> Event {
    match serde_json::to_string(value) {
        Ok(json) => Event::default().data(json),
        Err(e) => error_event(&ApiError::Internal(format!("cannot serialize a chunk: {e}"))),
    }
}

fn error_event(error: &ApiError) -> Event {
    // The envelope holds only strings and options: it always serializes.
    Event::default().data(serde_json::to_string(&error.body()).unwrap_or_default())
}

/// The `text/event-stream` response for `generation`.
pub fn respond<W: ChunkWriter>(
    generation: Generation,
    mut writer: W,
    options: StreamOptions,
    mut cutoff: Cutoff,
    log: RequestLog,
) -> Response {
    let Generation { events, choices, prompt_tokens, charge, .. } = generation;
    let events = async_stream::stream! {
        for index in 0..choices {
            if let Some(event) = writer.start(index) {
                yield Ok::<_, Infallible>(event);
            }
        }
        let mut merged = events;
        let (mut finished, mut completion_tokens, mut cached_tokens) = (0, 0, 0);
        while finished < choices {
            let next = tokio::select! {
                next = merged.next() => next.map(Ok),
                error = cutoff.reached() => Some(Err(error)),
            };
            let error = match next {
                Some(Ok((index, StreamEvent::Token(token)))) => {
                    charge.record(1);
                    if let Some(event) = writer.token(index, token) {
                        yield Ok(event);
                    }
                    continue;
                }
                Some(Ok((index, StreamEvent::Finished(finish)))) => {
                    finished += 1;
                    completion_tokens += finish.usage.completion_tokens;
                    cached_tokens = finish.usage.cached_tokens.max(cached_tokens);
                    log.finished(&finish);
                    yield Ok(writer.finish(index, &finish));
                    continue;
                }
                Some(Ok((_, StreamEvent::Error(error)))) => ApiError::from(error),
                Some(Err(error)) => error,
                None => break,
            };
            log.failed(&error.to_string());
            yield Ok(error_event(&error));
            break;
        }
        drop(merged);
        // The stream is over (or aborted above): the unused tokens go back to the caller now.
        drop(charge);
        if finished == choices && options.include_usage {
            yield Ok(writer.usage(Usage::new(prompt_tokens, completion_tokens, cached_tokens)));
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Sse::new(events).keep_alive(KeepAlive::new().interval(options.keep_alive)).into_response()
}

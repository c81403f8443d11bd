//! `TokenStream`: the per-request channel of events from the engine thread back to the caller.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::engine::Command;
use crate::error::{EngineError, Result};
use crate::sampling::TokenLogprob;
use crate::sequence::RequestId;

/// Why a request finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// End of sequence, a stop string or a stop token.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    /// OpenAI's name for it: `"stop"` or `"length"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Of the prompt's tokens, those whose K/V was found in the prefix cache (not computed).
    pub cached_tokens: usize,
}

/// Where a request's time went, measured from its submission.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Submission to first admission into the running batch.
    pub queue: Duration,
    /// Submission to first generated token.
    pub time_to_first_token: Duration,
    /// Submission to finish.
    pub total: Duration,
    /// Times the request was preempted (and recomputed).
    pub preemptions: u32,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    /// The token id.
    pub token_id: u32,
    /// Text that can be shown now. May be empty: bytes of an unfinished UTF-8 character, or text
    /// that may still turn out to be the start of a stop string, are held back.
    pub text: String,
    /// The token's log-probability and the top alternatives, when asked for.
    pub logprob: Option<TokenLogprob>,
}

/// The end of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    /// Stop or length.
    pub reason: FinishReason,
    /// The stop string that ended generation, if one did.
    pub stop_string: Option<String>,
    /// Token counts.
    pub usage: Usage,
    /// Timings.
    pub timings: Timings,
}

/// What a `TokenStream` yields: tokens, then exactly one `Finished` or `Error`.
#[derive(Debug)]
pub enum StreamEvent {
    /// A generated token and its text delta.
    Token(TokenEvent),
    /// The request finished normally.
    Finished(Finish),
    /// The request failed; nothing follows.
    Error(EngineError),
}

/// A finished request gathered in one value.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The generated text (stop string excluded).
    pub text: String,
    /// The generated token ids.
    pub token_ids: Vec<u32>,
    /// Per-token logprobs, when asked for.
    pub logprobs: Vec<TokenLogprob>,
    /// How it ended.
    pub finish: Finish,
}

/// The receiving end of a request. An async `Stream` of [`StreamEvent`]s, and a blocking
/// `Iterator` of the same (the iterator must not be used inside an async runtime).
///
/// Dropping it before the end aborts the request: the engine frees its KV blocks at its next step.
#[derive(Debug)]
pub struct TokenStream {
    id: RequestId,
    prompt_tokens: usize,
    rx: mpsc::UnboundedReceiver<StreamEvent>,
    // The engine's command channel, to abort on drop. It also wakes an idle engine.
    commands: crossbeam_channel::Sender<Command>,
    done: bool,
}

impl TokenStream {
    pub(crate) fn new(
        id: RequestId,
        prompt_tokens: usize,
        rx: mpsc::UnboundedReceiver<StreamEvent>,
        commands: crossbeam_channel::Sender<Command>,
    ) -> Self {
        Self { id, prompt_tokens, rx, commands, done: false }
    }

    /// The engine's id for this request.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// Number of prompt tokens (after templating and tokenization).
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    fn observe(&mut self, event: Option<StreamEvent>) -> Option<StreamEvent> {
        if self.done {
            return None;
        }
        match event {
            Some(e) => {
                if matches!(e, StreamEvent::Finished(_) | StreamEvent::Error(_)) {
                    self.done = true;
                }
                Some(e)
            }
            // The sender went away without a last event: the engine thread is gone.
            None => {
                self.done = true;
                Some(StreamEvent::Error(EngineError::EngineStopped))
            }
        }
    }

    /// Waits for the next event (async).
    pub async fn next_event(&mut self) -> Option<StreamEvent> {
        if self.done {
            return None;
        }
        let e = self.rx.recv().await;
        self.observe(e)
    }

    /// Gathers every event into a [`Completion`] (async).
    pub async fn collect(mut self) -> Result<Completion> {
        let mut acc = Accumulator::default();
        while let Some(e) = self.next_event().await {
            if let Some(done) = acc.push(e) {
                return done;
            }
        }
        Err(EngineError::EngineStopped)
    }

    /// Gathers every event into a [`Completion`], blocking the thread.
    pub fn collect_blocking(self) -> Result<Completion> {
        let mut acc = Accumulator::default();
        for e in self {
            if let Some(done) = acc.push(e) {
                return done;
            }
        }
        Err(EngineError::EngineStopped)
    }
}

#[derive(Default)]
struct Accumulator {
    text: String,
    token_ids: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
}

impl Accumulator {
    fn push(&mut self, e: StreamEvent) -> Option<Result<Completion>> {
        match e {
            StreamEvent::Token(t) => {
                self.text.push_str(&t.text);
                self.token_ids.push(t.token_id);
                self.logprobs.extend(t.logprob);
                None
            }
            StreamEvent::Finished(finish) => Some(Ok(Completion {
                text: std::mem::take(&mut self.text),
                token_ids: std::mem::take(&mut self.token_ids),
                logprobs: std::mem::take(&mut self.logprobs),
                finish,
            })),
            StreamEvent::Error(e) => Some(Err(e)),
        }
    }
}

impl Iterator for TokenStream {
    type Item = StreamEvent;

    fn next(&mut self) -> Option<StreamEvent> {
        if self.done {
            return None;
        }
        let e = self.rx.blocking_recv();
        self.observe(e)
    }
}

impl futures_core::Stream for TokenStream {
    type Item = StreamEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<StreamEvent>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(e) => Poll::Ready(self.observe(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for TokenStream {
    fn drop(&mut self) {
        if !self.done {
            // The engine may already be gone; then there is nothing left to abort.
            let _ = self.commands.send(Command::Abort(self.id));
        }
    }
}

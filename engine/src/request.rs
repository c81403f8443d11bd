//! `Request`: what a caller submits to the engine.

use crate::chat_template::ChatMessage;
use crate::sampling::SamplingParams;

/// The prompt of a request, in one of three forms.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Raw text, tokenized as is (special-token text in it is parsed as special tokens).
    Text(String),
    /// Chat messages, rendered with the model's own chat template (generation prompt added).
    Chat(Vec<ChatMessage>),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// A generation request: a prompt, how to sample, and its priority (lower runs first).
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// What to continue.
    pub prompt: Prompt,
    /// Sampling and stopping.
    pub params: SamplingParams,
    /// Scheduling priority: lower values are admitted (and kept from preemption) first.
    pub priority: i32,
}

impl Request {
    /// A raw-text request with default (greedy) sampling.
    pub fn text(text: impl Into<String>) -> Self {
        Self::new(Prompt::Text(text.into()))
    }

    /// A chat request with default (greedy) sampling.
    pub fn chat(messages: Vec<ChatMessage>) -> Self {
        Self::new(Prompt::Chat(messages))
    }

    /// A one-message chat request from the user.
    pub fn user(content: impl Into<String>) -> Self {
        Self::chat(vec![ChatMessage { role: "user".into(), content: content.into() }])
    }

    /// A request over token ids.
    pub fn tokens(ids: Vec<u32>) -> Self {
        Self::new(Prompt::Tokens(ids))
    }

    fn new(prompt: Prompt) -> Self {
        Self { prompt, params: SamplingParams::default(), priority: 0 }
    }

    /// Replaces the sampling parameters.
    pub fn with_params(mut self, params: SamplingParams) -> Self {
        self.params = params;
        self
    }

    /// Sets `max_tokens`.
    pub fn max_tokens(mut self, max_tokens: usize) -> Self {
        self.params.max_tokens = max_tokens;
        self
    }

    /// Sets the priority (lower runs first).
    pub fn with_priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }
}

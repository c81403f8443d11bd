//! `POST /v1/chat/completions`: request, response, stream chunk.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ResponseFormatIn, StopInput, StreamOptions, StructuredOutputsIn, TopLogprob, Usage};

/// A chat completion request. Unknown fields are ignored.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// The served model's name (see `GET /v1/models`); optional.
    pub model: Option<String>,
    /// The conversation so far; at least one message.
    pub messages: Vec<ChatMessageIn>,
    /// Most tokens to generate (deprecated by OpenAI in favour of `max_completion_tokens`).
    /// Default: what is left of the context.
    pub max_tokens: Option<u32>,
    /// Most tokens to generate; takes precedence over `max_tokens`.
    pub max_completion_tokens: Option<u32>,
    /// Return the chosen tokens' log-probabilities.
    pub logprobs: Option<bool>,
    /// With `logprobs`: also the `top_logprobs` (0 to 20) most likely tokens at each position.
    pub top_logprobs: Option<u32>,
    /// Up to 16 strings that end generation (not included in the output).
    pub stop: Option<StopInput>,
    /// Sampling temperature in [0, 2]; 0 is greedy. Default 1.
    pub temperature: Option<f32>,
    /// Nucleus sampling mass in (0, 1]. Default 1.
    pub top_p: Option<f32>,
    /// Seed for reproducible sampling.
    pub seed: Option<i64>,
    /// In [-2, 2]: penalises tokens already present in the output.
    pub presence_penalty: Option<f32>,
    /// In [-2, 2]: penalises tokens by their count in the output.
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string) to a bias in [-100, 100] added to its logit.
    pub logit_bias: Option<HashMap<String, f32>>,
    /// How many choices to generate (1 to 16). Default 1.
    pub n: Option<u32>,
    /// Stream the answer as server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// An end-user id, recorded in the request log.
    pub user: Option<String>,
    /// Extension: keep only the `top_k` most likely tokens; 0 or -1 keeps all.
    pub top_k: Option<i64>,
    /// Extension: drop tokens below `min_p` times the top token's probability, in [0, 1].
    pub min_p: Option<f32>,
    /// Extension: CTRL-style repetition penalty over prompt and output, > 0 (1 = off).
    pub repetition_penalty: Option<f32>,
    /// Extension: keep generating past the end-of-sequence token.
    pub ignore_eos: Option<bool>,
    /// The answer's shape: `{"type": "text"}`, `{"type": "json_object"}` or `{"type":
    /// "json_schema", "json_schema": {"name": ..., "schema": {...}}}`; JSON is enforced token by
    /// token.
    pub response_format: Option<ResponseFormatIn>,
    /// Extension (vLLM): the answer matches `{"json": schema}`, `{"regex": pattern}` or is one of
    /// `{"choice": [...]}`.
    pub structured_outputs: Option<StructuredOutputsIn>,
    /// Extension (vLLM's older name for `structured_outputs.json`).
    #[schema(value_type = Option<Object>)]
    pub guided_json: Option<serde_json::Value>,
    /// Extension (vLLM's older name for `structured_outputs.regex`).
    pub guided_regex: Option<String>,
    /// Extension (vLLM's older name for `structured_outputs.choice`).
    pub guided_choice: Option<Vec<String>>,
    /// vLLM's grammar constraint: not supported, refused with a 400 rather than ignored.
    pub guided_grammar: Option<String>,
    /// Extension: the end-of-sequence token is suppressed until this many tokens exist.
    pub min_tokens: Option<u32>,
    /// Extension: scheduling priority; lower runs first. Default 0.
    pub priority: Option<i32>,
}

/// One message of the conversation.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatMessageIn {
    /// `system`, `developer` (read as `system`), `user` or `assistant`.
    pub role: String,
    /// A string, or an array of `{"type": "text", "text": ...}` parts.
    pub content: Option<MessageContent>,
    /// A participant name (accepted, not used by the template).
    pub name: Option<String>,
}

/// A message's content.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged, expecting = "expected a string or an array of content parts")]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts; only `text` parts are supported.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    /// The part's type; only `text` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    pub text: Option<String>,
}

/// A non-streamed chat completion (`object: "chat.completion"`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletion {
    /// `chatcmpl-<request id>`.
    pub id: String,
    /// Always `chat.completion`.
    pub object: String,
    /// Unix time of the request.
    pub created: u64,
    /// The served model's name.
    pub model: String,
    /// One per requested choice, in `index` order.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// One choice of a chat completion.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatChoice {
    /// Which choice.
    pub index: usize,
    /// The answer.
    pub message: ChatMessageOut,
    /// Log-probabilities, when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop` (end of turn or a stop string) or `length` (`max_tokens` reached).
    pub finish_reason: String,
}

/// The assistant's answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatMessageOut {
    /// Always `assistant`.
    pub role: String,
    /// The generated text.
    pub content: String,
}

/// Log-probabilities of a chat choice (or of one chunk's tokens).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<TokenLogprobEntry>,
}

/// One generated token's log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenLogprobEntry {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// The UTF-8 bytes of its text.
    pub bytes: Vec<u8>,
    /// The most likely tokens at this position, most likely first.
    pub top_logprobs: Vec<TopLogprob>,
}

/// One server-sent event of a streamed chat completion (`object: "chat.completion.chunk"`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionChunk {
    /// The same id on every chunk of a response.
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: String,
    /// Unix time of the request.
    pub created: u64,
    /// The served model's name.
    pub model: String,
    /// The choices this chunk advances (empty in the final usage chunk).
    pub choices: Vec<ChatChunkChoice>,
    /// Only in the final chunk, with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One choice's step in a chunk.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatChunkChoice {
    /// Which choice.
    pub index: usize,
    /// The new text (the first chunk of a choice carries the role).
    pub delta: ChatDelta,
    /// The new tokens' log-probabilities, when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// Set on the choice's last chunk.
    pub finish_reason: Option<String>,
}

/// What a chunk adds to a choice.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ChatDelta {
    /// `assistant`, on the first chunk of a choice only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

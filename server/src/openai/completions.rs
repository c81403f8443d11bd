//! `POST /v1/completions` (legacy text completions): request, response, stream chunk.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ResponseFormatIn, StopInput, StreamOptions, StructuredOutputsIn, Usage};

/// A text completion request. Unknown fields are ignored.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// The served model's name (see `GET /v1/models`); optional.
    pub model: Option<String>,
    /// The text to continue: a string, a list of strings, a list of token ids or a list of lists
    /// of token ids. Each prompt gets `n` choices.
    pub prompt: PromptInput,
    /// Most tokens to generate. Default 16.
    pub max_tokens: Option<u32>,
    /// Return the chosen tokens' log-probabilities and this many (0 to 20) alternatives.
    pub logprobs: Option<u32>,
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
    /// How many choices to generate per prompt (1 to 16). Default 1.
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

/// `prompt` in its four accepted forms.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(
    untagged,
    expecting = "expected a string, an array of strings, an array of token ids or an array of arrays of token ids"
)]
pub enum PromptInput {
    /// One text prompt.
    Text(String),
    /// Several text prompts.
    Texts(Vec<String>),
    /// One prompt as token ids.
    Tokens(Vec<u32>),
    /// Several prompts as token ids.
    TokenLists(Vec<Vec<u32>>),
}

/// A text completion, whole or as one streamed chunk (`object: "text_completion"` either way, as
/// OpenAI does).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TextCompletion {
    /// `cmpl-<request id>`.
    pub id: String,
    /// Always `text_completion`.
    pub object: String,
    /// Unix time of the request.
    pub created: u64,
    /// The served model's name.
    pub model: String,
    /// One per prompt and choice (`index = prompt * n + choice`); empty in the final usage chunk.
    pub choices: Vec<CompletionChoice>,
    /// Token counts: always when not streamed; in the final chunk with `include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One choice of a text completion (or its step in a chunk).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletionChoice {
    /// Which choice.
    pub index: usize,
    /// The generated text (new text, in a chunk).
    pub text: String,
    /// Log-probabilities, when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length` on the choice's last chunk; null before.
    pub finish_reason: Option<String>,
}

/// OpenAI's legacy logprobs format, one entry per token in each list.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CompletionLogprobs {
    /// The tokens' texts.
    pub tokens: Vec<String>,
    /// Their log-probabilities.
    pub token_logprobs: Vec<f32>,
    /// At each position, the most likely tokens' texts and log-probabilities.
    pub top_logprobs: Vec<HashMap<String, f32>>,
    /// Each token's character offset in the choice's text.
    pub text_offset: Vec<usize>,
}

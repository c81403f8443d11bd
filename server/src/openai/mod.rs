//! Wire types of the OpenAI API (and vLLM's `/tokenize` and `/detokenize`): serde for the JSON,
//! utoipa for `/openapi.json`. Nothing here checks values; `crate::validate` does.
//!
//! Request fields are `Option`s so that `null` is accepted wherever OpenAI accepts it, and unknown
//! fields are ignored, as OpenAI does.

mod chat;
mod completions;

pub use chat::*;
pub use completions::*;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The error envelope of every failed request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorResponse {
    /// The error.
    pub error: ErrorBody,
}

/// What went wrong.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// A human-readable message naming the field at fault.
    pub message: String,
    /// `invalid_request_error` (4xx) or `server_error` (5xx).
    #[serde(rename = "type")]
    pub kind: String,
    /// The field at fault, when there is one.
    pub param: Option<String>,
    /// A machine-readable code (`invalid_api_key`, `model_not_found`...), when there is one.
    pub code: Option<String>,
}

/// Token counts of a response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    /// Tokens in the prompt(s), counted once however many choices share them.
    pub prompt_tokens: usize,
    /// Tokens generated, all choices together.
    pub completion_tokens: usize,
    /// The sum of both.
    pub total_tokens: usize,
    /// What the prompt's tokens cost: how many came from the prefix cache.
    #[serde(default)]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV cache was reused from an earlier request (not computed again); with
    /// several choices, the most any choice reused.
    pub cached_tokens: usize,
}

impl Usage {
    /// Usage from prompt, completion and cached prompt token counts.
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: Some(PromptTokensDetails { cached_tokens }),
        }
    }
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(untagged, expecting = "expected a string or an array of strings")]
pub enum StopInput {
    /// One stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

/// `response_format`: the shape of the answer.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormatIn {
    /// Free text (the default).
    Text,
    /// One JSON object.
    JsonObject,
    /// One JSON value that a JSON Schema accepts.
    JsonSchema {
        /// The schema and its name.
        json_schema: JsonSchemaIn,
    },
}

/// `response_format.json_schema`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct JsonSchemaIn {
    /// The schema's name (accepted, not used).
    pub name: Option<String>,
    /// What the schema is for (accepted, not used).
    pub description: Option<String>,
    /// The JSON Schema; absent: any JSON value.
    #[schema(value_type = Option<Object>)]
    pub schema: Option<serde_json::Value>,
    /// Accepted; the schema is always enforced.
    pub strict: Option<bool>,
}

/// `structured_outputs` (a vLLM extension): exactly one of its fields. Others (vLLM's `grammar`,
/// `structural_tag`) are refused rather than ignored.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StructuredOutputsIn {
    /// A JSON Schema the answer must match (an object, or the same as a JSON string).
    #[schema(value_type = Option<Object>)]
    pub json: Option<serde_json::Value>,
    /// `true`: the answer is one JSON object.
    pub json_object: Option<bool>,
    /// A regular expression the whole answer must match.
    pub regex: Option<String>,
    /// The answer is exactly one of these strings.
    pub choice: Option<Vec<String>>,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with empty `choices` and the request's `usage` before `[DONE]`.
    pub include_usage: Option<bool>,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    /// The served model.
    pub data: Vec<ModelCard>,
}

/// One served model.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelCard {
    /// The name requests use in `model`.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Unix time the server started.
    pub created: u64,
    /// Always `sluice`.
    pub owned_by: String,
    /// Longest prompt + output in tokens.
    pub max_model_len: usize,
}

/// `POST /tokenize`: a `prompt` or chat `messages`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    /// The served model's name (optional).
    pub model: Option<String>,
    /// Text to tokenize.
    pub prompt: Option<String>,
    /// Chat messages, rendered with the model's chat template first.
    pub messages: Option<Vec<ChatMessageIn>>,
    /// Add the model's BOS token to a `prompt` (default true; ignored for `messages`).
    pub add_special_tokens: Option<bool>,
}

/// The answer to `/tokenize`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenizeResponse {
    /// Number of tokens.
    pub count: usize,
    /// The model's context length.
    pub max_model_len: usize,
    /// The token ids.
    pub tokens: Vec<u32>,
}

/// `POST /detokenize`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct DetokenizeRequest {
    /// The served model's name (optional).
    pub model: Option<String>,
    /// Token ids to turn back into text.
    pub tokens: Vec<u32>,
}

/// The answer to `/detokenize`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DetokenizeResponse {
    /// The text.
    pub prompt: String,
}

/// `GET /health`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    /// `ok`, `loading`, `draining`, `engine_stopped` or `breaker_open`.
    pub status: String,
    /// The served model, once loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Requests waiting for admission, once loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<usize>,
    /// Requests running, once loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running: Option<usize>,
    /// Fraction of KV cache blocks in use, once loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_cache_usage: Option<f64>,
    /// The circuit breaker around model execution, once loaded: `closed`, `open` or `half_open`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker: Option<String>,
}

/// One token's logprob in a chat response (also the shape of each `top_logprobs` entry, without
/// its own list).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// The UTF-8 bytes of its text.
    pub bytes: Vec<u8>,
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

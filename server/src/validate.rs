//! The one conversion per route from a wire request to a [`GenerateRequest`], and the only place
//! where a request is rejected for its shape or its ranges. Checks that need the model (the
//! vocabulary, the prompt's length in tokens) happen when the request is tokenized and submitted.

use std::collections::HashMap;

use sluice_engine::{ChatMessage, Prompt, ResponseFormat, SamplingParams};

use crate::error::ApiError;
use crate::openai::{
    ChatCompletionRequest, ChatMessageIn, CompletionRequest, MessageContent, PromptInput, ResponseFormatIn, StopInput,
    StreamOptions, StructuredOutputsIn,
};

/// Most choices per prompt (`n`).
pub const MAX_N: usize = 16;
/// Most sequences one request may start (prompts × `n`).
pub const MAX_SEQUENCES: usize = 64;
/// Most alternatives per position in chat `top_logprobs`.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// `max_tokens` of a text completion that does not set it (OpenAI's default).
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

/// A generation request that passed every shape check.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The model the client named, if any (checked against the served name by the route).
    pub model: Option<String>,
    /// One prompt for chat; one or more for completions. Each gets `n` choices.
    pub prompts: Vec<Prompt>,
    /// Sampling and stopping; `max_tokens` is a placeholder until [`Self::max_tokens`] is resolved.
    pub params: SamplingParams,
    /// The client's `max_tokens`; `None` means "what is left of the context".
    pub max_tokens: Option<usize>,
    /// Choices per prompt.
    pub n: usize,
    /// Scheduling priority (lower first); `None` takes the API key's default, else 0.
    pub priority: Option<i32>,
    /// Answer as server-sent events.
    pub stream: bool,
    /// With `stream`: end with a usage chunk.
    pub include_usage: bool,
    /// The end-user id, for the request log.
    pub user: Option<String>,
    /// The request field that constrains the output (`response_format`, `guided_regex`...), if any.
    pub format_field: Option<&'static str>,
}

/// The fields chat and completions share, moved out of either request by [`shared!`].
struct Shared {
    stop: Option<StopInput>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: Option<HashMap<String, f32>>,
    n: Option<u32>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    user: Option<String>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    ignore_eos: Option<bool>,
    min_tokens: Option<u32>,
    priority: Option<i32>,
    response_format: Option<ResponseFormatIn>,
    structured_outputs: Option<StructuredOutputsIn>,
    guided_json: Option<serde_json::Value>,
    guided_regex: Option<String>,
    guided_choice: Option<Vec<String>>,
    guided_grammar: Option<String>,
}

/// Moves the shared fields out of a `ChatCompletionRequest` or a `CompletionRequest`.
macro_rules! shared {
    ($r:ident) => {
        Shared {
            stop: $r.stop,
            temperature: $r.temperature,
            top_p: $r.top_p,
            seed: $r.seed,
            presence_penalty: $r.presence_penalty,
            frequency_penalty: $r.frequency_penalty,
            logit_bias: $r.logit_bias,
            n: $r.n,
            stream: $r.stream,
            stream_options: $r.stream_options,
            user: $r.user,
            top_k: $r.top_k,
            min_p: $r.min_p,
            repetition_penalty: $r.repetition_penalty,
            ignore_eos: $r.ignore_eos,
            min_tokens: $r.min_tokens,
            priority: $r.priority,
            response_format: $r.response_format,
            structured_outputs: $r.structured_outputs,
            guided_json: $r.guided_json,
            guided_regex: $r.guided_regex,
            guided_choice: $r.guided_choice,
            guided_grammar: $r.guided_grammar,
        }
    };
}

impl TryFrom<ChatCompletionRequest> for GenerateRequest {
    type Error = ApiError;

    fn try_from(r: ChatCompletionRequest) -> Result<Self, ApiError> {
        if r.messages.is_empty() {
            return Err(ApiError::invalid("`messages` must hold at least one message"));
        }
        let messages = r.messages.into_iter().enumerate().map(chat_message).collect::<Result<Vec<_>, _>>()?;
        let logprobs = match (r.logprobs.unwrap_or(false), r.top_logprobs.map(|k| k as usize)) {
            (_, Some(k)) if k > MAX_TOP_LOGPROBS => {
                return Err(ApiError::invalid(format!("`top_logprobs` must be at most {MAX_TOP_LOGPROBS}, got {k}")))
            }
            (false, Some(k)) if k > 0 => {
                return Err(ApiError::invalid("`top_logprobs` needs `logprobs` set to true"));
            }
            (true, k) => Some(k.unwrap_or(0)),
            (false, _) => None,
        };
        let max_tokens = r.max_completion_tokens.or(r.max_tokens).map(|m| m as usize);
        build(r.model, vec![Prompt::Chat(messages)], max_tokens, logprobs, shared!(r))
    }
}

impl TryFrom<CompletionRequest> for GenerateRequest {
    type Error = ApiError;

    fn try_from(r: CompletionRequest) -> Result<Self, ApiError> {
        let prompts: Vec<Prompt> = match r.prompt {
            PromptInput::Text(text) => vec![Prompt::Text(text)],
            PromptInput::Texts(texts) => texts.into_iter().map(Prompt::Text).collect(),
            PromptInput::Tokens(ids) => vec![Prompt::Tokens(ids)],
            PromptInput::TokenLists(lists) => lists.into_iter().map(Prompt::Tokens).collect(),
        };
        if prompts.is_empty() || prompts.iter().any(|p| matches!(p, Prompt::Tokens(ids) if ids.is_empty())) {
            return Err(ApiError::invalid("`prompt` must not be empty"));
        }
        let max_tokens = Some(r.max_tokens.map_or(DEFAULT_COMPLETION_MAX_TOKENS, |m| m as usize));
        let logprobs = r.logprobs.map(|k| k as usize);
        build(r.model, prompts, max_tokens, logprobs, shared!(r))
    }
}

/// The checks and conversions common to both routes.
fn build(
    model: Option<String>,
    prompts: Vec<Prompt>,
    max_tokens: Option<usize>,
    logprobs: Option<usize>,
    s: Shared,
) -> Result<GenerateRequest, ApiError> {
    let n = s.n.map_or(1, |n| n as usize);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid(format!("`n` must be in 1..={MAX_N}, got {n}")));
    }
    if n * prompts.len() > MAX_SEQUENCES {
        return Err(ApiError::invalid(format!("`n` times the number of prompts must be at most {MAX_SEQUENCES}")));
    }
    let top_k = match s.top_k {
        None | Some(-1) => 0,
        Some(k) => usize::try_from(k).map_err(|_| ApiError::invalid(format!("`top_k` must be -1 or >= 0, got {k}")))?,
    };
    let mut params = SamplingParams {
        temperature: s.temperature.unwrap_or(1.0),
        top_k,
        top_p: s.top_p.unwrap_or(1.0),
        min_p: s.min_p.unwrap_or(0.0),
        repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
        presence_penalty: s.presence_penalty.unwrap_or(0.0),
        frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
        logit_bias: logit_bias(s.logit_bias)?,
        // Negative seeds are accepted (as vLLM does) and reinterpreted bit for bit.
        seed: s.seed.map(|seed| seed as u64),
        logprobs,
        // A placeholder that passes the range checks until the default is resolved on submit.
        max_tokens: max_tokens.unwrap_or(usize::MAX),
        min_tokens: s.min_tokens.map_or(0, |m| m as usize),
        stop: match s.stop {
            None => Vec::new(),
            Some(StopInput::One(stop)) => vec![stop],
            Some(StopInput::Many(stops)) => stops,
        },
        stop_token_ids: Vec::new(),
        ignore_eos: s.ignore_eos.unwrap_or(false),
        response_format: ResponseFormat::Text,
    };
    let format = output_format(
        s.response_format,
        s.structured_outputs,
        s.guided_json,
        s.guided_regex,
        s.guided_choice,
        s.guided_grammar,
    )?;
    let format_field = format.as_ref().map(|(field, _)| *field);
    if let Some((_, format)) = format {
        params.response_format = format;
    }
    // Every range check but the vocabulary's, which needs the model and is done on submit.
    params.validate(usize::MAX)?;
    Ok(GenerateRequest {
        model,
        prompts,
        params,
        max_tokens,
        n,
        priority: s.priority,
        stream: s.stream.unwrap_or(false),
        include_usage: s.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
        user: s.user,
        format_field,
    })
}

/// Most answers of a `choice` constraint, and their most bytes together.
pub const MAX_CHOICES: usize = 1024;
const MAX_CHOICE_BYTES: usize = 64 << 10;

/// The output's constraint from `response_format`, vLLM's `structured_outputs` or its older
/// `guided_*` fields (at most one may be given), with the field it came from, for error messages.
fn output_format(
    response_format: Option<ResponseFormatIn>,
    structured: Option<StructuredOutputsIn>,
    guided_json: Option<serde_json::Value>,
    guided_regex: Option<String>,
    guided_choice: Option<Vec<String>>,
    guided_grammar: Option<String>,
) -> Result<Option<(&'static str, ResponseFormat)>, ApiError> {
    if guided_grammar.is_some() {
        return Err(ApiError::invalid("`guided_grammar` is not supported: use a JSON schema, a regex or a choice"));
    }
    let mut found: Vec<(&'static str, ResponseFormat)> = Vec::new();
    match response_format {
        None | Some(ResponseFormatIn::Text) => {}
        Some(ResponseFormatIn::JsonObject) => found.push(("response_format", ResponseFormat::JsonObject)),
        Some(ResponseFormatIn::JsonSchema { json_schema }) => {
            let schema = json_schema.schema.unwrap_or_else(|| serde_json::json!({}));
            found.push(("response_format", schema_format("response_format", schema)?));
        }
    }
    if let Some(s) = structured {
        let before = found.len();
        if let Some(schema) = s.json {
            found.push(("structured_outputs.json", schema_format("structured_outputs.json", schema)?));
        }
        if s.json_object == Some(true) {
            found.push(("structured_outputs.json_object", ResponseFormat::JsonObject));
        }
        if let Some(pattern) = s.regex {
            found.push(("structured_outputs.regex", regex_format("structured_outputs.regex", pattern)?));
        }
        if let Some(choices) = s.choice {
            found.push(("structured_outputs.choice", choice_format("structured_outputs.choice", choices)?));
        }
        if found.len() == before {
            return Err(ApiError::invalid(
                "`structured_outputs` must give one of `json`, `json_object`, `regex`, `choice`",
            ));
        }
    }
    if let Some(schema) = guided_json {
        found.push(("guided_json", schema_format("guided_json", schema)?));
    }
    if let Some(pattern) = guided_regex {
        found.push(("guided_regex", regex_format("guided_regex", pattern)?));
    }
    if let Some(choices) = guided_choice {
        found.push(("guided_choice", choice_format("guided_choice", choices)?));
    }
    if found.len() > 1 {
        return Err(ApiError::invalid(format!(
            "`{}` cannot be combined with `{}`: give one way to constrain the output",
            found[1].0, found[0].0
        )));
    }
    Ok(found.pop())
}

/// A JSON Schema given as an object (or `true`), or as a JSON string holding one.
fn schema_format(field: &str, schema: serde_json::Value) -> Result<ResponseFormat, ApiError> {
    let schema = match schema {
        serde_json::Value::String(text) => serde_json::from_str(&text)
            .map_err(|e| ApiError::invalid(format!("`{field}` is a string but not JSON: {e}")))?,
        other => other,
    };
    if !(schema.is_object() || schema == serde_json::Value::Bool(true)) {
        return Err(ApiError::invalid(format!("`{field}` must be a JSON Schema object")));
    }
    Ok(ResponseFormat::JsonSchema { schema })
}

/// A regular expression the whole answer must match: checked here for a clear error.
fn regex_format(field: &str, pattern: String) -> Result<ResponseFormat, ApiError> {
    if pattern.is_empty() {
        return Err(ApiError::invalid(format!("`{field}` must not be empty")));
    }
    if let Err(e) = regex_syntax::Parser::new().parse(&pattern) {
        let first = e.to_string().lines().last().unwrap_or_default().to_string();
        return Err(ApiError::invalid(format!("`{field}` is not a valid regular expression: {first}")));
    }
    Ok(ResponseFormat::Regex { pattern })
}

/// A list of answers, one of which the answer must be exactly.
fn choice_format(field: &str, choices: Vec<String>) -> Result<ResponseFormat, ApiError> {
    if choices.is_empty() || choices.iter().any(String::is_empty) {
        return Err(ApiError::invalid(format!("`{field}` must hold at least one answer, none empty")));
    }
    let bytes: usize = choices.iter().map(String::len).sum();
    if choices.len() > MAX_CHOICES || bytes > MAX_CHOICE_BYTES {
        return Err(ApiError::invalid(format!(
            "`{field}` may hold at most {MAX_CHOICES} answers of {MAX_CHOICE_BYTES} bytes in all"
        )));
    }
    Ok(ResponseFormat::Choice { choices })
}

/// `logit_bias` keys are token ids written as strings; sorted so equal requests are equal.
fn logit_bias(bias: Option<HashMap<String, f32>>) -> Result<Vec<(u32, f32)>, ApiError> {
    let mut out = Vec::new();
    for (key, value) in bias.unwrap_or_default() {
        let id = key
            .trim()
            .parse::<u32>()
            .map_err(|_| ApiError::invalid(format!("`logit_bias` keys must be token ids, got `{key}`")))?;
        out.push((id, value));
    }
    out.sort_by_key(|&(id, _)| id);
    Ok(out)
}

/// One wire message to a template message: known roles, text content only.
pub fn chat_message((i, m): (usize, ChatMessageIn)) -> Result<ChatMessage, ApiError> {
    let role = match m.role.as_str() {
        "system" | "developer" => "system",
        "user" => "user",
        "assistant" => "assistant",
        other => {
            return Err(ApiError::InvalidRequest {
                message: format!("`messages[{i}].role` must be system, user or assistant, got `{other}`"),
                param: Some(format!("messages[{i}].role")),
            })
        }
    };
    let param = format!("messages[{i}].content");
    let content = match m.content {
        Some(MessageContent::Text(text)) => text,
        Some(MessageContent::Parts(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for part in parts {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(text)) => texts.push(text),
                    (kind, _) => {
                        let message = format!("`{param}` parts must be `text` parts with a `text` field, got `{kind}`");
                        return Err(ApiError::InvalidRequest { message, param: Some(param) });
                    }
                }
            }
            texts.join("\n")
        }
        None if role == "assistant" => String::new(),
        None => {
            let message = format!("`{param}` is required for {role} messages");
            return Err(ApiError::InvalidRequest { message, param: Some(param) });
        }
    };
    Ok(ChatMessage::new(role, content))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(json: serde_json::Value) -> Result<GenerateRequest, ApiError> {
        GenerateRequest::try_from(serde_json::from_value::<ChatCompletionRequest>(json).unwrap())
    }

    fn param_of(e: ApiError) -> Option<String> {
        match e {
            ApiError::InvalidRequest { param, .. } => param,
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
    }

    #[test]
    fn chat_fields_become_engine_params() {
        let r = chat(serde_json::json!({
            "model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, {"role": "user", "content": "hi"}],
            "max_tokens": 5, "max_completion_tokens": 7, "n": 2, "stop": "x", "temperature": 0, "top_p": 0.5, "seed": -1,
            "logit_bias": {"12": 5.0, "3": -1.0}, "logprobs": true, "top_logprobs": 3, "top_k": -1, "min_tokens": 2,
            "priority": -3, "stream": true, "stream_options": {"include_usage": true}, "ignore_eos": true
        }))
        .unwrap();
        let Prompt::Chat(messages) = &r.prompts[0] else { panic!("not a chat prompt") };
        assert_eq!(messages, &[ChatMessage::new("system", "a\nb"), ChatMessage::new("user", "hi")]);
        assert_eq!((r.max_tokens, r.n, r.priority, r.stream, r.include_usage), (Some(7), 2, Some(-3), true, true));
        let p = &r.params;
        assert_eq!((p.stop.clone(), p.temperature, p.top_p, p.seed), (vec!["x".to_string()], 0.0, 0.5, Some(u64::MAX)));
        assert_eq!(
            (p.logit_bias.clone(), p.logprobs, p.top_k, p.min_tokens),
            (vec![(3, -1.0), (12, 5.0)], Some(3), 0, 2)
        );
        assert!(p.ignore_eos);
    }

    #[test]
    fn openai_defaults_apply() {
        let r = chat(serde_json::json!({"messages": [{"role": "user", "content": "hi"}]})).unwrap();
        assert_eq!((r.max_tokens, r.n, r.stream, r.params.temperature, r.params.logprobs), (None, 1, false, 1.0, None));
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (serde_json::json!({"messages": []}), "messages"),
            (serde_json::json!({"messages": [{"role": "tool", "content": "x"}]}), "messages[0].role"),
            (serde_json::json!({"messages": [{"role": "user"}]}), "messages[0].content"),
            (
                serde_json::json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "messages[0].content",
            ),
            (serde_json::json!({"messages": [{"role": "user", "content": "x"}], "n": 0}), "n"),
            (serde_json::json!({"messages": [{"role": "user", "content": "x"}], "n": 17}), "n"),
            (serde_json::json!({"messages": [{"role": "user", "content": "x"}], "temperature": 3}), "temperature"),
            (serde_json::json!({"messages": [{"role": "user", "content": "x"}], "top_p": 0}), "top_p"),
            (serde_json::json!({"messages": [{"role": "user", "content": "x"}], "top_k": -2}), "top_k"),
            (serde_json::json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), "max_tokens"),
            (serde_json::json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}), "top_logprobs"),
            (
                serde_json::json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
            ),
            (serde_json::json!({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"a": 1}}), "logit_bias"),
            (serde_json::json!({"messages": [{"role": "user", "content": "x"}], "stop": [""]}), "stop"),
            (
                serde_json::json!({"messages": [{"role": "user", "content": "x"}], "presence_penalty": -3}),
                "presence_penalty",
            ),
        ];
        for (json, field) in cases {
            let e = chat(json.clone()).expect_err(&json.to_string());
            assert_eq!(param_of(e).as_deref(), Some(field), "{json}");
        }
    }

    #[test]
    fn completion_prompts_in_every_form() {
        let forms = [
            (serde_json::json!("a"), 1),
            (serde_json::json!(["a", "b"]), 2),
            (serde_json::json!([1, 2, 3]), 1),
            (serde_json::json!([[1], [2, 3]]), 2),
        ];
        for (prompt, count) in forms {
            let wire: CompletionRequest =
                serde_json::from_value(serde_json::json!({"prompt": prompt, "n": 2})).unwrap();
            let r = GenerateRequest::try_from(wire).unwrap();
            assert_eq!(r.prompts.len(), count, "{prompt}");
            assert_eq!(r.max_tokens, Some(DEFAULT_COMPLETION_MAX_TOKENS));
        }
        let empty: CompletionRequest = serde_json::from_value(serde_json::json!({"prompt": []})).unwrap();
        assert_eq!(param_of(GenerateRequest::try_from(empty).unwrap_err()).as_deref(), Some("prompt"));
        let too_many: CompletionRequest =
            serde_json::from_value(serde_json::json!({"prompt": ["a", "b", "c", "d", "e"], "n": 16})).unwrap();
        assert_eq!(param_of(GenerateRequest::try_from(too_many).unwrap_err()).as_deref(), Some("n"));
    }
}

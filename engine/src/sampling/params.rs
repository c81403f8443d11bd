//! `SamplingParams`: what a request asks of the sampler and of the stop conditions, and its
//! validation against the ranges of the OpenAI API (vLLM's where OpenAI sets none).

use serde::{Deserialize, Serialize};

use crate::{EngineError, ResponseFormat, Result};

/// Temperatures below this are treated as greedy (as vLLM does): dividing by a smaller one would
/// overflow and the distribution is a point mass on the argmax anyway.
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

/// The most alternatives a request may ask for in `logprobs` (OpenAI's `top_logprobs` cap).
pub const MAX_LOGPROBS: usize = 20;

/// The most stop strings a request may give (OpenAI caps at 4, vLLM sets no cap; we allow 16).
pub const MAX_STOP_STRINGS: usize = 16;

/// How to pick each next token of one sequence, and when to stop.
///
/// Neutral values switch a stage off: `temperature == 0` (greedy), `top_k == 0`, `top_p == 1`,
/// `min_p == 0`, `repetition_penalty == 1`, zero presence/frequency penalties and no bias.
/// Values are only meaningful once [`SamplingParams::validate`] has accepted them; the sampler
/// assumes it has. Missing fields deserialize to their [`Default`] values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature in [0, 2]; below [`GREEDY_TEMPERATURE`] sampling is greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`, in (0, 1].
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the top token's, in [0, 1].
    pub min_p: f32,
    /// CTRL/HF penalty over prompt and output tokens, > 0: a positive logit of a token already
    /// seen is divided by it, a negative one multiplied.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty in [-2, 2], subtracted once from every token in the output.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty in [-2, 2], subtracted per occurrence of a token in the output.
    pub frequency_penalty: f32,
    /// `(token id, bias)` pairs added to the logits; ids below the vocabulary size, bias in
    /// [-100, 100] (so +100 all but forces a token and -100 all but bans it).
    pub logit_bias: Vec<(u32, f32)>,
    /// Seed of the sequence's random stream; `None` takes a seed from the engine.
    pub seed: Option<u64>,
    /// `Some(n)`: report the chosen token's logprob and the `n` (at most 20) most likely tokens.
    pub logprobs: Option<usize>,
    /// The most tokens to generate, at least 1.
    pub max_tokens: usize,
    /// EOS and stop token ids are suppressed until this many tokens exist; at most `max_tokens`.
    pub min_tokens: usize,
    /// Strings that end generation (not included in the output); none may be empty.
    pub stop: Vec<String>,
    /// Token ids that end generation, in addition to EOS.
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past EOS (benchmarks).
    pub ignore_eos: bool,
    /// The shape the output must take: free text, JSON, a pattern or a choice (see [`ResponseFormat`]).
    pub response_format: ResponseFormat,
}

impl Default for SamplingParams {
    /// Greedy, no penalties, 16 tokens (OpenAI's default `max_tokens` for completions).
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            logprobs: None,
            max_tokens: 16,
            min_tokens: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            response_format: ResponseFormat::Text,
        }
    }
}

impl SamplingParams {
    /// Checks every field against its range for a model with `vocab_size` logits. NaN is
    /// rejected everywhere. The error is `InvalidRequest` naming the field in backticks.
    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        let in_range = |x: f32, lo: f32, hi: f32| (lo..=hi).contains(&x);
        let t = self.temperature;
        ensure(in_range(t, 0.0, 2.0), || format!("`temperature` must be in [0, 2], got {t}"))?;
        let p = self.top_p;
        ensure(p > 0.0 && p <= 1.0, || format!("`top_p` must be in (0, 1], got {p}"))?;
        let m = self.min_p;
        ensure(in_range(m, 0.0, 1.0), || format!("`min_p` must be in [0, 1], got {m}"))?;
        let r = self.repetition_penalty;
        ensure(r > 0.0 && r.is_finite(), || format!("`repetition_penalty` must be > 0, got {r}"))?;
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            ensure(in_range(v, -2.0, 2.0), || format!("`{name}` must be in [-2, 2], got {v}"))?;
        }
        for &(id, bias) in &self.logit_bias {
            ensure((id as usize) < vocab_size, || {
                format!("`logit_bias` token {id} is outside the vocabulary of {vocab_size}")
            })?;
            ensure(in_range(bias, -100.0, 100.0), || {
                format!("`logit_bias` values must be in [-100, 100], got {bias} for token {id}")
            })?;
        }
        if let Some(n) = self.logprobs {
            ensure(n <= MAX_LOGPROBS, || format!("`logprobs` must be at most {MAX_LOGPROBS}, got {n}"))?;
        }
        ensure(self.max_tokens >= 1, || "`max_tokens` must be at least 1".to_string())?;
        if self.response_format.is_structured() {
            // The grammar decides where the value ends: EOS must stay allowed when it may end.
            ensure(!self.ignore_eos, || "`ignore_eos` cannot be combined with a structured output".into())?;
            ensure(self.min_tokens == 0, || "`min_tokens` cannot be combined with a structured output".into())?;
        }
        match &self.response_format {
            ResponseFormat::Regex { pattern } => {
                ensure(!pattern.is_empty(), || "`structured_outputs.regex` must not be empty".into())?;
            }
            ResponseFormat::Choice { choices } => {
                ensure(!choices.is_empty(), || "`structured_outputs.choice` must hold at least one answer".into())?;
                ensure(choices.iter().all(|c| !c.is_empty()), || {
                    "`structured_outputs.choice` answers must not be empty".into()
                })?;
            }
            _ => {}
        }
        if let ResponseFormat::JsonSchema { schema } = &self.response_format {
            ensure(schema.is_object() || schema == &serde_json::Value::Bool(true), || {
                "`response_format` schema must be a JSON object".to_string()
            })?;
        }
        let (min, max) = (self.min_tokens, self.max_tokens);
        ensure(min <= max, || format!("`min_tokens` ({min}) must not exceed `max_tokens` ({max})"))?;
        let n = self.stop.len();
        ensure(n <= MAX_STOP_STRINGS, || format!("`stop` may hold at most {MAX_STOP_STRINGS} strings, got {n}"))?;
        ensure(self.stop.iter().all(|s| !s.is_empty()), || "`stop` strings must not be empty".to_string())?;
        if let Some(&id) = self.stop_token_ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "`stop_token_ids` token {id} is outside the vocabulary of {vocab_size}"
            )));
        }
        Ok(())
    }

    /// Whether the next token is the argmax of the processed logits (temperature ~ 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE
    }

    /// Whether the output depends only on the request: greedy, or seeded.
    pub fn is_deterministic(&self) -> bool {
        self.is_greedy() || self.seed.is_some()
    }

    /// Whether any stage before the argmax/sampling changes the logits.
    pub(super) fn has_processing(&self) -> bool {
        self.has_penalties() || !self.logit_bias.is_empty() || self.response_format.is_structured()
    }

    /// Whether a penalty needs the history of the sequence.
    pub(super) fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// `Ok(())` when `ok`, else `InvalidRequest` with the lazily built message.
fn ensure(ok: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(EngineError::InvalidRequest(msg()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_greedy_and_valid() {
        let p = SamplingParams::default();
        assert!(p.is_greedy() && p.is_deterministic());
        assert_eq!(p.max_tokens, 16);
        p.validate(10).unwrap();
        let seeded = SamplingParams { temperature: 1.0, seed: Some(3), ..p.clone() };
        assert!(!seeded.is_greedy() && seeded.is_deterministic());
        assert!(!SamplingParams { temperature: 1.0, ..p }.is_deterministic());
    }

    #[test]
    fn missing_fields_deserialize_to_defaults() {
        let p: SamplingParams = serde_json::from_str(r#"{"temperature": 0.7}"#).unwrap();
        assert_eq!(p, SamplingParams { temperature: 0.7, ..Default::default() });
        let back: SamplingParams = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn validate_rejects_each_bad_field() {
        type Edit = fn(&mut SamplingParams);
        let cases: [(&str, Edit); 21] = [
            ("temperature", |p| p.temperature = -0.1),
            ("temperature", |p| p.temperature = 2.5),
            ("temperature", |p| p.temperature = f32::NAN),
            ("top_p", |p| p.top_p = 0.0),
            ("top_p", |p| p.top_p = 1.5),
            ("top_p", |p| p.top_p = f32::NAN),
            ("min_p", |p| p.min_p = -0.1),
            ("min_p", |p| p.min_p = f32::NAN),
            ("repetition_penalty", |p| p.repetition_penalty = 0.0),
            ("repetition_penalty", |p| p.repetition_penalty = f32::NAN),
            ("presence_penalty", |p| p.presence_penalty = 2.5),
            ("frequency_penalty", |p| p.frequency_penalty = f32::NAN),
            ("logit_bias", |p| p.logit_bias = vec![(10, 1.0)]),
            ("logit_bias", |p| p.logit_bias = vec![(1, 101.0)]),
            ("logit_bias", |p| p.logit_bias = vec![(1, f32::NAN)]),
            ("logprobs", |p| p.logprobs = Some(21)),
            ("max_tokens", |p| p.max_tokens = 0),
            ("min_tokens", |p| p.min_tokens = 17),
            ("stop", |p| p.stop = vec![String::new()]),
            ("stop", |p| p.stop = vec!["x".to_string(); 17]),
            ("stop_token_ids", |p| p.stop_token_ids = vec![10]),
        ];
        for (field, edit) in cases {
            let mut p = SamplingParams::default();
            edit(&mut p);
            match p.validate(10) {
                Err(EngineError::InvalidRequest(msg)) => {
                    assert!(msg.contains(&format!("`{field}`")), "{field}: {msg}")
                }
                other => panic!("{field}: expected InvalidRequest, got {other:?}"),
            }
        }
    }

    #[test]
    fn validate_accepts_the_range_edges() {
        let p = SamplingParams {
            temperature: 2.0,
            top_p: 1.0,
            min_p: 1.0,
            repetition_penalty: 0.5,
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            logit_bias: vec![(9, -100.0), (0, 100.0)],
            logprobs: Some(20),
            max_tokens: 1,
            min_tokens: 1,
            stop: vec!["x".to_string(); 16],
            stop_token_ids: vec![9],
            ..Default::default()
        };
        p.validate(10).unwrap();
    }
}

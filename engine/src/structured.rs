//! Structured outputs: generation kept inside a JSON value (any object, or one that a JSON Schema
//! accepts), as OpenAI's `response_format` asks.
//!
//! [llguidance](https://github.com/guidance-ai/llguidance) compiles the schema into a grammar over
//! the tokenizer's tokens; at every step it says which tokens can come next (a bitmask over the
//! vocabulary), the sampler picks only among those, and the chosen token advances the grammar.
//! When the value is complete the request finishes with `stop`. The grammar is compiled when the
//! request is submitted, so a schema it cannot handle is refused there with a clear error.
//!
//! Output is compact JSON (no whitespace between tokens of the value): a small model given the
//! freedom to add whitespace can spend its whole budget on newlines.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, InferenceCapabilities, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{EngineError, Result};
use crate::tokenizer::Tokenizer;

/// What shape the generated text must take.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Free text.
    #[default]
    Text,
    /// One JSON object, any keys.
    JsonObject,
    /// One JSON value that `schema` (a JSON Schema) accepts.
    JsonSchema {
        /// The schema: an object (or `true`).
        schema: Value,
    },
}

impl ResponseFormat {
    /// Whether generation is constrained.
    pub fn is_structured(&self) -> bool {
        *self != ResponseFormat::Text
    }

    /// The JSON Schema that the output must match, `None` for free text.
    fn schema(&self) -> Option<Value> {
        match self {
            ResponseFormat::Text => None,
            ResponseFormat::JsonObject => Some(serde_json::json!({"type": "object"})),
            ResponseFormat::JsonSchema { schema } => Some(schema.clone()),
        }
    }
}

/// Compiles response formats for one tokenizer: built once, on the first structured request.
pub(crate) struct Grammars {
    factory: ParserFactory,
    eos: Vec<u32>,
}

impl Grammars {
    /// The token trie of `tokenizer` (each id's bytes) and a parser factory over it.
    pub(crate) fn new(tokenizer: &Tokenizer) -> Result<Self> {
        let fail = |e: anyhow::Error| EngineError::Model(format!("cannot set up structured outputs: {e}"));
        let json: Value = serde_json::from_str(&tokenizer.to_hf_json()?)
            .map_err(|e| EngineError::Model(format!("cannot read the tokenizer as JSON: {e}")))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(fail)?;
        words.resize(words.len().max(tokenizer.vocab_size()), Vec::new());
        let eos = tokenizer.eos_token_ids().to_vec();
        let first_eos = *eos.first().ok_or_else(|| EngineError::Model("the tokenizer has no EOS token".into()))?;
        let info = TokRxInfo::new(words.len() as u32, first_eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
        let caps =
            InferenceCapabilities { ff_tokens: false, backtrack: false, conditional_ff_tokens: false, fork: false };
        let mut factory =
            ParserFactory::new(&env, caps, &llguidance::earley::SlicedBiasComputer::general_slices()).map_err(fail)?;
        factory.quiet();
        Ok(Self { factory, eos })
    }

    /// The constraint for `format`, `None` for free text; an `InvalidRequest` naming the problem
    /// when the schema cannot be compiled.
    pub(crate) fn constraint(&self, format: &ResponseFormat) -> Result<Option<Constraint>> {
        let Some(mut schema) = format.schema() else {
            return Ok(None);
        };
        if let Some(object) = schema.as_object_mut() {
            object.entry("x-guidance").or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
        }
        let invalid = |e: anyhow::Error| EngineError::InvalidRequest(format!("`response_format`: {e}"));
        let parser = self.factory.create_parser(TopLevelGrammar::from_json_schema(schema)).map_err(invalid)?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(EngineError::InvalidRequest(format!("`response_format`: {e}")));
        }
        Ok(Some(Constraint { matcher, eos: self.eos.clone() }))
    }
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").field("eos", &self.eos).finish_non_exhaustive()
    }
}

/// One request's place in its grammar.
pub(crate) struct Constraint {
    matcher: Matcher,
    eos: Vec<u32>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("finished", &self.matcher.is_stopped()).finish()
    }
}

impl Constraint {
    /// The tokens allowed next, as a bitmask over the vocabulary (bit `t % 32` of word `t / 32`);
    /// every EOS id is allowed when the value may end here.
    pub(crate) fn allowed(&mut self) -> Result<Vec<u32>> {
        let mask = self.matcher.compute_mask().map_err(|e| grammar_error(&e))?;
        let mut words = mask.as_slice().to_vec();
        if self.eos.iter().any(|&t| mask.is_allowed(t)) {
            for &t in &self.eos {
                if let Some(w) = words.get_mut(t as usize / 32) {
                    *w |= 1 << (t % 32);
                }
            }
        }
        Ok(words)
    }

    /// Moves past `token` (which `allowed` allowed). EOS ends the value and is not fed in.
    pub(crate) fn advance(&mut self, token: u32) -> Result<()> {
        if self.eos.contains(&token) {
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| grammar_error(&e))
    }

    /// Whether the value is complete and nothing may follow it.
    pub(crate) fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

fn grammar_error(e: &anyhow::Error) -> EngineError {
    EngineError::Model(format!("structured output failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_formats_read_as_tagged_json() {
        let f: ResponseFormat = serde_json::from_str(r#"{"type": "json_object"}"#).unwrap();
        assert_eq!(f, ResponseFormat::JsonObject);
        let f: ResponseFormat =
            serde_json::from_str(r#"{"type": "json_schema", "schema": {"type": "integer"}}"#).unwrap();
        assert_eq!(f.schema(), Some(serde_json::json!({"type": "integer"})));
        assert!(!ResponseFormat::default().is_structured());
    }
}

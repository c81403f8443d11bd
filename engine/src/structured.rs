//! Structured outputs: generation kept inside a JSON value (any object, or one that a JSON Schema
//! accepts), as OpenAI's `response_format` asks, or inside a regular expression or a list of
//! choices (vLLM's `structured_outputs` extensions).
//!
//! [llguidance](https://github.com/guidance-ai/llguidance) compiles the schema into a grammar over
//! the tokenizer's tokens; at every step it says which tokens can come next (a bitmask over the
//! vocabulary), the sampler picks only among those, and the chosen token advances the grammar.
//! When the value is complete the request finishes with `stop`. The grammar is compiled when the
//! request is submitted, so a schema it cannot handle is refused there with a clear error.
//!
//! Output is compact JSON (no whitespace between tokens of the value): a small model given the
//! freedom to add whitespace can spend its whole budget on newlines.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

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
    /// Text that the regular expression `pattern` matches whole.
    Regex {
        /// The pattern (Rust `regex` syntax, no anchors needed).
        pattern: String,
    },
    /// Exactly one of `choices`.
    Choice {
        /// The allowed answers, at least one.
        choices: Vec<String>,
    },
}

impl ResponseFormat {
    /// Whether generation is constrained.
    pub fn is_structured(&self) -> bool {
        *self != ResponseFormat::Text
    }

    /// The JSON Schema that the output must match, `None` for free text and the non-JSON formats.
    fn schema(&self) -> Option<Value> {
        match self {
            ResponseFormat::JsonObject => Some(serde_json::json!({"type": "object"})),
            ResponseFormat::JsonSchema { schema } => Some(schema.clone()),
            _ => None,
        }
    }

    /// Whether the output is JSON.
    pub fn is_json(&self) -> bool {
        self.schema().is_some()
    }

    /// The regular expression the output must match whole, for the non-JSON formats.
    fn pattern(&self) -> Option<String> {
        match self {
            ResponseFormat::Regex { pattern } => Some(pattern.clone()),
            ResponseFormat::Choice { choices } => {
                Some(choices.iter().map(|c| regex_syntax::escape(c)).collect::<Vec<_>>().join("|"))
            }
            _ => None,
        }
    }
}

/// Compiled schemas kept for reuse: an application tends to send the same schema every time.
const COMPILED_CACHE: usize = 64;

/// Compiles response formats for one tokenizer: built once, on the first structured request.
pub(crate) struct Grammars {
    factory: ParserFactory,
    eos: Vec<u32>,
    // The last schemas compiled (as JSON text), each with its grammar's start state, oldest first.
    compiled: Mutex<VecDeque<(String, Matcher)>>,
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
        Ok(Self { factory, eos, compiled: Mutex::new(VecDeque::new()) })
    }

    /// The constraint for `format`, `None` for free text; an `InvalidRequest` naming the problem
    /// when its schema or pattern cannot be compiled. Compiled formats are kept (the last
    /// [`COMPILED_CACHE`]) and each request starts from a copy.
    pub(crate) fn constraint(&self, format: &ResponseFormat) -> Result<Option<Constraint>> {
        let (key, grammar) = match (format.schema(), format.pattern()) {
            (Some(schema), _) => {
                let schema = compact(schema);
                (format!("json {schema}"), TopLevelGrammar::from_json_schema(schema))
            }
            (None, Some(pattern)) => (format!("regex {pattern}"), TopLevelGrammar::from_regex(&pattern)),
            (None, None) => return Ok(None),
        };
        let start =
            |cache: &VecDeque<(String, Matcher)>| cache.iter().find(|(k, _)| *k == key).map(|(_, m)| m.deep_clone());
        if let Some(matcher) = start(&self.compiled.lock().unwrap_or_else(|e| e.into_inner())) {
            return Ok(Some(Constraint { matcher, eos: self.eos.clone() }));
        }
        let field = if format.is_json() { "response_format" } else { "structured_outputs" };
        let parser = self.factory.create_parser(grammar).map_err(|e| invalid(field, &e))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(invalid(field, &e));
        }
        let constraint = Constraint { matcher: matcher.deep_clone(), eos: self.eos.clone() };
        let mut cache = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= COMPILED_CACHE {
            cache.pop_front();
        }
        cache.push_back((key, matcher));
        Ok(Some(constraint))
    }
}

/// `schema` with llguidance told to write compact JSON, unless the schema's own llguidance
/// options say otherwise.
fn compact(mut schema: Value) -> Value {
    if schema == Value::Bool(true) {
        schema = serde_json::json!({});
    }
    if let Some(object) = schema.as_object_mut() {
        let options = object.entry("x-guidance").or_insert_with(|| serde_json::json!({}));
        if let Some(options) = options.as_object_mut() {
            options.entry("whitespace_flexible").or_insert(Value::Bool(false));
        }
    }
    schema
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

    /// Moves past `token` (which `allowed` allowed). EOS ends the value, and only a complete
    /// value may end.
    pub(crate) fn advance(&mut self, token: u32) -> Result<()> {
        if self.eos.contains(&token) {
            return match self.matcher.is_accepting() {
                Ok(true) => Ok(()),
                Ok(false) => {
                    Err(EngineError::Model("structured output failed: the model ended an incomplete value".into()))
                }
                Err(e) => Err(grammar_error(&e)),
            };
        }
        self.matcher.consume_token(token).map_err(|e| grammar_error(&e))
    }

    /// Whether the value is complete and nothing may follow it.
    pub(crate) fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

fn grammar_error(e: &impl std::fmt::Display) -> EngineError {
    EngineError::Model(format!("structured output failed: {}", first_line(e)))
}

/// A schema or pattern llguidance cannot compile, as a 400 naming `field`.
fn invalid(field: &str, e: &impl std::fmt::Display) -> EngineError {
    EngineError::InvalidRequest(format!("`{field}`: {}", first_line(e)))
}

/// An error's first line, at most 300 characters (a caught panic carries its backtrace after it).
fn first_line(e: &impl std::fmt::Display) -> String {
    let text = e.to_string();
    let line = text.lines().next().unwrap_or_default();
    match line.char_indices().nth(300) {
        Some((at, _)) => format!("{}...", &line[..at]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct.Q4_1.gguf");

    fn grammars() -> (Tokenizer, Grammars) {
        let mut file = std::fs::File::open(MODEL).unwrap_or_else(|e| panic!("{MODEL}: {e}; run `make model`"));
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        let tokenizer = Tokenizer::from_gguf(&content).unwrap();
        let grammars = Grammars::new(&tokenizer).unwrap();
        (tokenizer, grammars)
    }

    fn allows(mask: &[u32], token: u32) -> bool {
        mask.get(token as usize / 32).is_some_and(|w| w & (1 << (token % 32)) != 0)
    }

    #[test]
    fn a_constraint_allows_only_the_value_and_ends_only_when_it_is_complete() {
        let (tok, g) = grammars();
        let eos = tok.eos_token_ids().to_vec();
        let integer = ResponseFormat::JsonSchema { schema: serde_json::json!({"type": "integer"}) };
        let mut c = g.constraint(&integer).unwrap().expect("a constraint");
        let start = c.allowed().unwrap();
        let digit = tok.encode("4", false).unwrap()[0];
        let letter = tok.encode("x", false).unwrap()[0];
        assert!(allows(&start, digit) && !allows(&start, letter));
        assert!(eos.iter().all(|&t| !allows(&start, t)), "nothing written yet: EOS not allowed");
        assert!(c.advance(eos[0]).is_err(), "ending an incomplete value is an error");
        c.advance(digit).unwrap();
        let after = c.allowed().unwrap();
        assert!(eos.iter().all(|&t| allows(&after, t)), "a complete integer may end, with any EOS id");
        c.advance(eos[0]).unwrap();
        // A compiled schema is reused: a second request starts from the same state.
        let mut again = g.constraint(&integer).unwrap().unwrap();
        assert_eq!(again.allowed().unwrap(), start);
        assert!(g.constraint(&ResponseFormat::Text).unwrap().is_none());
    }

    #[test]
    fn a_value_that_cannot_grow_finishes_the_constraint() {
        let (tok, g) = grammars();
        let schema = serde_json::json!({"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"], "additionalProperties": false});
        let mut c = g.constraint(&ResponseFormat::JsonSchema { schema }).unwrap().unwrap();
        for id in tok.encode("{\"a\":1}", false).unwrap() {
            assert!(allows(&c.allowed().unwrap(), id), "token {id} of the only value is allowed");
            assert!(!c.is_finished());
            c.advance(id).unwrap();
        }
        assert!(c.is_finished(), "nothing may follow the closing brace");
    }

    #[test]
    fn bad_schemas_are_invalid_requests_naming_response_format() {
        let (_, g) = grammars();
        for schema in [
            serde_json::json!({"$ref": "#/nowhere"}),
            serde_json::json!({"type": "integer", "minimum": 2, "maximum": 1}),
        ] {
            match g.constraint(&ResponseFormat::JsonSchema { schema }) {
                Err(EngineError::InvalidRequest(m)) => {
                    assert!(m.starts_with("`response_format`: ") && !m.contains('\n'), "{m}")
                }
                other => panic!("{other:?}"),
            }
        }
    }

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

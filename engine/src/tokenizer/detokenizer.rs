//! `IncrementalDetokenizer`: generated ids to text deltas, one id at a time, never splitting a
//! UTF-8 character.

use super::Tokenizer;
use crate::Result;

/// The most ids held back waiting for a character to complete. A UTF-8 character has at most four
/// bytes and every token at least one, so only invalid output is released early.
pub const MAX_HELD_IDS: usize = 8;

/// Turns generated ids into text deltas, one id at a time, without splitting a UTF-8 character.
///
/// vLLM's prefix/read-offset method: it decodes only a small window, the ids emitted last time
/// (context, so SentencePiece spaces and multi-token characters come out right) plus the ids not
/// emitted yet, and emits the part past the context once it no longer ends in U+FFFD (or once
/// [`MAX_HELD_IDS`] ids are held: invalid bytes must not stall the stream). Special tokens are
/// skipped. For ordinary text the deltas (plus `flush`) add up to `decode(ids, true)`.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDetokenizer {
    /// The window: `ids[..read]` is context already emitted, `ids[read..]` is held back.
    ids: Vec<u32>,
    read: usize,
}

impl IncrementalDetokenizer {
    /// A detokenizer with no context, for output that starts a text.
    pub fn new() -> Self {
        Self::default()
    }

    /// A detokenizer that continues `prompt`: its last few non-special ids serve as context, so
    /// that a SentencePiece `▁Paris` right after the prompt comes out as `" Paris"`.
    pub fn with_prompt_tail(tok: &Tokenizer, prompt: &[u32]) -> Self {
        let mut ids: Vec<u32> = prompt.iter().rev().copied().filter(|id| !tok.is_special(*id)).take(4).collect();
        ids.reverse();
        Self { read: ids.len(), ids }
    }

    /// Adds one generated id; returns the text it completes (often empty: a special token, or
    /// part of a multi-byte character).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        if tok.is_special(id) {
            return Ok(String::new());
        }
        self.ids.push(id);
        let (context, text) = self.window(tok)?;
        let incomplete = text.len() <= context.len() || text.ends_with('\u{FFFD}');
        if incomplete && self.ids.len() - self.read < MAX_HELD_IDS {
            return Ok(String::new());
        }
        Ok(self.advance(&text, context.len()))
    }

    /// Returns whatever is held back (e.g. an incomplete character at the end of the output).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String> {
        let (context, text) = self.window(tok)?;
        Ok(self.advance(&text, context.len()))
    }

    fn window(&self, tok: &Tokenizer) -> Result<(String, String)> {
        Ok((tok.decode(&self.ids[..self.read], true)?, tok.decode(&self.ids, true)?))
    }

    /// Emits `text[from..]` and makes the held ids the next window's context.
    fn advance(&mut self, text: &str, from: usize) -> String {
        // Not a char boundary only if the context itself ended in a broken character; hold on.
        let Some(delta) = text.get(from..) else { return String::new() };
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        delta.to_string()
    }
}

//! Output filter: redaction of secrets and personal data in generated text (`--redact`).
//!
//! Each [`RedactKind`] is a pattern over a small ASCII character class: API keys over
//! `[A-Za-z0-9_-]`, card numbers over `[0-9 -]`, e-mail addresses over `[A-Za-z0-9._%+@-]`. A match
//! lies inside one run of its class, so text is cut into runs and each run is redacted on its own.
//! A run longer than [`MAX_RUN`] is cut into pieces of at most that length, each cut where no
//! secret can cross it: before a key's head (`sk-`, `AKIA`, …) rather than inside the key, outside
//! an address (its `@`, the domain after it and a local part of up to 64 bytes before it), outside
//! a chain of digit groups, between two groups that the card search has passed, or inside a group
//! too long for a card. A long word of letters or digits is cut at least 64 bytes before the end of
//! what has been seen of it, since an `@` may still follow. Only a run with no such place in
//! [`MAX_RUN`] bytes (a key longer than that, text dense with `@`s) is cut blindly there, so an
//! address whose local part crosses such a cut loses the part before it. Where a cut falls depends only on the bytes from the previous cut to
//! at most one past [`MAX_RUN`] (see [`RedactKind::piece`]). That makes streaming exact: a stream
//! holds back only the trailing run of each class (a word that may still grow into a match), less
//! the pieces already cut off it, and sends the rest, and the text a stream sends adds up to what
//! redacting the whole text gives, wherever the chunks split. Kinds apply one after another
//! (keys, cards, e-mails), each a stage of its own. A match becomes `[REDACTED:<kind>]`, counted
//! in `sluice_redactions_total{kind}`.
//!
//! Only text is redacted. Token ids never leave the server, and logprobs (which show each token's
//! raw text) are refused while redaction is on (see [`crate::filter::screen`]).

use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use futures_util::StreamExt;
use regex::Regex;
use serde::de::{Deserializer, Error as _};
use serde::Deserialize;
use sluice_engine::{StreamEvent, TokenEvent};

use crate::generate::Events;

mod cuts;

/// Longest run of one class redacted as a unit; a longer run is cut into pieces of at most this
/// length, so a stream never holds back more than this per kind.
pub const MAX_RUN: usize = 512;

/// A kind of secret or personal data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RedactKind {
    /// `sk-…` (OpenAI style), `AKIA…` (AWS access key id), `ghp_…` (GitHub), `xox?-…` (Slack),
    /// `AIza…` (Google). Generic long hex or base64 strings are left alone: hashes and ids look
    /// the same.
    ApiKey,
    /// 13 to 19 digits, single spaces or dashes between them, passing the Luhn check.
    Card,
    /// `local@domain.tld`.
    Email,
}

impl RedactKind {
    /// Every kind, in the order the stages apply.
    pub const ALL: [RedactKind; 3] = [Self::ApiKey, Self::Card, Self::Email];

    /// The name in `--redact`, in the replacement and in the metric's label.
    pub fn name(self) -> &'static str {
        match self {
            Self::ApiKey => "api_key",
            Self::Card => "card",
            Self::Email => "email",
        }
    }

    /// Whether `b` can be part of a match.
    fn in_class(self, b: u8) -> bool {
        match self {
            Self::ApiKey => b.is_ascii_alphanumeric() || b == b'_' || b == b'-',
            Self::Card => b.is_ascii_digit() || b == b' ' || b == b'-',
            Self::Email => b.is_ascii_alphanumeric() || b"._%+@-".contains(&b),
        }
    }

    fn pattern(self) -> &'static Regex {
        // INVARIANT: constant patterns, compiled by the tests below.
        static API_KEY: LazyLock<Regex> = LazyLock::new(|| {
            Regex::new(r"sk-(?:proj-|live-|test-)?[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,}|xox[abprs]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}")
                .expect("the API key pattern compiles")
        });
        static CARD: LazyLock<Regex> =
            LazyLock::new(|| Regex::new(r"[0-9](?:[ -]?[0-9])*").expect("the card pattern compiles"));
        static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
            Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
                .expect("the e-mail pattern compiles")
        });
        match self {
            Self::ApiKey => &API_KEY,
            Self::Card => &CARD,
            Self::Email => &EMAIL,
        }
    }

    /// Whether a match of the pattern is one to redact.
    fn accepts(self, found: &str) -> bool {
        match self {
            Self::Card => {
                let digits: Vec<u32> = found.chars().filter_map(|c| c.to_digit(10)).collect();
                (13..=19).contains(&digits.len()) && luhn(&digits)
            }
            Self::ApiKey | Self::Email => true,
        }
    }

    /// The spans of `run` to redact: each accepted match; for cards, a match that fails as a whole
    /// (e.g. a card number followed by an expiry or a code after a space) is searched for the first,
    /// longest run of its digit groups that passes.
    fn spans(self, run: &str) -> Vec<(usize, usize)> {
        let mut spans = Vec::new();
        for found in self.pattern().find_iter(run) {
            if self.accepts(found.as_str()) {
                spans.push((found.start(), found.end()));
            } else if self == Self::Card {
                spans.extend(
                    card_groups(found.as_str()).into_iter().map(|(a, b)| (found.start() + a, found.start() + b)),
                );
            }
        }
        spans
    }

    /// Appends `run` (text of this kind's class) to `out` with its matches replaced.
    fn redact_run(self, run: &str, out: &mut String) {
        let mut last = 0;
        let mut count = 0;
        for (start, end) in self.spans(run) {
            out.push_str(&run[last..start]);
            out.push_str("[REDACTED:");
            out.push_str(self.name());
            out.push(']');
            last = end;
            count += 1;
        }
        out.push_str(&run[last..]);
        if count > 0 {
            metrics::counter!("sluice_redactions_total", "kind" => self.name()).increment(count);
        }
    }

    /// Redacts `text`, in which runs start at the start (a run that began earlier was cut there,
    /// see [`Self::piece`]).
    fn redact(self, text: &str, out: &mut String) {
        let bytes = text.as_bytes();
        let mut at = 0;
        while at < bytes.len() {
            // Class bytes are ASCII, so every cut below falls on a character boundary.
            let class = self.in_class(bytes[at]);
            let end = bytes[at..].iter().position(|&b| self.in_class(b) != class).map_or(bytes.len(), |n| at + n);
            if class {
                let cut = at + self.redact_pieces(&text[at..end], out);
                self.redact_run(&text[cut..end], out);
            } else {
                out.push_str(&text[at..end]);
            }
            at = end;
        }
    }

    /// Appends the pieces that can be cut off the start of `run` (text of this kind's class from
    /// its start or a cut, whole or still growing), redacted, to `out`; returns their length.
    fn redact_pieces(self, run: &str, out: &mut String) -> usize {
        let mut cut = 0;
        while let Some(len) = self.piece(&run[cut..]) {
            self.redact_run(&run[cut..cut + len], out);
            cut += len;
        }
        cut
    }

    /// Bytes past [`MAX_RUN`] that a cut depends on: for keys, one, which tells whether a head
    /// begun just before the cut goes on (`s` then `k`); none for the others.
    fn lookahead(self) -> usize {
        match self {
            Self::ApiKey => 1,
            Self::Card | Self::Email => 0,
        }
    }

    /// The length of the first piece of `run` (text of this kind's class from its start or from
    /// the previous cut), or `None` while `run` is too short to be cut: [`MAX_RUN`] bytes and the
    /// lookahead. The piece ends at the last place up to [`MAX_RUN`] that no match can cross,
    /// judged on those bytes alone (so a stream cuts where the whole text does), or at
    /// [`MAX_RUN`] if there is none.
    fn piece(self, run: &str) -> Option<usize> {
        let window = run.as_bytes().get(..MAX_RUN + self.lookahead())?;
        let cuts = cuts::plan(self, window);
        Some((1..=MAX_RUN).rev().find(|&at| cuts.free(at)).unwrap_or(MAX_RUN))
    }
}

/// Within `digits` (digit groups separated by single spaces or dashes), the spans of consecutive
/// whole groups holding 13 to 19 digits that pass the Luhn check: from each group on, the longest
/// such span, then on after it.
fn card_groups(digits: &str) -> Vec<(usize, usize)> {
    let mut groups = Vec::new();
    let mut start = None;
    for (i, b) in digits.bytes().enumerate() {
        match (b.is_ascii_digit(), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                groups.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        groups.push((s, digits.len()));
    }
    let mut spans = Vec::new();
    let mut i = 0;
    while i < groups.len() {
        match card_from(digits.as_bytes(), &groups, i) {
            Some(j) => {
                spans.push((groups[i].0, groups[j].1));
                i = j + 1;
            }
            None => i += 1,
        }
    }
    spans
}

/// The last of `groups` (spans of digits in `text`) that, from group `i` on, make a card: 13 to 19
/// digits passing the Luhn check. Only groups up to 19 digits from `i` are weighed.
fn card_from(text: &[u8], groups: &[(usize, usize)], i: usize) -> Option<usize> {
    let mut count = 0;
    let mut found = None;
    for (j, &(start, end)) in groups.iter().enumerate().skip(i) {
        count += end - start;
        if count > 19 {
            break;
        }
        if count >= 13 {
            let digits: Vec<u32> =
                text[groups[i].0..end].iter().filter(|b| b.is_ascii_digit()).map(|&b| u32::from(b - b'0')).collect();
            if luhn(&digits) {
                found = Some(j);
            }
        }
    }
    found
}

/// The Luhn checksum of `digits` (most significant first) is valid.
fn luhn(digits: &[u32]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                if d * 2 > 9 {
                    d * 2 - 9
                } else {
                    d * 2
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// The kinds to redact (`--redact`): `off` (the default), `on` / `all`, or a comma-separated list
/// of `api_key`, `card`, `email`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redaction(Vec<RedactKind>);

impl Redaction {
    /// Whether nothing is redacted.
    pub fn is_off(&self) -> bool {
        self.0.is_empty()
    }

    /// The kinds, in the order they apply.
    pub fn kinds(&self) -> &[RedactKind] {
        &self.0
    }
}

impl FromStr for Redaction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut kinds = Vec::new();
        for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word.to_ascii_lowercase().as_str() {
                "off" | "none" => {}
                "on" | "all" => kinds.extend(RedactKind::ALL),
                other => match RedactKind::ALL.into_iter().find(|k| k.name() == other) {
                    Some(kind) => kinds.push(kind),
                    None => {
                        return Err(format!(
                            "`{word}` is not a redaction: use off, on, or a list of api_key, card, email"
                        ))
                    }
                },
            }
        }
        kinds.sort_unstable();
        kinds.dedup();
        Ok(Self(kinds))
    }
}

impl fmt::Display for Redaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_off() {
            return f.write_str("off");
        }
        let names: Vec<&str> = self.0.iter().map(|k| k.name()).collect();
        f.write_str(&names.join(","))
    }
}

impl<'de> Deserialize<'de> for Redaction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

/// One kind's streaming state: the text held back (the trailing run of its class, from its last
/// cut).
#[derive(Debug, Clone)]
struct Stage {
    kind: RedactKind,
    held: String,
}

impl Stage {
    fn push(&mut self, text: &str) -> String {
        self.held.push_str(text);
        let bytes = self.held.as_bytes();
        let run_start = bytes.iter().rposition(|&b| !self.kind.in_class(b)).map_or(0, |i| i + 1);
        let mut out = String::new();
        self.kind.redact(&self.held[..run_start], &mut out);
        // Pieces cut off the trailing run are final; the rest of the run may still grow.
        let cut = run_start + self.kind.redact_pieces(&self.held[run_start..], &mut out);
        self.held.drain(..cut);
        out
    }

    fn finish(&mut self) -> String {
        let mut out = String::new();
        self.kind.redact(&std::mem::take(&mut self.held), &mut out);
        out
    }
}

/// Redacts one choice's text as it streams: [`Redactor::push`] each delta, then
/// [`Redactor::finish`]. What they return adds up to [`redact`] of the whole text.
#[derive(Debug, Clone)]
pub struct Redactor {
    stages: Vec<Stage>,
}

impl Redactor {
    /// A redactor for `redaction`'s kinds (none: text passes unchanged).
    pub fn new(redaction: &Redaction) -> Self {
        Self { stages: redaction.kinds().iter().map(|&kind| Stage { kind, held: String::new() }).collect() }
    }

    /// The text that can be sent after `text` arrives; the rest is held back.
    pub fn push(&mut self, text: &str) -> String {
        self.stages.iter_mut().fold(text.to_string(), |text, stage| stage.push(&text))
    }

    /// Everything still held back, redacted: the end of the text.
    pub fn finish(&mut self) -> String {
        self.stages.iter_mut().fold(String::new(), |text, stage| {
            let mut out = stage.push(&text);
            out.push_str(&stage.finish());
            out
        })
    }
}

/// `text` with `redaction`'s kinds redacted.
pub fn redact(redaction: &Redaction, text: &str) -> String {
    let mut redactor = Redactor::new(redaction);
    let mut out = redactor.push(text);
    out.push_str(&redactor.finish());
    out
}

/// Redacts the text of `choices` merged streams of events. Each choice's latest token is held
/// until the next event, so that the text held back at the end rides on the choice's last token
/// (no event is added or dropped, so token counts stay true).
pub fn redact_events(events: Events, choices: usize, redaction: &Redaction) -> Events {
    if redaction.is_off() {
        return events;
    }
    let mut redactors = vec![Redactor::new(redaction); choices];
    let mut last: Vec<Option<TokenEvent>> = vec![None; choices];
    Box::pin(async_stream::stream! {
        let mut events = events;
        while let Some((index, event)) = events.next().await {
            let (Some(redactor), Some(last)) = (redactors.get_mut(index), last.get_mut(index)) else {
                yield (index, event);
                continue;
            };
            match event {
                StreamEvent::Token(mut token) => {
                    token.text = redactor.push(&token.text);
                    if let Some(previous) = last.replace(token) {
                        yield (index, StreamEvent::Token(previous));
                    }
                }
                StreamEvent::Finished(finish) => {
                    let tail = redactor.finish();
                    if let Some(mut previous) = last.take() {
                        previous.text.push_str(&tail);
                        yield (index, StreamEvent::Token(previous));
                    }
                    yield (index, StreamEvent::Finished(finish));
                }
                error @ StreamEvent::Error(_) => {
                    if let Some(previous) = last.take() {
                        yield (index, StreamEvent::Token(previous));
                    }
                    yield (index, error);
                }
            }
        }
    })
}

#[cfg(test)]
mod tests;

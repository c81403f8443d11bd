//! Output filter: redaction of secrets and personal data in generated text (`--redact`).
//!
//! Each [`RedactKind`] is a pattern over a small ASCII character class: API keys over
//! `[A-Za-z0-9_-]`, card numbers over `[0-9 -]`, e-mail addresses over `[A-Za-z0-9._%+@-]`. A match
//! lies inside one run of its class, so text is cut into runs (each at most [`MAX_RUN`] bytes, cut
//! from its start) and each run is redacted on its own. That makes streaming exact: a stream
//! holds back only the trailing run of each class (a word that may still grow into a match) and
//! sends the rest, and the text a stream sends adds up to what redacting the whole text gives,
//! wherever the chunks split. Kinds apply one after another (keys, cards, e-mails), each a stage
//! of its own. A match becomes `[REDACTED:<kind>]`, counted in `sluice_redactions_total{kind}`.
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

/// Longest run of one class redacted as a unit; a longer run is cut into pieces this long, so a
/// stream never holds back more than this per kind.
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

    /// Redacts `text`, in which runs start at the start (a run that began earlier was cut there
    /// at a multiple of [`MAX_RUN`]).
    fn redact(self, text: &str, out: &mut String) {
        let bytes = text.as_bytes();
        let mut at = 0;
        while at < bytes.len() {
            // Class bytes are ASCII, so every cut below falls on a character boundary.
            let class = self.in_class(bytes[at]);
            let mut end = at;
            while end < bytes.len() && self.in_class(bytes[end]) == class && (!class || end - at < MAX_RUN) {
                end += 1;
            }
            if class {
                self.redact_run(&text[at..end], out);
            } else {
                out.push_str(&text[at..end]);
            }
            at = end;
        }
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
        let found = (i..groups.len()).rev().find(|&j| {
            let d: Vec<u32> = digits[groups[i].0..groups[j].1].chars().filter_map(|c| c.to_digit(10)).collect();
            (13..=19).contains(&d.len()) && luhn(&d)
        });
        match found {
            Some(j) => {
                spans.push((groups[i].0, groups[j].1));
                i = j + 1;
            }
            None => i += 1,
        }
    }
    spans
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

/// One kind's streaming state: the text held back (the trailing run of its class).
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
        // Whole pieces of a long run are final; the rest of the run may still grow.
        let cut = run_start + (bytes.len() - run_start) / MAX_RUN * MAX_RUN;
        let mut out = String::new();
        self.kind.redact(&self.held[..cut], &mut out);
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
mod tests {
    use super::*;

    fn all() -> Redaction {
        "on".parse().unwrap()
    }

    #[test]
    fn settings_parse() {
        assert!("off".parse::<Redaction>().unwrap().is_off());
        assert_eq!(all().kinds(), RedactKind::ALL);
        assert_eq!("email, card".parse::<Redaction>().unwrap().kinds(), [RedactKind::Card, RedactKind::Email]);
        assert_eq!(all().to_string(), "api_key,card,email");
        assert!("phone".parse::<Redaction>().unwrap_err().contains("`phone`"));
    }

    #[test]
    fn each_kind_is_redacted_and_ordinary_text_is_not() {
        let cases = [
            ("Mail alice.smith+tag@example.co.uk today.", "Mail [REDACTED:email] today."),
            ("key=sk-proj-abcdefghijklmnopqrstuvwx1234 ok", "key=[REDACTED:api_key] ok"),
            ("AWS AKIAIOSFODNN7EXAMPLE.", "AWS [REDACTED:api_key]."),
            ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789AB", "token [REDACTED:api_key]"),
            ("card 4111 1111 1111 1111, exp 12/29", "card [REDACTED:card], exp 12/29"),
            ("card 5500-0000-0000-0004.", "card [REDACTED:card]."),
            ("(4012888888881881)", "([REDACTED:card])"),
            // A card followed, in the same run, by an expiry or a code: the card is still found.
            ("4111 1111 1111 1111 12/29", "[REDACTED:card] 12/29"),
            ("4111111111111111 123", "[REDACTED:card] 123"),
            ("pin 99 4111-1111-1111-1111", "pin 99 [REDACTED:card]"),
            // Not Luhn-valid, too short or too long: numbers stay.
            ("order 4111 1111 1111 1112", "order 4111 1111 1111 1112"),
            ("call 555-123-4567", "call 555-123-4567"),
            ("id 41111111111111110000000", "id 41111111111111110000000"),
            ("sha 3f786850e387550fdab836ed7e6dc881de23001b", "sha 3f786850e387550fdab836ed7e6dc881de23001b"),
            ("a sk-short key, user@host, @handle", "a sk-short key, user@host, @handle"),
            ("héllo wörld 世界 🎉", "héllo wörld 世界 🎉"),
        ];
        for (text, want) in cases {
            assert_eq!(redact(&all(), text), want, "{text:?}");
        }
        let only_email: Redaction = "email".parse().unwrap();
        assert_eq!(redact(&only_email, "x@y.io 4111111111111111"), "[REDACTED:email] 4111111111111111");
    }

    /// Pushes `text` cut at `cuts` (sorted byte offsets on char boundaries) and returns the output.
    fn streamed(redaction: &Redaction, text: &str, cuts: &[usize]) -> String {
        let mut redactor = Redactor::new(redaction);
        let mut out = String::new();
        let mut from = 0;
        for &cut in cuts.iter().chain([text.len()].iter()) {
            out.push_str(&redactor.push(&text[from..cut]));
            from = cut;
        }
        out + &redactor.finish()
    }

    #[test]
    fn streams_equal_the_whole_text_at_every_split() {
        let text = "Reach me at jane.doe@example.com or sk-live-ABCDEFGHIJKLMNOPQRSTUVWX; card \
                    4111-1111-1111-1111 and AKIAIOSFODNN7EXAMPLE, café ☕ bob@x.org.";
        let redaction = all();
        let whole = redact(&redaction, text);
        assert_eq!(whole.matches("[REDACTED:").count(), 5, "{whole}");
        let bounds: Vec<usize> = (1..text.len()).filter(|&i| text.is_char_boundary(i)).collect();
        // Every single split point, and every pair of them.
        for (n, &a) in bounds.iter().enumerate() {
            assert_eq!(streamed(&redaction, text, &[a]), whole, "split at {a}");
            for &b in &bounds[n + 1..] {
                assert_eq!(streamed(&redaction, text, &[a, b]), whole, "split at {a}, {b}");
            }
        }
        // Character by character.
        assert_eq!(streamed(&redaction, text, &bounds), whole);
    }

    #[test]
    fn held_back_text_is_only_the_trailing_word() {
        let mut redactor = Redactor::new(&all());
        // The address is held until it is known whole, then sent redacted; only "then" waits.
        assert_eq!(redactor.push("Write to bob@exam"), "Write to ");
        assert_eq!(redactor.push("ple.com now, then "), "[REDACTED:email] now, ");
        assert_eq!(redactor.push("stop."), "then ");
        assert_eq!(redactor.finish(), "stop.");
    }

    #[test]
    fn long_runs_are_cut_alike_in_streams_and_whole_text() {
        let text = format!("{}sk-{} end", "a".repeat(MAX_RUN - 10), "B".repeat(40));
        let whole = redact(&all(), &text);
        let cuts: Vec<usize> = (1..text.len()).step_by(7).collect();
        assert_eq!(streamed(&all(), &text, &cuts), whole);
        let mut redactor = Redactor::new(&all());
        // A run longer than MAX_RUN is not held back whole.
        assert!(redactor.push(&"x".repeat(3 * MAX_RUN + 5)).len() >= 3 * MAX_RUN);
    }
}

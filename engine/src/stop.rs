//! Stop strings: the request's `stop` texts, matched against the detokenized output as it streams.
//!
//! Text is released only once it can no longer become part of a stop string: after each delta,
//! the longest suffix of the pending text that is a proper prefix of some stop string is held
//! back, and everything before it is emitted. A stop string may span any number of deltas; when
//! one appears, the text before it is emitted and nothing after it ever is.

/// What [`StopStrings::push`] returns for one delta.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopOutput {
    /// Text that is safe to send to the client now (may be empty).
    pub text: String,
    /// The stop string that just matched, if any; generation should finish with reason `stop`.
    pub stopped: Option<String>,
}

/// Matches a request's stop strings against streamed text, holding back possible prefixes.
///
/// Invariant: `pending` never contains a whole stop string, and is a proper prefix of one of them
/// (or empty) between calls.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    /// Non-empty stop strings, in request order.
    stops: Vec<String>,
    /// The held-back text.
    pending: String,
    /// Set once a stop string matched; afterwards nothing more is emitted.
    stopped: bool,
}

impl StopStrings {
    /// Builds the matcher for `stops`; empty strings are ignored (they would match at once).
    pub fn new<S: AsRef<str>>(stops: &[S]) -> Self {
        let stops = stops.iter().map(|s| s.as_ref()).filter(|s| !s.is_empty()).map(str::to_string);
        Self { stops: stops.collect(), ..Self::default() }
    }

    /// Whether there are no stop strings (every delta passes straight through).
    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Whether a stop string has matched.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds one text delta. Returns the text that can be emitted now and, when a stop string
    /// appears, that string; the returned text then ends right before it. After a stop, every
    /// call returns nothing.
    pub fn push(&mut self, delta: &str) -> StopOutput {
        if self.stopped {
            return StopOutput::default();
        }
        if self.stops.is_empty() {
            return StopOutput { text: delta.to_string(), stopped: None };
        }
        self.pending.push_str(delta);
        // Earliest occurrence wins; among stops starting at the same byte, the first listed.
        let earliest =
            self.stops.iter().filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s))).min_by_key(|(at, _)| *at);
        if let Some((at, stop)) = earliest {
            let stop = stop.clone();
            self.pending.truncate(at);
            self.stopped = true;
            return StopOutput { text: std::mem::take(&mut self.pending), stopped: Some(stop) };
        }
        let hold_from = self.held_suffix_start();
        let held = self.pending.split_off(hold_from);
        StopOutput { text: std::mem::replace(&mut self.pending, held), stopped: None }
    }

    /// Releases the held-back text when generation finishes for another reason (length, EOS).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// The byte offset of the longest suffix of `pending` that is a proper prefix of a stop
    /// string (`pending.len()` when there is none). Always a char boundary.
    fn held_suffix_start(&self) -> usize {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let min_start = self.pending.len().saturating_sub(longest.saturating_sub(1));
        self.pending
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i >= min_start)
            .find(|&i| {
                let suffix = &self.pending[i..];
                self.stops.iter().any(|s| s.len() > suffix.len() && s.starts_with(suffix))
            })
            .unwrap_or(self.pending.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushes every delta; returns the emitted text, the stop that matched and the held text.
    fn run(stops: &[&str], deltas: &[&str]) -> (String, Option<String>, String) {
        let mut matcher = StopStrings::new(stops);
        let mut text = String::new();
        let mut stopped = None;
        for delta in deltas {
            let out = matcher.push(delta);
            text.push_str(&out.text);
            stopped = stopped.or(out.stopped);
        }
        (text, stopped, matcher.flush())
    }

    #[test]
    fn empty_list_passes_through() {
        let mut matcher = StopStrings::new::<&str>(&[]);
        assert!(matcher.is_empty());
        assert_eq!(matcher.push("abc").text, "abc");
        assert_eq!(matcher.flush(), "");
        assert!(StopStrings::new(&[""]).is_empty());
    }

    #[test]
    fn stop_inside_one_delta() {
        let (text, stopped, rest) = run(&["END"], &["Hello END world"]);
        assert_eq!((text.as_str(), stopped.as_deref(), rest.as_str()), ("Hello ", Some("END"), ""));
    }

    #[test]
    fn stop_spanning_three_deltas() {
        let mut matcher = StopStrings::new(&["lo W"]);
        assert_eq!(matcher.push("Hel").text, "He"); // "l" may start "lo W"
        let out = matcher.push("lo Wo");
        assert_eq!(out, StopOutput { text: "l".into(), stopped: Some("lo W".into()) });
        assert!(matcher.is_stopped());
        assert_eq!(matcher.push("rld"), StopOutput::default());
        assert_eq!(matcher.flush(), "");

        // Starts in the second delta, completes in the third.
        let mut matcher = StopStrings::new(&["lo Wor"]);
        assert_eq!(matcher.push("Hel").text, "He");
        assert_eq!(matcher.push("lo Wo"), StopOutput { text: "l".into(), stopped: None });
        let out = matcher.push("rld");
        assert_eq!(out, StopOutput { text: String::new(), stopped: Some("lo Wor".into()) });
    }

    #[test]
    fn partial_prefix_is_released_when_it_does_not_match() {
        let mut matcher = StopStrings::new(&["###"]);
        assert_eq!(matcher.push("a #").text, "a ");
        assert_eq!(matcher.push("#").text, "");
        assert_eq!(matcher.push("b").text, "##b");
        assert_eq!(matcher.push("##").text, "");
        assert_eq!(matcher.flush(), "##");
    }

    #[test]
    fn earliest_stop_wins() {
        let (text, stopped, _) = run(&["world", "lo"], &["Hello world"]);
        assert_eq!((text.as_str(), stopped.as_deref()), ("Hel", Some("lo")));
        // Both complete in the same delta; the later-listed one starts earlier.
        let (text, stopped, _) = run(&["c", "abcd"], &["xab", "cd"]);
        assert_eq!((text.as_str(), stopped.as_deref()), ("x", Some("abcd")));
        let (text, stopped, _) = run(&["bcd", "ab"], &["xa", "bcd"]);
        assert_eq!((text.as_str(), stopped.as_deref()), ("x", Some("ab")));
    }

    #[test]
    fn stop_at_the_very_start() {
        let (text, stopped, _) = run(&["\n\n"], &["\n", "\nrest"]);
        assert_eq!((text.as_str(), stopped.as_deref()), ("", Some("\n\n")));
    }

    #[test]
    fn multibyte_stops_and_text() {
        let (text, stopped, _) = run(&["世界"], &["你好", "世", "界!"]);
        assert_eq!((text.as_str(), stopped.as_deref()), ("你好", Some("世界")));
        // "世" held, then released with the next char; never sliced inside a char.
        let mut matcher = StopStrings::new(&["世界", "é!"]);
        assert_eq!(matcher.push("ab世").text, "ab");
        assert_eq!(matcher.push("人é").text, "世人");
        assert_eq!(matcher.push("🎉").text, "é🎉");
        assert_eq!(matcher.push("é").text, "");
        assert_eq!(matcher.flush(), "é");
    }

    #[test]
    fn flush_releases_held_text() {
        let (text, stopped, rest) = run(&["</answer>"], &["42</ans"]);
        assert_eq!((text.as_str(), stopped, rest.as_str()), ("42", None, "</ans"));
    }
}

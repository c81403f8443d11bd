//! Where a run longer than [`MAX_RUN`](super::MAX_RUN) may be cut: the places in a window of it
//! that no match of a kind can cross (see the module docs of [`super`]).

use super::{card_from, RedactKind};

/// The longest local part of an e-mail address (RFC 5321), the bytes before its `@`.
const MAX_LOCAL: usize = 64;

/// Where `window` (text of `kind`'s class from a cut) may be cut.
pub(super) fn plan(kind: RedactKind, window: &[u8]) -> Cuts {
    let mut cuts = Cuts { free: vec![true; window.len() + 1] };
    match kind {
        RedactKind::ApiKey => {
            for start in 0..window.len() {
                if let Some(reach) = key_reach(&window[start..]) {
                    cuts.cross(start, start.saturating_add(reach));
                }
            }
        }
        RedactKind::Card => card_cuts(window, &mut cuts),
        RedactKind::Email => {
            for at in (0..window.len()).filter(|&i| window[i] == b'@') {
                let start = local_start(window, at).max(at.saturating_sub(MAX_LOCAL));
                let domain = window[at + 1..]
                    .iter()
                    .take_while(|&&b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
                    .count();
                let end = at + 1 + domain;
                cuts.cross(start, if end == window.len() { usize::MAX } else { end });
            }
            // A local part at the end, whose `@` may follow: no cut in it, or, when the run of
            // local-part bytes is longer than a local part can be, none in its last MAX_LOCAL
            // bytes (a cut there would send the start of an address before its `@` arrives).
            let start = local_start(window, window.len()).max(window.len().saturating_sub(MAX_LOCAL));
            cuts.cross(start, usize::MAX);
        }
    }
    cuts
}

/// The places in a window of a run where it may be cut: `free[i]` for a cut before byte `i`.
pub(super) struct Cuts {
    free: Vec<bool>,
}

impl Cuts {
    /// Whether the window may be cut before byte `at`.
    pub(super) fn free(&self, at: usize) -> bool {
        self.free[at]
    }

    /// A possible match from `start` to `end` (`usize::MAX`: on past the window): no cut inside.
    fn cross(&mut self, start: usize, end: usize) {
        let end = end.min(self.free.len());
        for at in start + 1..end {
            self.free[at] = false;
        }
    }
}

/// How far an API key starting at `rest[0]` may reach: `None` if no key starts there, else its
/// longest possible length, or `usize::MAX` where it may go on past `rest` (as does a head cut off
/// at the end of `rest`, such as `sk` or `AKI`).
fn key_reach(rest: &[u8]) -> Option<usize> {
    // The heads of the API key pattern, byte by byte, each byte from a set.
    const HEADS: [&[&[u8]]; 5] = [
        &[b"s", b"k", b"-"],
        &[b"A", b"K", b"I", b"A"],
        &[b"g", b"h", b"pousr", b"_"],
        &[b"x", b"o", b"x", b"abprs", b"-"],
        &[b"A", b"I", b"z", b"a"],
    ];
    // The longest a body can run over `pred` from `at`, or past `rest`.
    let over = |at: usize, pred: fn(u8) -> bool| {
        let body = rest.get(at..).unwrap_or_default();
        match body.iter().position(|&b| !pred(b)) {
            Some(n) => at + n,
            None => usize::MAX,
        }
    };
    let mut reach = None;
    for (i, head) in HEADS.iter().enumerate() {
        let same = head.iter().zip(rest).take_while(|(set, b)| set.contains(b)).count();
        if same == rest.len() && same < head.len() {
            return Some(usize::MAX);
        }
        if same < head.len() {
            continue;
        }
        let len = match i {
            // `sk-…`: the body takes the whole class, which the run is.
            0 => usize::MAX,
            1 => 20,
            2 => over(4, |b| b.is_ascii_alphanumeric()),
            3 => over(5, |b| b.is_ascii_alphanumeric() || b == b'-'),
            _ => 39,
        };
        reach = reach.max(Some(len));
    }
    reach
}

/// Where a plausible local part of an e-mail address ends at `at` (its `@`, or the end of `window`
/// where the `@` may follow) starts: letters and digits with single `._%+-` between them (or last),
/// from a letter or digit; `at` where there is none.
fn local_start(window: &[u8], at: usize) -> usize {
    let mut start = at;
    while start > 0 {
        let b = window[start - 1];
        let joins = b"._%+-".contains(&b) && (start == at || window[start].is_ascii_alphanumeric());
        if !b.is_ascii_alphanumeric() && !joins {
            break;
        }
        start -= 1;
    }
    while start < at && !window[start].is_ascii_alphanumeric() {
        start += 1;
    }
    start
}

/// Marks the card cuts of `window` (text of the card class from a cut): none inside a chain of
/// digit groups, save before a group that the search for cards (as
/// [`card_groups`](super::card_groups) makes it, from the chain's first group on) reaches, once
/// everything it weighs on the way is in `window`, and inside a group where both parts have 20
/// digits or more (no card takes in either).
fn card_cuts(window: &[u8], cuts: &mut Cuts) {
    let mut at = 0;
    while at < window.len() {
        if !window[at].is_ascii_digit() {
            at += 1;
            continue;
        }
        // The chain's groups, and whether it may go on past the window.
        let mut groups = Vec::new();
        let mut end = at;
        let open = loop {
            let start = end;
            while end < window.len() && window[end].is_ascii_digit() {
                end += 1;
            }
            groups.push((start, end));
            // A group at the end may grow, and a single separator there may join a next group.
            match window.get(end + 1) {
                None => break true,
                Some(b) if b.is_ascii_digit() => end += 1,
                Some(_) => break false,
            }
        };
        cuts.cross(at, if open { usize::MAX } else { end });
        // Inside a group too long for a card, where both parts stay too long for one.
        for &(start, end) in &groups {
            for cut in start + 20..end.saturating_sub(19) {
                cuts.free[cut] = true;
            }
        }
        let mut i = 0;
        while i < groups.len() {
            // The groups a card from group `i` could take: until they pass 19 digits, or the chain's end.
            let mut count = 0;
            let mut last = None;
            for (j, &(start, end)) in groups.iter().enumerate().skip(i) {
                count += end - start;
                if count > 19 {
                    last = Some(j);
                    break;
                }
            }
            if last.is_none() && open {
                break;
            }
            let found = card_from(window, &groups[..last.unwrap_or(groups.len())], i);
            i = found.map_or(i + 1, |j| j + 1);
            if let Some(&(start, _)) = groups.get(i) {
                cuts.free[start] = true;
            }
        }
        at = if open { window.len() } else { end };
    }
}

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
    // A run longer than MAX_RUN is not held back whole: at most MAX_RUN bytes of it wait.
    assert!(redactor.push(&"x".repeat(3 * MAX_RUN + 5)).len() >= 2 * MAX_RUN + 5);
}

/// Secrets, their kind, and fillers of their class that put them anywhere in a long run.
const PLACED: [(&str, &str, &[&str]); 8] = [
    ("sk-proj-abcdefghijklmnopqrstuvwx1234", "api_key", &["-", "_", "x", "a-"]),
    ("AKIAIOSFODNN7EXAMPLE", "api_key", &["-", "x"]),
    ("ghp_abcdefghijklmnopqrstuvwxyz0123456789AB", "api_key", &["-", "g"]),
    ("xoxb-1234567890-abcdefghij", "api_key", &["x", "_"]),
    ("jane.doe+news@example.co.uk", "email", &["-", ".", "+", "%."]),
    ("4111-1111-1111-1111", "card", &["-", " ", "- "]),
    ("4111 1111 1111 1111", "card", &["-", " "]),
    (" 5500 0000 0000 0004", "card", &["0"]),
];

/// `pad` bytes of `filler` (repeated), then `secret`, then " ok".
fn placed(filler: &str, pad: usize, secret: &str) -> String {
    let mut text = filler.repeat(pad / filler.len() + 1);
    text.truncate(pad);
    text + secret + " ok"
}

/// `out` is what redacting `placed(filler, pad, secret)` should give: some of the filler
/// (an address may take in filler before it, as in any run), then the secret's replacement.
fn assert_found(out: &str, filler: &str, pad: usize, secret: &str, kind: &str, how: &str) {
    let tail = format!("[REDACTED:{kind}] ok");
    let kept = out.strip_suffix(&tail).unwrap_or_else(|| panic!("{how}: {secret:?} after {pad} {filler:?}: {out:?}"));
    assert!(kept.len() <= pad + 1, "{how}: {secret:?} after {pad} {filler:?}: {out:?}");
    assert!(kept.bytes().all(|b| filler.as_bytes().contains(&b) || b == b' '), "{how}: {out:?}");
}

#[test]
fn secrets_across_the_cuts_of_a_long_run_are_found() {
    for (secret, kind, fillers) in PLACED {
        for &filler in fillers {
            // Across the first cut, and across a later one.
            for pad in (MAX_RUN - 40..MAX_RUN + 20).chain(2 * MAX_RUN - 30..2 * MAX_RUN + 10) {
                let text = placed(filler, pad, secret);
                assert_found(&redact(&all(), &text), filler, pad, secret, kind, "whole");
            }
        }
    }
}

#[test]
fn streams_find_secrets_across_the_cuts_of_a_long_run() {
    for (secret, kind, fillers) in PLACED {
        for &filler in fillers {
            for pad in [MAX_RUN - 30, MAX_RUN - 8, MAX_RUN - 3, MAX_RUN - 1, MAX_RUN, MAX_RUN + 2, 2 * MAX_RUN - 5] {
                let text = placed(filler, pad, secret);
                let near = (pad - 3..pad + 8).chain(MAX_RUN - 2..MAX_RUN + 3).filter(|&cut| cut < text.len());
                for cut in near {
                    let out = streamed(&all(), &text, &[cut]);
                    assert_found(&out, filler, pad, secret, kind, &format!("split at {cut}"));
                }
                let mut every = (1..text.len()).step_by(7).collect::<Vec<_>>();
                let out = streamed(&all(), &text, &every);
                assert_found(&out, filler, pad, secret, kind, "every 7 bytes");
                every = (1..text.len()).collect();
                assert_found(&streamed(&all(), &text, &every), filler, pad, secret, kind, "byte by byte");
            }
        }
    }
}

/// An address after a long word: the 64 bytes before its `@` (the longest local part) are never
/// sent, wherever the word's cuts fall and however the stream is split.
#[test]
fn an_address_after_a_long_word_keeps_its_local_part() {
    for filler in ["a", "ab1", "x.y"] {
        for pad in (MAX_RUN - 70..MAX_RUN + 70).step_by(3).chain([2 * MAX_RUN + 1, 3 * MAX_RUN - 20]) {
            let mut text = filler.repeat(pad / filler.len() + 1);
            text.truncate(pad);
            // A local part ends on a letter or digit.
            text.push('z');
            text.push_str("@example.com ok");
            let at = pad + 1;
            let every: Vec<usize> = (1..text.len()).step_by(5).collect();
            for (how, out) in [("whole", redact(&all(), &text)), ("every 5 bytes", streamed(&all(), &text, &every))] {
                let kept = out
                    .strip_suffix("[REDACTED:email] ok")
                    .unwrap_or_else(|| panic!("{how}: {filler:?} × {pad}: {out:?}"));
                assert!(
                    kept.len() + 64 <= at,
                    "{how}: {filler:?} × {pad}: {} bytes before the @ were sent",
                    at - kept.len()
                );
                assert_eq!(kept, &text[..kept.len()], "{how}: {filler:?} × {pad}");
            }
        }
    }
}

#[test]
fn streams_with_wide_characters_find_a_key_across_a_cut_at_every_split() {
    // Deltas are whole characters (the engine holds back an unfinished one), so splits fall
    // on character boundaries, here right beside two- to four-byte characters.
    let text = format!("Clé ☕ «{}sk-live-ABCDEFGHIJKLMNOPQRSTUVWX» 🎉 été", "-".repeat(MAX_RUN - 9));
    let whole = redact(&all(), &text);
    assert_eq!(whole, format!("Clé ☕ «{}[REDACTED:api_key]» 🎉 été", "-".repeat(MAX_RUN - 9)));
    let bounds: Vec<usize> = (1..text.len()).filter(|&i| text.is_char_boundary(i)).collect();
    for &a in &bounds {
        assert_eq!(streamed(&all(), &text, &[a]), whole, "split at {a}");
    }
    let near: Vec<usize> = bounds.iter().copied().filter(|&i| (MAX_RUN - 10..MAX_RUN + 30).contains(&i)).collect();
    for (n, &a) in near.iter().enumerate() {
        for &b in &near[n + 1..] {
            assert_eq!(streamed(&all(), &text, &[2, a, b, text.len() - 3]), whole, "split at {a}, {b}");
        }
    }
    assert_eq!(streamed(&all(), &text, &bounds), whole);
}

#[test]
fn long_runs_without_secrets_are_held_back_boundedly() {
    let runs = [
        "x".repeat(20_000),
        "-".repeat(20_000),
        "0".repeat(20_000),
        "1 ".repeat(10_000),
        "a.".repeat(10_000),
        "ab-".repeat(7_000),
        " ".repeat(20_000),
        format!("sk-{}", "a".repeat(20_000)),
        format!("bob@{}", "a".repeat(20_000)),
        format!("bob{}", ".a".repeat(10_000)),
    ];
    for run in &runs {
        let text = format!("{run} end");
        let mut redactor = Redactor::new(&all());
        let mut out = String::new();
        let mut from = 0;
        for cut in (13..text.len()).step_by(13).chain([text.len()]) {
            out.push_str(&redactor.push(&text[from..cut]));
            from = cut;
            let held: usize = redactor.stages.iter().map(|stage| stage.held.len()).sum();
            assert!(held <= 3 * (MAX_RUN + 1), "{held} bytes held at {cut} of {:?}…", &run[..8]);
        }
        out.push_str(&redactor.finish());
        assert_eq!(out, redact(&all(), &text), "{:?}…", &run[..8]);
    }
}

#[test]
fn streams_equal_the_whole_text_over_long_runs_of_mixed_classes() {
    const PARTS: [&str; 18] =
        ["-", "-", "0", "7", "1 ", "4111 ", "a", "x", "Q", "@", ".", "_", "+", "sk-", "AKIA", "xoxb-", "é", " "];
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    for _ in 0..40 {
        // Parts mostly repeated, so that runs of one class grow long.
        let mut text = String::new();
        while text.len() < 3000 {
            let part = PARTS[next(PARTS.len())];
            text.push_str(&part.repeat(1 + next(4) * next(40)));
        }
        let whole = redact(&all(), &text);
        let mut cuts = Vec::new();
        let mut at = 0;
        loop {
            at += 1 + next(60);
            while at < text.len() && !text.is_char_boundary(at) {
                at += 1;
            }
            if at >= text.len() {
                break;
            }
            cuts.push(at);
        }
        assert_eq!(streamed(&all(), &text, &cuts), whole, "{text:?} at {cuts:?}");
    }
}

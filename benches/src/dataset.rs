//! ShareGPT-format datasets: a JSON array of `{"conversations": [{"from", "value"}, ...]}`.
//!
//! As vLLM's benchmarks read them: the first turn (the human's) is the prompt, and the length of
//! the second (the model's reply) is the output length, unless `--max-tokens` fixes it. Entries
//! with fewer than two turns or an empty prompt are skipped; the rest are shuffled with the seed
//! and taken in order, cycling when more requests are asked for than the file holds.

use std::path::Path;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Deserialize;

use crate::workload::WorkItem;

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    conversations: Vec<Turn>,
}

#[derive(Deserialize)]
struct Turn {
    #[serde(default)]
    value: String,
}

/// `n` requests from the ShareGPT file at `path`; see the module docs. `count` measures the reply's
/// length in tokens.
pub fn sharegpt(
    path: &Path,
    n: usize,
    seed: u64,
    max_tokens: Option<usize>,
    count: &dyn Fn(&str) -> usize,
) -> anyhow::Result<Vec<WorkItem>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text, n, seed, max_tokens, count).with_context(|| format!("in {}", path.display()))
}

/// [`sharegpt`] on the file's text.
pub fn parse(
    text: &str,
    n: usize,
    seed: u64,
    max_tokens: Option<usize>,
    count: &dyn Fn(&str) -> usize,
) -> anyhow::Result<Vec<WorkItem>> {
    let entries: Vec<Entry> = serde_json::from_str(text).context("not a ShareGPT JSON array")?;
    let mut items: Vec<WorkItem> = entries
        .iter()
        .filter_map(|e| match e.conversations.as_slice() {
            [prompt, reply, ..] if !prompt.value.trim().is_empty() => Some(WorkItem {
                prompt: prompt.value.clone(),
                max_tokens: max_tokens.unwrap_or_else(|| count(&reply.value)).max(1),
            }),
            _ => None,
        })
        .collect();
    anyhow::ensure!(!items.is_empty(), "no conversation with a prompt and a reply");
    items.shuffle(&mut StdRng::seed_from_u64(seed));
    Ok(items.iter().cycle().take(n).cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> usize {
        s.split_whitespace().count()
    }

    #[test]
    fn the_sample_file_parses_into_prompts_and_reply_lengths() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sharegpt-sample.json");
        let items = sharegpt(&path, 6, 0, None, &words).expect("the sample parses");
        assert_eq!(items.len(), 6);
        assert!(items.iter().all(|w| !w.prompt.is_empty() && w.max_tokens >= 1));
        let fixed = sharegpt(&path, 3, 0, Some(8), &words).expect("the sample parses");
        assert!(fixed.iter().all(|w| w.max_tokens == 8));
    }

    #[test]
    fn first_turn_is_the_prompt_second_sets_the_length_and_short_entries_are_skipped() {
        let text = r#"[
            {"id": "a", "conversations": [{"from": "human", "value": "Name three rivers."},
                                          {"from": "gpt", "value": "The Nile, the Amazon and the Danube."}]},
            {"id": "b", "conversations": [{"from": "human", "value": "Only a question."}]},
            {"id": "c", "conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "x"}]},
            {"id": "d"}
        ]"#;
        let items = parse(text, 3, 0, None, &words).expect("parses");
        assert_eq!(items.len(), 3, "cycles past the file's one usable entry");
        assert!(items.iter().all(|w| w.prompt == "Name three rivers." && w.max_tokens == 7));
    }

    #[test]
    fn same_seed_same_order_and_bad_files_are_errors() {
        let text: String = format!(
            "[{}]",
            (0..20)
                .map(|i| format!(r#"{{"conversations": [{{"value": "q{i}"}}, {{"value": "a"}}]}}"#))
                .collect::<Vec<_>>()
                .join(",")
        );
        let order = |seed| parse(&text, 20, seed, None, &words).expect("parses").into_iter().map(|w| w.prompt);
        assert_eq!(order(1).collect::<Vec<_>>(), order(1).collect::<Vec<_>>());
        assert_ne!(order(1).collect::<Vec<_>>(), order(2).collect::<Vec<_>>());
        assert!(parse("{}", 1, 0, None, &words).is_err());
        assert!(parse("[]", 1, 0, None, &words).unwrap_err().to_string().contains("no conversation"));
        assert!(sharegpt(Path::new("/nonexistent.json"), 1, 0, None, &words).is_err());
    }
}

//! Seeded synthetic chat workloads: real English text cut to a target prompt length.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Source text for prompts: ordinary prose on varied topics, so prompts look like real requests
/// rather than random token soup.
const CORPUS: &str = "\
The river rose slowly through the night, and by morning the lower fields were under a sheet of brown water. \
Farmers gathered on the ridge to watch, counting the fence posts that still showed above the flood. \
A lighthouse keeper writes the weather in a log every four hours: wind, visibility, the state of the sea. \
Over forty years those notes became one of the longest continuous records of the coast. \
Bread rises because yeast eats sugar and releases carbon dioxide, which the gluten network traps as bubbles. \
Bakers control the rise with temperature, time and the amount of salt, which slows fermentation. \
The first computers filled whole rooms and were programmed by plugging cables into boards. \
Later machines read programs from punched cards, and a single misplaced hole could ruin a night's work. \
In a healthy forest, fallen trees are not waste: fungi and insects turn them into soil over decades. \
Many birds nest only in old hollow trunks, so a tidy forest can be a poor home for wildlife. \
A good map leaves things out. It shows the roads a driver needs and hides the thousand details that would bury them. \
The choice of what to omit is where the mapmaker's skill lies. \
Trains in the mountains climb with the help of a toothed rail between the tracks, gripping where wheels alone would slip. \
Some of these lines have run for more than a century, carrying hikers, cheese and mail. \
When you learn a language as an adult, listening comes before speaking: the ear must first learn which sounds matter. \
Children do this without effort, which is why they often lose a foreign accent that adults keep. \
The library opened its doors at nine, and a line of students was already waiting with laptops and coffee. \
By noon every desk by the windows was taken, and the quiet was broken only by the turning of pages. \
Bees communicate the direction of flowers with a dance: the angle of the waggle run points relative to the sun. \
The length of the run tells the others how far they must fly. \
A bridge is designed for loads it may never carry: wind, ice, crowds, and trucks heavier than the law allows. \
Engineers add a margin to every figure, because the cost of being wrong is measured in lives.";

/// One request of a workload.
#[derive(Debug, Clone)]
pub struct WorkItem {
    /// The user message.
    pub prompt: String,
    /// Tokens to generate.
    pub max_tokens: usize,
}

/// `n` seeded prompts whose lengths fall in `min_len..=max_len` as measured by `count` (tokens,
/// when given a tokenizer's counter; words otherwise), each after the same `shared_prefix` tokens
/// of text (none when 0): the shape of requests that share a long system prompt or document.
pub fn synthetic(
    n: usize,
    (min_len, max_len): (usize, usize),
    shared_prefix: usize,
    max_tokens: usize,
    seed: u64,
    count: &dyn Fn(&str) -> usize,
) -> Vec<WorkItem> {
    let words: Vec<&str> = CORPUS.split_whitespace().collect();
    let mut prefix = String::new();
    for word in words.iter().cycle() {
        if shared_prefix == 0 || count(&prefix) >= shared_prefix {
            break;
        }
        prefix.push_str(word);
        prefix.push(' ');
    }
    if !prefix.is_empty() {
        prefix.push_str("\n\n");
    }
    let base = count(&prefix);
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = base + rng.random_range(min_len..=max_len.max(min_len));
            let start = rng.random_range(0..words.len());
            let mut prompt = format!("{prefix}Summarise the following text.\n\n");
            let mut i = 0;
            while count(&prompt) < len {
                prompt.push_str(words[(start + i) % words.len()]);
                prompt.push(' ');
                i += 1;
            }
            WorkItem { prompt: prompt.trim_end().to_string(), max_tokens }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_seeded_and_within_length() {
        let words = |s: &str| s.split_whitespace().count();
        let a = synthetic(20, (30, 60), 0, 8, 1, &words);
        let b = synthetic(20, (30, 60), 0, 8, 1, &words);
        assert_eq!(a.iter().map(|w| &w.prompt).collect::<Vec<_>>(), b.iter().map(|w| &w.prompt).collect::<Vec<_>>());
        assert!(a.iter().all(|w| (30..=60).contains(&words(&w.prompt)) && w.max_tokens == 8));
        assert!(a.iter().all(|w| w.prompt.starts_with("Summarise")));
        let c = synthetic(20, (30, 60), 0, 8, 2, &words);
        assert_ne!(a[0].prompt, c[0].prompt);
    }

    #[test]
    fn a_shared_prefix_starts_every_prompt() {
        let words = |s: &str| s.split_whitespace().count();
        let items = synthetic(10, (30, 60), 200, 8, 3, &words);
        let prefix = items[0].prompt.split("Summarise").next().unwrap();
        assert_eq!(words(prefix), 200);
        assert!(items.iter().all(|w| w.prompt.starts_with(prefix)));
        assert!(items.iter().all(|w| (230..=260).contains(&words(&w.prompt))), "lengths count after the prefix");
        assert_ne!(items[0].prompt, items[1].prompt);
    }
}

//! Many requests at once: the engine batches them into shared steps.
//!
//! `cargo run --release -p sluice-engine --example concurrent -- 16`

use std::sync::Arc;
use std::time::Instant;

use sluice_engine::{Engine, EngineConfig, Request};

const QUESTIONS: [&str; 8] = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "What is 7 times 8?",
    "Give me a word that rhymes with cat.",
    "What do bees make?",
    "How many days are in a week?",
    "What is the largest planet in the solar system?",
    "Say hello in Italian.",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(16);
    let engine = Arc::new(Engine::new(EngineConfig::new(EngineConfig::default_model_path()))?);
    let started = Instant::now();
    // Submit everything first; the streams are read afterwards, each on its own thread.
    let streams = (0..n)
        .map(|i| engine.submit(Request::user(QUESTIONS[i % QUESTIONS.len()]).max_tokens(48)))
        .collect::<Result<Vec<_>, _>>()?;
    println!("submitted {n} requests; engine: {:?}", engine.stats());
    let handles: Vec<_> = streams.into_iter().map(|s| std::thread::spawn(move || s.collect_blocking())).collect();
    let mut generated = 0;
    for (i, h) in handles.into_iter().enumerate() {
        let c = h.join().map_err(|_| "reader thread panicked")??;
        generated += c.finish.usage.completion_tokens;
        println!("[{i:>2}] {:?}", c.text.lines().next().unwrap_or_default());
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{generated} tokens in {secs:.2} s: {:.1} tok/s across {n} requests", generated as f64 / secs);
    Ok(())
}

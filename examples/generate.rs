//! Generate one answer with the engine crate.
//!
//! `cargo run --release -p sluice-engine --example generate -- "What is the capital of France?"`
//! Uses `models/SmolLM2-135M-Instruct.Q4_1.gguf` (run `make model`) or the model in `$SLUICE_MODEL`.

use sluice_engine::{Engine, EngineConfig, Request};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let question = std::env::args().nth(1).unwrap_or_else(|| "What is the capital of France?".into());
    let engine = Engine::new(EngineConfig::new(EngineConfig::default_model_path()))?;
    let completion = engine.generate(Request::user(question).max_tokens(128))?;
    println!("{}", completion.text);
    eprintln!(
        "[{} prompt + {} generated tokens, finish: {}, {:.2} s]",
        completion.finish.usage.prompt_tokens,
        completion.finish.usage.completion_tokens,
        completion.finish.reason.as_str(),
        completion.finish.timings.total.as_secs_f64()
    );
    Ok(())
}

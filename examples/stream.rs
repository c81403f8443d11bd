//! Print tokens as the engine produces them.
//!
//! `cargo run --release -p sluice-engine --example stream -- "Write a short poem about rivers."`

use std::io::Write;

use sluice_engine::{Engine, EngineConfig, Request, SamplingParams, StreamEvent};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let prompt = std::env::args().nth(1).unwrap_or_else(|| "Write a short poem about rivers.".into());
    let engine = Engine::new(EngineConfig::new(EngineConfig::default_model_path()))?;
    let params = SamplingParams { max_tokens: 200, temperature: 0.7, top_p: 0.9, seed: Some(42), ..Default::default() };
    let stream = engine.submit(Request::user(prompt).with_params(params))?;
    let mut out = std::io::stdout();
    for event in stream {
        match event {
            StreamEvent::Token(t) => {
                out.write_all(t.text.as_bytes())?;
                out.flush()?;
            }
            StreamEvent::Finished(f) => {
                println!();
                eprintln!(
                    "[finish: {}, {} tokens, first token after {:.0} ms]",
                    f.reason.as_str(),
                    f.usage.completion_tokens,
                    f.timings.time_to_first_token.as_secs_f64() * 1e3
                );
            }
            StreamEvent::Error(e) => return Err(e.into()),
        }
    }
    Ok(())
}

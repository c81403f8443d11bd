//! Shared helpers for the engine's integration tests, which run on the real default model.
#![allow(dead_code)]

use std::path::PathBuf;

use sluice_engine::{Engine, EngineConfig, Request, SamplingParams};

/// The default model. Missing it is a failure with instructions, never a silent skip.
pub fn model_path() -> PathBuf {
    let path = EngineConfig::default_model_path();
    assert!(path.is_file(), "the default model is missing at {}: run `make model` first", path.display());
    path
}

/// One engine on the default model shared by every test of a test binary.
pub fn shared_engine() -> &'static Engine {
    static ENGINE: std::sync::OnceLock<Engine> = std::sync::OnceLock::new();
    ENGINE.get_or_init(|| engine_with(|_| {}))
}

/// An engine on the default model with `tweak` applied to the test configuration (the default one
/// with a 256 MiB KV cache, plenty for these tests).
pub fn engine_with(tweak: impl FnOnce(&mut EngineConfig)) -> Engine {
    let mut config = EngineConfig::new(model_path());
    config.kv_cache_memory = Some(256 << 20);
    tweak(&mut config);
    Engine::new(config).expect("engine loads the default model")
}

/// Waits (up to 30 s) until no request is waiting or running and every KV block is back: stats are
/// published after each step, so a stream's last token can arrive just before them.
pub fn wait_for_empty_pool(engine: &Engine) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let s = engine.stats();
        if s.kv_blocks_used == 0 && s.running == 0 && s.waiting == 0 {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "blocks never came back: {s:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Greedy parameters for `max_tokens` tokens.
pub fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams { max_tokens, ..SamplingParams::default() }
}

/// Sixteen different chat prompts of varied lengths.
pub fn prompts() -> Vec<String> {
    [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Explain photosynthesis in one sentence.",
        "List three prime numbers.",
        "What is 12 times 7?",
        "Name a famous painter and one of their works.",
        "Give me a synonym for happy.",
        "Translate 'good morning' into Spanish.",
        "Why is the sky blue? Answer briefly, in a way a child would understand, and mention sunlight.",
        "What does a compiler do?",
        "Suggest a name for a pet turtle.",
        "How many legs does a spider have?",
        "Describe the taste of lemon.",
        "What is the boiling point of water at sea level, in Celsius and in Fahrenheit?",
        "Tell me a fun fact about octopuses.",
        "What is the opposite of cold?",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Generates greedily, alone, and returns the token ids.
pub fn tokens_alone(engine: &Engine, prompt: &str, max_tokens: usize) -> Vec<u32> {
    engine.generate(Request::user(prompt).with_params(greedy(max_tokens))).expect("generation succeeds").token_ids
}

/// Hugging Face names of every weight of a tied-embedding Llama with `num_layers` layers.
pub fn weight_names(num_layers: usize) -> Vec<String> {
    let mut names = vec!["model.embed_tokens.weight".to_string(), "model.norm.weight".to_string()];
    for i in 0..num_layers {
        for w in [
            "input_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "post_attention_layernorm",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            names.push(format!("model.layers.{i}.{w}.weight"));
        }
    }
    names
}

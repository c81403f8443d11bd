//! Writes a GGUF model's tokenizer as Hugging Face `tokenizer.json` and `tokenizer_config.json`,
//! so that a Hugging Face folder with other weights can use it: the GPU proof (`benches/GPU.md`)
//! pairs the default model's tokenizer with random 1B Llama weights made by transformers.
//!
//! `cargo run --release -p sluice-bench --example hf_tokenizer -- models/SmolLM2-135M-Instruct.Q4_1.gguf DIR`

use std::path::PathBuf;

use anyhow::Context;
use sluice_engine::model::read_gguf;
use sluice_engine::Tokenizer;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(gguf), Some(dir)) = (args.next().map(PathBuf::from), args.next().map(PathBuf::from)) else {
        anyhow::bail!("usage: hf_tokenizer MODEL.gguf OUT_DIR")
    };
    let (content, _) = read_gguf(&gguf)?;
    let tokenizer = Tokenizer::from_gguf(&content)?;
    let md = &content.metadata;
    // BOS/EOS by text, as `tokenizer_config.json` names them.
    let token = |key: &str| -> Option<String> {
        md.get(key).and_then(|v| v.to_u32().ok()).and_then(|id| tokenizer.id_to_token(id))
    };
    let template = md.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
    let add_bos = md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
    let config = serde_json::json!({
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "add_bos_token": add_bos,
        "chat_template": template,
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_hf_json()?)?;
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)?)?;
    println!("wrote {} (vocabulary {})", dir.display(), tokenizer.vocab_size());
    Ok(())
}

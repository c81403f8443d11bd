//! Loading from a Hugging Face folder (`config.json`, `*.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`): the default model written out in that format generates exactly what
//! the GGUF file does.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device};
use sluice_engine::model::{read_gguf, WeightSource};
use sluice_engine::{CpuActivations, Engine, EngineConfig, Request};

/// Writes the default model as a Hugging Face folder under `dir`.
fn write_hf_folder(engine: &Engine, dir: &std::path::Path) {
    let (content, reader) = read_gguf(&common::model_path()).unwrap();
    let template = content.metadata["tokenizer.chat_template"].to_string().unwrap().clone();
    let mut source = WeightSource::gguf(content, reader).unwrap();
    let c = source.config().clone();
    let mut tensors = HashMap::new();
    let names = common::weight_names(c.num_layers);
    for n in names {
        let t = source.get(&n, DType::F32, &Device::Cpu).unwrap();
        tensors.insert(n, t);
    }
    // Two shards, as large models ship.
    let (a, b): (HashMap<_, _>, HashMap<_, _>) = tensors.into_iter().partition(|(k, _)| k.contains("layers.1"));
    candle_core::safetensors::save(&a, dir.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, dir.join("model-00002-of-00002.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": true,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), engine.tokenizer().to_hf_json().unwrap()).unwrap();
    let tc = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "add_bos_token": false,
        "chat_template": template,
    });
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

/// A folder removed when dropped, also when the test fails.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn hf_folder_generates_what_the_gguf_does() {
    // The folder holds the dequantized weights in f32, so the GGUF side runs the exact path.
    let gguf = common::engine_with(|c| c.cpu_activations = CpuActivations::F32);
    let dir = TempDir(std::env::temp_dir().join(format!("sluice-hf-{}", std::process::id())));
    let dir = &dir.0;
    std::fs::create_dir_all(dir).unwrap();
    write_hf_folder(&gguf, dir);
    let hf = Engine::new(EngineConfig::new(dir)).expect("the Hugging Face folder loads");
    assert_eq!(hf.model_info().vocab_size, gguf.model_info().vocab_size);
    for q in ["What is the capital of France?", "Write a haiku about the sea."] {
        let want = gguf.generate(Request::user(q).max_tokens(16)).unwrap();
        let got = hf.generate(Request::user(q).max_tokens(16)).unwrap();
        assert_eq!(got.token_ids, want.token_ids, "{q}");
        assert_eq!(got.text, want.text);
    }
}

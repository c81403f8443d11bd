//! Golden tests: our paged, packed forward against a reference forward computed another way on the
//! same weights (candle-transformers' contiguous-KV Llama, fed the same dequantized f32 weights).
//! The comparison runs our exact path (f32 activations); the default int8-activation path is
//! checked against it in `weights.rs`.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama as reference;
use sluice_engine::model::{read_gguf, WeightSource};
use sluice_engine::{ChatMessage, CpuActivations, FinishReason, Request};

const MAX_TOKENS: usize = 24;

/// Greedy generation with candle-transformers' Llama on the same weights.
fn reference_greedy(source: &mut WeightSource, prompts: &[Vec<u32>], eos: u32) -> Vec<Vec<u32>> {
    let c = source.config().clone();
    let names = common::weight_names(c.num_layers);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for n in names {
        tensors.insert(n.clone(), source.get(&n, DType::F32, &Device::Cpu).unwrap());
    }
    let config = reference::Config {
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        vocab_size: c.vocab_size,
        num_hidden_layers: c.num_layers,
        num_attention_heads: c.num_heads,
        num_key_value_heads: c.num_kv_heads,
        use_flash_attn: false,
        rms_norm_eps: c.rms_norm_eps,
        rope_theta: c.rope_theta,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: c.max_position_embeddings,
        tie_word_embeddings: true,
    };
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let model = reference::Llama::load(vb, &config).unwrap();
    prompts
        .iter()
        .map(|prompt| {
            let mut cache = reference::Cache::new(true, DType::F32, &config, &Device::Cpu).unwrap();
            let mut out = Vec::new();
            let mut input = prompt.clone();
            let mut pos = 0;
            for _ in 0..MAX_TOKENS {
                let x = Tensor::new(input.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
                let logits = model.forward(&x, pos, &mut cache).unwrap().squeeze(0).unwrap();
                pos += input.len();
                let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
                out.push(next);
                if next == eos {
                    break;
                }
                input = vec![next];
            }
            out
        })
        .collect()
}

#[test]
fn paged_forward_matches_reference_forward_token_for_token() {
    let engine = &common::engine_with(|c| c.cpu_activations = CpuActivations::F32);
    let questions = ["What is the capital of France?", "Write a haiku about the sea.", "What is 12 times 7?"];
    let prompts: Vec<Vec<u32>> = questions
        .iter()
        .map(|q| engine.tokenize_prompt(&sluice_engine::Prompt::Chat(vec![ChatMessage::new("user", *q)])).unwrap())
        .collect();
    let (content, reader) = read_gguf(&common::model_path()).unwrap();
    let mut source = WeightSource::gguf(content, reader).unwrap();
    let eos = engine.tokenizer().eos_token_id().unwrap();
    let expected = reference_greedy(&mut source, &prompts, eos);
    for ((q, prompt), want) in questions.iter().zip(&prompts).zip(&expected) {
        let got = engine.generate(Request::tokens(prompt.clone()).with_params(common::greedy(MAX_TOKENS))).unwrap();
        let mut got_ids = got.token_ids.clone();
        if got.finish.reason == FinishReason::Stop && got_ids.len() < MAX_TOKENS {
            assert_eq!(got_ids.last(), Some(&eos), "{q}: stopped without EOS");
        }
        got_ids.truncate(want.len());
        assert_eq!(&got_ids, want, "{q}: paged forward diverged from the reference");
    }
}

#[test]
fn capital_of_france_is_paris() {
    let engine = common::shared_engine();
    let out = engine.generate(Request::user("What is the capital of France?").max_tokens(32)).unwrap();
    assert!(out.text.contains("Paris"), "answer was {:?}", out.text);
    assert_eq!(out.finish.reason, FinishReason::Stop, "the model ends its answer with <|im_end|>");
    assert_eq!(out.finish.usage.completion_tokens, out.token_ids.len());
    assert!(!out.text.contains("<|im_end|>"), "special tokens are not shown");
}

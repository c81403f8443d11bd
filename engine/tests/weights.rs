//! CPU weight formats on the real model: `native` keeps GGUF's Q4_1/Q8_0 blocks exactly, so it
//! computes with the very values dequantisation gives, and so gives f32's output bit for bit.

mod common;

use candle_core::{DType, Device};
use sluice_engine::model::{read_gguf, PackedLinear, WeightSource};
use sluice_engine::{CpuWeights, Request, SamplingParams, WeightFormat};

#[test]
fn native_weights_hold_the_dequantized_values() {
    let (content, reader) = read_gguf(&common::model_path()).unwrap();
    let mut source = WeightSource::gguf(content, reader).unwrap();
    let layers = source.config().num_layers;
    let mut kept = 0;
    for name in common::weight_names(layers) {
        let Some(q) = source.get_quantized(&name).unwrap() else { continue };
        kept += 1;
        let packed = PackedLinear::from_quantized(&q.weight, q.n, q.k).unwrap().dequantized().unwrap();
        let dense = source.get(&name, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(packed.dims(), dense.dims(), "{name}");
        let bits = |t: &candle_core::Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect::<Vec<_>>()
        };
        assert!(bits(&packed) == bits(&dense), "{name}: packed values differ from the dequantized ones");
    }
    // Every projection (7 a layer) and the embedding are quantised in the default model.
    assert_eq!(kept, layers * 7 + 1);
}

#[test]
fn native_and_f32_weights_generate_the_same_tokens_and_logprobs() {
    let native = common::engine_with(|c| c.cpu_weights = CpuWeights::Native);
    let f32s = common::engine_with(|c| c.cpu_weights = CpuWeights::Repack(WeightFormat::F32));
    let params = SamplingParams { max_tokens: 12, logprobs: Some(2), ..SamplingParams::default() };
    for prompt in common::prompts().iter().take(4) {
        let run = |engine: &sluice_engine::Engine| {
            engine.generate(Request::user(prompt.as_str()).with_params(params.clone())).unwrap()
        };
        let (a, b) = (run(&native), run(&f32s));
        assert_eq!(a.token_ids, b.token_ids, "{prompt}");
        let lp = |c: &sluice_engine::Completion| c.logprobs.iter().map(|l| l.logprob.to_bits()).collect::<Vec<_>>();
        assert_eq!(lp(&a), lp(&b), "{prompt}: logprobs differ");
    }
}

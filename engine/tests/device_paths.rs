//! The CUDA path's departures from the CPU path, run on the CPU with the real model: sampled rows
//! read from the device (greedy argmaxes, heads of the distribution, whole rows only when needed),
//! decode steps padded to fixed batch sizes (the CUDA-graph path), and GGUF weights kept quantized
//! on candle's `QMatMul`. These tests pin down what each computes; on a GPU the proof in
//! `benches/GPU.md` runs them there.

mod common;

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use sluice_engine::model::{
    read_gguf, DecodeGraphs, LayerCache, Llama, LoadOptions, ModelRunner, QLinear, Readout, StepInput, StepLogits,
    WeightSource,
};
use sluice_engine::sampling::{SampleContext, Sampler};
use sluice_engine::scheduler::Scheduler;
use sluice_engine::sequence::Sequence;
use sluice_engine::{
    CpuActivations, CpuWeights, DeviceSampling, Engine, FinishReason, GraphCounts, Request, SamplingParams,
    SchedulerConfig, Tokenizer, WeightFormat,
};

/// Every kind of request, submitted at once so that steps mix plain greedy rows with rows that
/// need the sampler; returns each request's tokens, text and finish.
fn mixed_requests(engine: &Engine, stop_id: u32) -> Vec<(Vec<u32>, String, FinishReason)> {
    let greedy = |max_tokens| SamplingParams { max_tokens, ..SamplingParams::default() };
    let cases: Vec<(usize, SamplingParams)> = vec![
        (0, greedy(64)),
        (4, greedy(64)),
        (11, greedy(64)),
        (1, SamplingParams { ignore_eos: true, ..greedy(48) }),
        (0, SamplingParams { stop_token_ids: vec![stop_id], ..greedy(64) }),
        (4, SamplingParams { min_tokens: 12, ..greedy(64) }),
        (2, SamplingParams { logprobs: Some(2), ..greedy(16) }),
        (3, SamplingParams { temperature: 0.8, seed: Some(7), ..greedy(24) }),
        (5, SamplingParams { stop: vec![".".into()], ..greedy(64) }),
    ];
    let prompts = common::prompts();
    let streams: Vec<_> = cases
        .into_iter()
        .map(|(p, params)| engine.submit(Request::user(prompts[p].as_str()).with_params(params)).unwrap())
        .collect();
    streams
        .into_iter()
        .map(|s| {
            let c = s.collect_blocking().unwrap();
            (c.token_ids, c.text, c.finish.reason)
        })
        .collect()
}

/// The index in `mixed_requests` of the one sampled (temperature > 0) request.
const SAMPLED: usize = 7;

/// Device sampling (argmaxes and heads read from the device, rows copied only when needed) gives
/// every greedy request exactly the host's tokens, logprobs within f32 rounding of the host's, and
/// the sampled request tokens that depend on its seed only, not on the batch around it.
#[test]
fn device_sampling_generates_what_host_sampling_does() {
    let host = common::engine_with(|c| c.device_sampling = DeviceSampling::Host);
    let device = common::engine_with(|c| c.device_sampling = DeviceSampling::Device);
    // A token the first greedy answer produces, as a stop id that must end it at the same place.
    let first = common::tokens_alone(&host, &common::prompts()[0], 64);
    let stop_id = first[first.len() / 2];
    let want = mixed_requests(&host, stop_id);
    let mut got = mixed_requests(&device, stop_id);
    assert!(want.iter().any(|(ids, _, _)| ids.contains(&stop_id) || ids.len() < 64), "no request stopped early");
    assert!(want.iter().filter(|w| w.2 == FinishReason::Stop).count() >= 3, "EOS, stop id and stop string: {want:?}");
    let sampled = got.remove(SAMPLED);
    assert_eq!(got, [&want[..SAMPLED], &want[SAMPLED + 1..]].concat(), "greedy requests");
    // The sampled request, alone: the same tokens as in the batch.
    let params = SamplingParams { temperature: 0.8, seed: Some(7), max_tokens: 24, ..SamplingParams::default() };
    let alone = device.generate(Request::user(common::prompts()[3].as_str()).with_params(params)).unwrap();
    assert_eq!((alone.token_ids, alone.text), (sampled.0, sampled.1), "seeded sampling on the device path");
    // Steps of plain greedy rows took argmaxes, the others heads; some rows were copied whole
    // (the `min_tokens` request suppresses EOS, which is not always in the head), not most.
    let s = device.stats();
    assert_eq!(host.stats().device_argmax_tokens + host.stats().head_tokens, 0);
    assert!(s.device_argmax_tokens > 0 && s.head_tokens > 0, "{s:?}");
    assert!(s.fetched_rows * 4 < s.head_tokens, "{s:?}");
    // Logprobs from a head: the host's ids, values within f32 rounding.
    let params = SamplingParams { logprobs: Some(5), max_tokens: 12, ..SamplingParams::default() };
    let request = || Request::user(common::prompts()[5].as_str()).with_params(params.clone());
    let (a, b) = (host.generate(request()).unwrap(), device.generate(request()).unwrap());
    assert_eq!(a.token_ids, b.token_ids);
    for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
        assert_eq!(x.top.iter().map(|t| t.0).collect::<Vec<_>>(), y.top.iter().map(|t| t.0).collect::<Vec<_>>());
        for (p, q) in x.top.iter().zip(&y.top).chain([(&(x.token, x.logprob), &(y.token, y.logprob))]) {
            assert!((p.1 - q.1).abs() < 1e-4, "{p:?} vs {q:?}");
        }
    }
    // A batch of plain greedy requests alone takes every token from the device argmax.
    let before = device.stats();
    let alone = common::tokens_alone(&device, &common::prompts()[2], 16);
    assert_eq!(alone, common::tokens_alone(&host, &common::prompts()[2], 16));
    let after = device.stats();
    assert_eq!(
        after.device_argmax_tokens - before.device_argmax_tokens,
        after.generated_tokens - before.generated_tokens
    );
}

/// Hot sampled requests (temperature 2: draws often fall past the head) in one batch: the rows
/// the heads cannot settle are copied from the device together and sampled in parallel, and each
/// request still gets the tokens its seed gives it alone.
#[test]
fn rows_copied_whole_together_give_each_request_its_own_draws() {
    let device = common::engine_with(|c| c.device_sampling = DeviceSampling::Device);
    let prompts = common::prompts();
    let request = |i: usize| {
        let params =
            SamplingParams { temperature: 2.0, seed: Some(i as u64), max_tokens: 16, ..SamplingParams::default() };
        Request::user(prompts[i].as_str()).with_params(params)
    };
    let before = device.stats();
    let streams: Vec<_> = (0..6).map(|i| device.submit(request(i)).unwrap()).collect();
    let together: Vec<Vec<u32>> = streams.into_iter().map(|s| s.collect_blocking().unwrap().token_ids).collect();
    let after = device.stats();
    assert!(after.fetched_rows - before.fetched_rows >= 10, "few draws fell past the head: {after:?}");
    assert!(after.head_tokens > before.head_tokens, "{after:?}");
    for (i, want) in together.iter().enumerate() {
        assert_eq!(&device.generate(request(i)).unwrap().token_ids, want, "request {i}, alone and in the batch");
    }
}

/// Decode steps padded to fixed batch sizes (the CUDA-graph path, run eagerly on the CPU) generate
/// exactly what unpadded steps do, whether the rows come back as logits, argmaxes or heads.
#[test]
fn padded_decode_steps_generate_exactly_what_plain_steps_do() {
    for sampling in [DeviceSampling::Host, DeviceSampling::Device] {
        let plain = common::engine_with(|c| c.device_sampling = sampling);
        let first = common::tokens_alone(&plain, &common::prompts()[0], 64);
        let stop_id = first[first.len() / 2];
        let want = mixed_requests(&plain, stop_id);
        assert_eq!(plain.stats().decode_graphs, GraphCounts::default(), "off unless asked for");
        let padded = common::engine_with(|c| {
            c.device_sampling = sampling;
            c.cuda_graphs = true;
        });
        assert_eq!(mixed_requests(&padded, stop_id), want, "{sampling:?}");
        // 1 to 9 sequences decode at once: buckets 1 to 16, with and without padding rows.
        let counts = padded.stats().decode_graphs;
        assert!(counts.eager > 20, "{sampling:?}: {counts:?}");
        assert_eq!((counts.captured, counts.replayed), (0, 0), "nothing to capture on the CPU");
        common::wait_for_empty_pool(&padded);
    }
}

/// The step that precedes each capture at start-up, padding rows only, leaves every cache row as
/// it was (its slots are the padding slot) and gives a row of logits per padding row.
#[test]
fn a_step_of_padding_rows_stores_nothing() {
    let model = load(false);
    let c = model.config().clone();
    let (blocks, block_size) = (6, 16);
    let dims = (blocks, block_size, c.num_kv_heads, c.head_dim);
    let cache: Vec<LayerCache> = (0..c.num_layers)
        .map(|_| LayerCache {
            k: Tensor::rand(-1f32, 1f32, dims, &Device::Cpu).unwrap(),
            v: Tensor::rand(-1f32, 1f32, dims, &Device::Cpu).unwrap(),
        })
        .collect();
    let before: Vec<(Vec<f32>, Vec<f32>)> = cache
        .iter()
        .map(|l| (l.k.flatten_all().unwrap().to_vec1().unwrap(), l.v.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    let graphs = DecodeGraphs::new(&model, 8, blocks, block_size).unwrap();
    for bucket in [1, 4, 8] {
        let logits = graphs.padding_step(&model, &cache, bucket).unwrap();
        assert_eq!(logits.dims(), [bucket, model.vocab_size()]);
        let rows = logits.to_vec2::<f32>().unwrap();
        assert!(rows.iter().flatten().all(|x| x.is_finite()), "bucket {bucket}");
        // Every padding row is the same step (token 0 at position 0), so the same logits.
        assert!(rows.iter().all(|r| r == &rows[0]), "bucket {bucket}");
    }
    for (layer, (l, (k, v))) in cache.iter().zip(&before).enumerate() {
        assert_eq!(&l.k.flatten_all().unwrap().to_vec1::<f32>().unwrap(), k, "layer {layer} keys");
        assert_eq!(&l.v.flatten_all().unwrap().to_vec1::<f32>().unwrap(), v, "layer {layer} values");
    }
}

/// The default model loaded on the CPU, exact f32 (dense reference) or with GGUF weights on
/// candle's `QMatMul`.
fn load(quantized_matmul: bool) -> Llama {
    load_with(|o| o.quantized_matmul = quantized_matmul)
}

/// The default model loaded on the CPU in f32 with `tweak` applied to the dense reference's
/// options.
fn load_with(tweak: impl FnOnce(&mut LoadOptions)) -> Llama {
    let (content, reader) = read_gguf(&common::model_path()).unwrap();
    let mut source = WeightSource::gguf(content, reader).unwrap();
    let mut options = LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        cpu_weights: CpuWeights::Repack(WeightFormat::F32),
        cpu_activations: CpuActivations::F32,
        quantized_matmul: false,
        gemv: false,
        gpu_layout: false,
    };
    tweak(&mut options);
    Llama::load(&mut source, &options, &|_, _| {}).unwrap()
}

/// Greedy decoding of `prompts` (token ids) together on `model` through `Llama::forward`, one
/// prefill step and then `steps` decode steps (one row per sequence, every row sampled): each
/// sequence's tokens and, per step, each sequence's log-probabilities.
fn greedy_steps(model: &Llama, prompts: &[Vec<u32>], steps: usize) -> (Vec<Vec<u32>>, Vec<Vec<Vec<f32>>>) {
    let block_size = 16;
    let per_seq = (prompts.iter().map(Vec::len).max().unwrap() + steps).div_ceil(block_size);
    let cache = model.allocate_cache(per_seq * prompts.len(), block_size, DType::F32).unwrap();
    let tables: Vec<Vec<u32>> =
        (0..prompts.len()).map(|s| (0..per_seq).map(|b| (s * per_seq + b) as u32).collect()).collect();
    let slot = |s: usize, pos: usize| tables[s][pos / block_size] * block_size as u32 + (pos % block_size) as u32;
    let u32s = |v: Vec<u32>| Tensor::new(v, &Device::Cpu).unwrap();
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    let mut logprobs = Vec::new();
    // The rows of each step: (sequence, first position, token count).
    let mut rows: Vec<(usize, usize, usize)> = prompts.iter().enumerate().map(|(s, p)| (s, 0, p.len())).collect();
    for _ in 0..=steps {
        let (mut ids, mut positions, mut slots, mut cu, mut lens, mut sample) =
            (vec![], vec![], vec![], vec![0u32], vec![], vec![]);
        for &(s, start, len) in &rows {
            for (pos, &id) in seqs[s].iter().enumerate().skip(start).take(len) {
                ids.push(id);
                positions.push(pos as u32);
                slots.push(slot(s, pos));
            }
            cu.push(ids.len() as u32);
            lens.push((start + len) as u32);
            sample.push(ids.len() as u32 - 1);
        }
        let every_row_sampled = sample.len() == ids.len();
        let flat_tables: Vec<u32> = tables.concat();
        let input = StepInput {
            token_ids: u32s(ids),
            positions: u32s(positions),
            slot_mapping: u32s(slots),
            block_tables: Tensor::from_vec(flat_tables, (prompts.len(), per_seq), &Device::Cpu).unwrap(),
            cu_seqlens_q: u32s(cu),
            seq_lens: u32s(lens),
            sample_rows: u32s(sample),
            every_row_sampled,
        };
        let logits = model.forward(&input, &cache).unwrap().to_vec2::<f32>().unwrap();
        if every_row_sampled && logprobs.len() == 1 {
            // The same step gathering its rows (it stores the same keys and values again) gives
            // the same logits.
            let gathered = StepInput { every_row_sampled: false, ..input };
            assert_eq!(model.forward(&gathered, &cache).unwrap().to_vec2::<f32>().unwrap(), logits);
        }
        let step: Vec<Vec<f32>> = logits.iter().map(|row| log_softmax(row)).collect();
        for (s, row) in step.iter().enumerate() {
            let top = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a))).unwrap();
            seqs[s].push(top as u32);
        }
        logprobs.push(step);
        rows = seqs.iter().enumerate().map(|(s, t)| (s, t.len() - 1, 1)).collect();
    }
    let generated = seqs.iter().zip(prompts).map(|(t, p)| t[p.len()..].to_vec()).collect();
    (generated, logprobs)
}

/// The GPU path's structure run on the ops' CPU bodies with the real model
/// (`LoadOptions::gpu_layout`): weights as stored, with the GEMV (norms folded in; at one and two
/// rows the one-launch norm, QKV projection, RoPE and cache writes, and gate/up with its SwiGLU;
/// the matmul past eight rows) and without it (the matmul, `qkv_rope_cache`), the residual add
/// deferred to the next norm, decode steps that skip gathering their rows (the same logits as
/// gathering them). Greedy decoding of one
/// sequence and of two together gives the CPU path's tokens, log-probabilities within 2e-3 (the
/// differences are about 6e-5: f32 sums in other orders, norms folded into the weights).
#[test]
fn the_gpu_path_on_cpu_bodies_computes_what_the_cpu_path_does() {
    let (content, _) = read_gguf(&common::model_path()).unwrap();
    let tokenizer = Tokenizer::from_gguf(&content).unwrap();
    let prompts: Vec<Vec<u32>> = common::prompts()[..2]
        .iter()
        .map(|p| tokenizer.encode(&format!("<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n"), true).unwrap())
        .collect();
    let steps = 10;
    let reference = load(false);
    let gpu = load_with(|o| {
        o.gpu_layout = true;
        o.gemv = true;
    });
    let gpu_matmul = load_with(|o| o.gpu_layout = true);
    assert!(gpu.projection_bytes() == reference.projection_bytes(), "the same f32 weights");
    // The layouts took effect: weights as stored (`Linear::Rows`) on the GPU path only.
    let rows = |m: &Llama| format!("{m:?}").contains("Linear::Rows(");
    assert!(rows(&gpu) && rows(&gpu_matmul) && !rows(&reference));
    for batch in [&prompts[..1], &prompts[..]] {
        let (want_ids, want) = greedy_steps(&reference, batch, steps);
        for (name, model) in [("gemv", &gpu), ("matmul", &gpu_matmul)] {
            let (ids, got) = greedy_steps(model, batch, steps);
            let mut worst = 0.0f32;
            for (step, (w, g)) in want.iter().zip(&got).enumerate() {
                for (seq, (w, g)) in w.iter().zip(g).enumerate() {
                    for (i, (a, b)) in w.iter().zip(g).enumerate().filter(|(_, (a, _))| **a > -10.0) {
                        let d = (a - b).abs();
                        assert!(d < 2e-3, "{name}, {} seqs, step {step}, seq {seq}: token {i} {a} vs {b}", batch.len());
                        worst = worst.max(d);
                    }
                }
            }
            assert_eq!(ids, want_ids, "{name}, {} seqs", batch.len());
            eprintln!("GPU path ({name}) on the CPU, {} seqs: largest logprob difference {worst}", batch.len());
        }
    }
}

/// One prefill step of `prompts` (raw text) on `model`, read back as `readout` asks.
fn first_step(model: Llama, prompts: &[&str], readout: Readout) -> StepLogits {
    let (content, _) = read_gguf(&common::model_path()).unwrap();
    let tokenizer = Tokenizer::from_gguf(&content).unwrap();
    let (blocks, block_size) = (64, 16);
    let mut runner = ModelRunner::new(model, blocks, block_size, DType::F32).unwrap();
    let config = SchedulerConfig { max_batch_size: 1, ..SchedulerConfig::default() };
    let mut scheduler = Scheduler::new(config, blocks, block_size);
    let now = Instant::now();
    for (i, p) in prompts.iter().enumerate() {
        let ids = tokenizer.encode(p, true).unwrap();
        scheduler.add(Sequence::new(i as u64, ids, 1, 0, now, i as u64)).unwrap();
    }
    let batch = scheduler.schedule(now + Duration::from_secs(1));
    assert_eq!(batch.seqs.iter().filter(|s| s.sample).count(), prompts.len(), "one prefill step");
    runner.execute(&batch, &scheduler, readout).unwrap()
}

fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
    row.iter().map(|x| x - lse).collect()
}

/// Candle's quantized CPU matmul multiplies the weights' blocks with activations quantized to 8
/// bits (Q8_1 for Q4_1 weights, as its CUDA kernels do), so it is not bit-exact with the dense
/// model: on the first token of 20 prompts the likely tokens' logprobs stay within int8 rounding
/// (measured: mean 0.07, largest 0.24 nats; `CpuActivations::Int8` and llama.cpp move them about as
/// much), and the greedy token changes only where the exact top two are within 0.3 (measured: two
/// changes, at margins 0.02 and 0.21).
#[test]
fn quantized_matmul_weights_compute_the_dense_model() {
    let mut prompts = vec!["The capital of France is", "def fibonacci(n):", "Once upon a time,", "1, 2, 3, 4,"];
    let questions = common::prompts();
    prompts.extend(questions.iter().map(String::as_str));
    let dense = load(false);
    let quantized = load(true);
    assert!(
        quantized.projection_bytes() * 5 < dense.projection_bytes(),
        "weights stayed quantized: {} vs {} bytes",
        quantized.projection_bytes(),
        dense.projection_bytes()
    );
    let StepLogits::Rows(want) = first_step(dense, &prompts, Readout::Logits) else { panic!("rows") };
    let StepLogits::Rows(got) = first_step(load(true), &prompts, Readout::Logits) else { panic!("rows") };
    let (mut worst, mut total, mut count) = (0.0f32, 0.0f32, 0);
    for ((p, w), g) in prompts.iter().zip(&want).zip(&got) {
        let (lw, lg) = (log_softmax(w), log_softmax(g));
        for (i, (&a, &b)) in lw.iter().zip(&lg).enumerate().filter(|(_, (&a, _))| a > -3.0) {
            let d = (a - b).abs();
            assert!(d < 0.3, "{p}: token {i} logprob {a} became {b}");
            (worst, total, count) = (worst.max(d), total + d, count + 1);
        }
        let top = |l: &[f32]| (0..l.len()).max_by(|&x, &y| l[x].total_cmp(&l[y]).then(y.cmp(&x))).unwrap();
        if top(&lw) != top(&lg) {
            let mut sorted = lw.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let margin = sorted[0] - sorted[1];
            assert!(margin < 0.3, "{p}: greedy token changed although the exact margin was {margin}");
        }
    }
    let mean = total / count as f32;
    eprintln!("QMatMul against dense f32: {count} likely tokens, mean drift {mean}, largest {worst}");
    assert!(mean < 0.1, "QMatMul drifts too far: mean {mean}, largest {worst}");
    // The device argmax over the same logits is the host's greedy choice.
    let StepLogits::Ids(ids) = first_step(quantized, &prompts, Readout::Argmax) else { panic!("ids") };
    let params = SamplingParams::default();
    let greedy = |row: &Vec<f32>| Sampler::new(&params, 0).sample(row, &params, &SampleContext::default()).token;
    let host: Vec<u32> = got.iter().map(greedy).collect();
    assert_eq!(ids, host);
}

/// The Q/K row permutation and the QKV / gate-up stacking of raw GGUF blocks give exactly the
/// weights the dense loader gives, bit for bit.
#[test]
fn gguf_blocks_hold_the_dense_weights_in_the_dense_order() {
    let (content, reader) = read_gguf(&common::model_path()).unwrap();
    let mut source = WeightSource::gguf(content, reader).unwrap();
    let layers = source.config().num_layers;
    let groups: [&[&str]; 4] = [
        &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        &["self_attn.o_proj"],
        &["mlp.gate_proj", "mlp.up_proj"],
        &["mlp.down_proj"],
    ];
    let bits = |t: &Tensor| {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect::<Vec<_>>()
    };
    for i in [0, layers / 2, layers - 1] {
        for group in groups {
            let names: Vec<String> = group.iter().map(|p| format!("model.layers.{i}.{p}.weight")).collect();
            let blocks = names.iter().map(|n| source.get_blocks(n).unwrap().expect("quantized")).collect();
            let got = QLinear::new(blocks, &Device::Cpu).unwrap().dequantized().unwrap();
            let dense: Vec<Tensor> = names.iter().map(|n| source.get(n, DType::F32, &Device::Cpu).unwrap()).collect();
            let want = Tensor::cat(&dense, 0).unwrap();
            assert_eq!(got.dims(), want.dims(), "{names:?}");
            assert!(bits(&got) == bits(&want), "{names:?}: the blocks hold other values");
        }
    }
    let head = source.get_blocks("model.embed_tokens.weight").unwrap().expect("the tied head is quantized");
    assert_eq!((head.n, head.k), (source.config().vocab_size, source.config().hidden_size));
}

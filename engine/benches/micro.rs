//! criterion micro-benchmarks of the engine's CPU-side work per step: sampling one row of logits
//! and one scheduler step over many running sequences.
//!
//! `cargo bench -p sluice-engine --bench micro`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice_engine::sampling::{SampleContext, Sampler, SamplingParams};
use sluice_engine::scheduler::{Scheduler, SchedulerConfig};
use sluice_engine::sequence::Sequence;

const VOCAB: usize = 49_152;

fn logits() -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(0);
    (0..VOCAB).map(|_| rng.random_range(-10.0f32..10.0)).collect()
}

fn sampler(c: &mut Criterion) {
    let row = logits();
    let prompt: Vec<u32> = (0..200).collect();
    let output: Vec<u32> = (500..600).collect();
    let ctx = SampleContext { prompt_tokens: &prompt, output_tokens: &output, suppress: &[], allowed: None };
    let cases = [
        ("greedy", SamplingParams::default()),
        ("greedy+logprobs5", SamplingParams { logprobs: Some(5), ..Default::default() }),
        ("temperature", SamplingParams { temperature: 0.8, seed: Some(1), ..Default::default() }),
        (
            "top_p+top_k",
            SamplingParams { temperature: 0.8, top_p: 0.9, top_k: 50, seed: Some(1), ..Default::default() },
        ),
        ("penalties", SamplingParams { repetition_penalty: 1.1, frequency_penalty: 0.5, ..Default::default() }),
    ];
    for (name, params) in cases {
        let mut s = Sampler::new(&params, 0);
        c.bench_function(&format!("sample/{name}"), |b| b.iter(|| black_box(s.sample(black_box(&row), &params, &ctx))));
    }
}

fn scheduler_step(c: &mut Criterion) {
    let config = SchedulerConfig {
        max_batch_size: 1,
        batch_timeout: Duration::ZERO,
        max_batch_tokens: 4096,
        max_num_seqs: 256,
        max_waiting: 1024,
        prefix_caching: true,
    };
    for running in [32usize, 256] {
        c.bench_function(&format!("schedule+update/{running}_decoding"), |b| {
            let t0 = Instant::now();
            let mut s = Scheduler::new(config.clone(), 100_000, 16);
            for id in 0..running as u64 {
                s.add(Sequence::new(id, vec![1; 100], 1_000_000, 0, t0, id)).unwrap();
            }
            let first = s.schedule(t0);
            let sampled: Vec<_> = first.seqs.iter().map(|q| (q.id, 7)).collect();
            s.update(&first, &sampled);
            b.iter(|| {
                let batch = s.schedule(t0);
                let sampled: Vec<_> = batch.seqs.iter().map(|q| (q.id, 7)).collect();
                s.update(&batch, &sampled);
                black_box(batch.num_tokens)
            })
        });
    }
}

criterion_group!(benches, sampler, scheduler_step);
criterion_main!(benches);

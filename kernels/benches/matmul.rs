//! `PackedLinear` in each weight format against candle's f32 `x.matmul(&w.t())`.
//!
//! `cargo bench -p sluice-kernels --bench matmul` (add `-- 576x960` to run one group; weights are
//! built only for the groups that run).
//!
//! - `KxN` groups: one projection of the default model (SmolLM2-135M) at m = 1..512 rows.
//!   Throughput is reported as elements/s where one element is one FLOP (`2·m·k·n` per call).
//!   The weight stays cache-resident between iterations, so m = 1 here is a best case.
//! - `model` group: every projection of all 30 layers plus the LM head (540 MB of f32 weights),
//!   each with its own weight, as one decode (m = 1) or batched (m = 32) step: the cost per step
//!   when weights must come from memory or L3.

use std::cell::OnceCell;
use std::hint::black_box;
use std::time::Duration;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice_kernels::matmul::QuantizedLinear;
use sluice_kernels::{PackedLinear, WeightFormat};

const FORMATS: [WeightFormat; 4] = [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Int8, WeightFormat::Int4];
/// Formats `QuantizedLinear` runs (`Int8xQ8`, `Int4xQ8`: activations quantised to int8 too).
const QUANTIZED: [WeightFormat; 2] = [WeightFormat::Int8, WeightFormat::Int4];

/// `(k, n)` of the model's projections: fused QKV, MLP gate+up, MLP down, LM head.
const SHAPES: [(usize, usize); 4] = [(576, 960), (576, 3072), (1536, 576), (576, 49152)];

/// `(k, n)` of one decoder layer's projections: fused QKV, attention output, gate+up, down.
const LAYER: [(usize, usize); 4] = [(576, 960), (576, 576), (576, 3072), (1536, 576)];
const LAYERS: usize = 30;
const LM_HEAD: (usize, usize) = (576, 49152);

/// `[rows, cols]` uniform in `[-1, 1)`.
fn random(rng: &mut StdRng, rows: usize, cols: usize) -> Tensor {
    let data: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
}

/// Random `[n, k]` weights and each one packed in every format.
struct Weights {
    /// `[n, k]` f32, as candle's matmul takes them.
    ws: Vec<Tensor>,
    /// Per format, `ws` packed.
    packed: Vec<(WeightFormat, Vec<PackedLinear>)>,
    /// Int8 and int4 with activations quantised to int8 (`QuantizedLinear`).
    quantized: Vec<(WeightFormat, Vec<QuantizedLinear>)>,
}

impl Weights {
    fn new(seed: u64, shapes: impl Iterator<Item = (usize, usize)>) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let ws: Vec<Tensor> = shapes.map(|(k, n)| random(&mut rng, n, k)).collect();
        let packed = FORMATS
            .iter()
            .map(|&f| (f, ws.iter().map(|w| PackedLinear::from_tensor(w, f).unwrap()).collect()))
            .collect();
        let quantized = QUANTIZED
            .iter()
            .map(|&f| (f, ws.iter().map(|w| QuantizedLinear::from_tensor(w, f).unwrap()).collect()))
            .collect();
        Self { ws, packed, quantized }
    }
}

/// Benchmarks `step(x_for_k)` over all of `weights` for candle and every format, at `m` rows.
fn bench_step(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    weights: &OnceCell<Weights>,
    build: impl Fn() -> Weights,
    m: usize,
    flops: usize,
) {
    let mut rng = StdRng::seed_from_u64(m as u64);
    let (x576, x1536) = (random(&mut rng, m, 576), random(&mut rng, m, 1536));
    let x = |k: usize| if k == 1536 { &x1536 } else { &x576 };
    c.throughput(Throughput::Elements((m * flops) as u64));
    c.bench_function(BenchmarkId::new("candle", m), |b| {
        let ws = &weights.get_or_init(&build).ws;
        b.iter(|| ws.iter().for_each(|w| drop(black_box(x(w.dim(1).unwrap()).matmul(&w.t().unwrap()).unwrap()))))
    });
    for (i, format) in FORMATS.iter().enumerate() {
        c.bench_function(BenchmarkId::new(format!("{format:?}"), m), |b| {
            let layers = &weights.get_or_init(&build).packed[i].1;
            b.iter(|| layers.iter().for_each(|l| drop(black_box(l.forward(x(l.in_features())).unwrap()))))
        });
    }
    for (i, format) in QUANTIZED.iter().enumerate() {
        c.bench_function(BenchmarkId::new(format!("{format:?}xQ8"), m), |b| {
            let layers = &weights.get_or_init(&build).quantized[i].1;
            b.iter(|| layers.iter().for_each(|l| drop(black_box(l.forward(x(l.in_features())).unwrap()))))
        });
    }
}

fn shapes(c: &mut Criterion) {
    for (k, n) in SHAPES {
        let weights = OnceCell::new();
        let build = || Weights::new((k * n) as u64, std::iter::once((k, n)));
        let mut group = c.benchmark_group(format!("{k}x{n}"));
        group.sample_size(10).sampling_mode(SamplingMode::Flat);
        group.warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
        for m in [1, 8, 32, 128, 512] {
            bench_step(&mut group, &weights, build, m, 2 * k * n);
        }
        group.finish();
    }
}

fn model(c: &mut Criterion) {
    let shapes = || (0..LAYERS).flat_map(|_| LAYER).chain([LM_HEAD]);
    let flops = shapes().map(|(k, n)| 2 * k * n).sum();
    let weights = OnceCell::new();
    let build = || Weights::new(1, shapes());
    let mut group = c.benchmark_group("model");
    group.sample_size(10).sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    for m in [1, 32] {
        bench_step(&mut group, &weights, build, m, flops);
    }
    group.finish();
}

criterion_group!(benches, shapes, model);
criterion_main!(benches);

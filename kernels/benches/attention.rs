//! The paged-KV ops' CPU bodies on the default model's (SmolLM2-135M) attention shapes, f32.
//!
//! `cargo bench -p sluice-kernels --bench attention`
//!
//! - `paged_attention/decode`: one decode step of 32 sequences with 280-320 tokens of context each
//!   (9 query heads, 3 KV heads, head dim 64, 16-token blocks scattered over the pool): the cost of
//!   one layer's attention per step. Throughput is in context positions read (elements).
//! - `paged_attention/decode_f16_cache`: the same step over an f16 copy of the cache (f32 queries).
//! - `paged_attention/decode_small`: 4 sequences of 300 positions, whose K/V (1.8 MB) stay in L2:
//!   the kernel's arithmetic with little memory traffic, against `decode`'s.
//! - `paged_attention/prefill`: one 256-token prompt attending causally to itself.
//! - `reshape_and_cache/decode` and `/prefill`: writing 32 (one per sequence) or 512 new tokens'
//!   keys and values into their slots.

use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sluice_kernels::{paged_attention, reshape_and_cache};

const NUM_HEADS: usize = 9;
const NUM_KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const BLOCK_SIZE: usize = 16;
const NUM_BLOCKS: usize = 1024;

/// `dims` uniform in `[-1, 1)`, f32.
fn uniform(rng: &mut StdRng, dims: &[usize]) -> Tensor {
    let n = dims.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
}

fn u32s(values: &[usize], dims: &[usize]) -> Tensor {
    let data: Vec<u32> = values.iter().map(|&v| v as u32).collect();
    Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
}

/// A full layer cache and a batch of sequences whose blocks are scattered over it.
struct Batch {
    k_cache: Tensor,
    v_cache: Tensor,
    /// `(num_seqs, max_blocks)`
    block_tables: Tensor,
    /// `(num_seqs,)`
    seq_lens: Tensor,
    /// Each sequence's blocks, for slot mappings.
    tables: Vec<Vec<usize>>,
    lens: Vec<usize>,
}

impl Batch {
    fn new(rng: &mut StdRng, lens: Vec<usize>) -> Self {
        let cache_dims = [NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM];
        let (k_cache, v_cache) = (uniform(rng, &cache_dims), uniform(rng, &cache_dims));
        let mut free: Vec<usize> = (0..NUM_BLOCKS).collect();
        free.shuffle(rng);
        let max_blocks = lens.iter().map(|l| l.div_ceil(BLOCK_SIZE)).max().unwrap_or(1);
        let tables: Vec<Vec<usize>> =
            lens.iter().map(|l| (0..l.div_ceil(BLOCK_SIZE)).map(|_| free.pop().unwrap()).collect()).collect();
        let flat: Vec<usize> =
            tables.iter().flat_map(|t| t.iter().copied().chain(std::iter::repeat(0)).take(max_blocks)).collect();
        Self {
            k_cache,
            v_cache,
            block_tables: u32s(&flat, &[lens.len(), max_blocks]),
            seq_lens: u32s(&lens, &[lens.len()]),
            tables,
            lens,
        }
    }

    /// The slot of position `pos` of sequence `s`.
    fn slot(&self, s: usize, pos: usize) -> usize {
        self.tables[s][pos / BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
    }

    /// `(num_seqs + 1,)` prefix sums of `q_lens`.
    fn cu_seqlens(q_lens: &[usize]) -> Tensor {
        let cu: Vec<usize> = std::iter::once(0)
            .chain(q_lens.iter().scan(0, |acc, &n| {
                *acc += n;
                Some(*acc)
            }))
            .collect();
        u32s(&cu, &[cu.len()])
    }
}

fn attention(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(0);
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    let mut group = c.benchmark_group("paged_attention");
    group.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));

    let lens = (0..32).map(|_| rng.random_range(280..=320)).collect();
    let decode = Batch::new(&mut rng, lens);
    let q = uniform(&mut rng, &[32, NUM_HEADS, HEAD_DIM]);
    let cu = Batch::cu_seqlens(&[1; 32]);
    group.throughput(Throughput::Elements((decode.lens.iter().sum::<usize>() * NUM_HEADS) as u64));
    group.bench_function(BenchmarkId::new("decode", "32x300"), |b| {
        b.iter(|| {
            let d = &decode;
            black_box(paged_attention(&q, &d.k_cache, &d.v_cache, &d.block_tables, &cu, &d.seq_lens, scale).unwrap())
        })
    });

    let (k16, v16) = (decode.k_cache.to_dtype(DType::F16).unwrap(), decode.v_cache.to_dtype(DType::F16).unwrap());
    group.bench_function(BenchmarkId::new("decode_f16_cache", "32x300"), |b| {
        b.iter(|| {
            let d = &decode;
            black_box(paged_attention(&q, &k16, &v16, &d.block_tables, &cu, &d.seq_lens, scale).unwrap())
        })
    });

    let small = Batch::new(&mut rng, (0..4).map(|_| 300).collect());
    let qs = uniform(&mut rng, &[4, NUM_HEADS, HEAD_DIM]);
    let cus = Batch::cu_seqlens(&[1; 4]);
    group.throughput(Throughput::Elements((small.lens.iter().sum::<usize>() * NUM_HEADS) as u64));
    group.bench_function(BenchmarkId::new("decode_small", "4x300"), |b| {
        b.iter(|| {
            let d = &small;
            black_box(paged_attention(&qs, &d.k_cache, &d.v_cache, &d.block_tables, &cus, &d.seq_lens, scale).unwrap())
        })
    });

    let prefill = Batch::new(&mut rng, vec![256]);
    let q = uniform(&mut rng, &[256, NUM_HEADS, HEAD_DIM]);
    let cu = Batch::cu_seqlens(&[256]);
    group.throughput(Throughput::Elements((256 * 257 / 2 * NUM_HEADS) as u64));
    group.bench_function(BenchmarkId::new("prefill", 256), |b| {
        b.iter(|| {
            let p = &prefill;
            black_box(paged_attention(&q, &p.k_cache, &p.v_cache, &p.block_tables, &cu, &p.seq_lens, scale).unwrap())
        })
    });
    group.finish();
}

fn cache_write(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(1);
    let mut group = c.benchmark_group("reshape_and_cache");
    group.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    let lens = (0..32).map(|_| rng.random_range(280..=320)).collect();
    let decode = Batch::new(&mut rng, lens);
    let prefill = Batch::new(&mut rng, vec![512]);
    // Decode: each sequence's newest position. Prefill: every position of the prompt.
    let cases = [
        ("decode", &decode, (0..32).map(|s| decode.slot(s, decode.lens[s] - 1)).collect::<Vec<_>>()),
        ("prefill", &prefill, (0..512).map(|p| prefill.slot(0, p)).collect()),
    ];
    for (name, batch, slots) in cases {
        let n = slots.len();
        let (k, v) = (uniform(&mut rng, &[n, NUM_KV_HEADS, HEAD_DIM]), uniform(&mut rng, &[n, NUM_KV_HEADS, HEAD_DIM]));
        let slot_mapping = u32s(&slots, &[n]);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::new(name, n), |b| {
            b.iter(|| reshape_and_cache(&k, &v, &batch.k_cache, &batch.v_cache, black_box(&slot_mapping)).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, attention, cache_write);
criterion_main!(benches);

//! Paged attention's achieved bandwidth against a plain device-to-device copy on the same device:
//! step 4 of the GPU proof (`benches/GPU.md`).
//!
//! `cargo run --release -p sluice-kernels --features cuda --example paged_attention_bench -- cuda`
//! (`-- cpu` runs small shapes as a smoke test). Times are medians over repeated calls, with the
//! device synchronised around each call, after warm-up calls.
//!
//! Bytes counted are the fewest the op must move: each sequence's keys and values once per kv head
//! (the heads of a GQA group share them), plus `q` and the output. A kernel that re-reads a row per
//! query head gets those re-reads from L2 at best, which is why the ratio to the copy can pass 1 for
//! small batches that fit in L2.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use sluice_kernels::{paged_attention, paged_attention_per_head};

/// One measured shape: `batch` sequences, each `q_len` new rows over a `context`-long context.
#[derive(Clone, Copy, Debug)]
struct Shape {
    batch: usize,
    q_len: usize,
    context: usize,
}

/// Llama-3.2-1B's attention: 32 query heads, 8 kv heads, head_dim 64; 16-token blocks; bf16.
const NUM_HEADS: usize = 32;
const NUM_KV_HEADS: usize = 8;
const HEAD_DIM: usize = 64;
const BLOCK_SIZE: usize = 16;

fn main() -> Result<()> {
    let on_gpu = std::env::args().nth(1).as_deref() != Some("cpu");
    let (dev, dtype) = if on_gpu { (Device::new_cuda(0)?, DType::BF16) } else { (Device::Cpu, DType::F32) };
    let shapes: &[Shape] = if on_gpu {
        &[
            Shape { batch: 1, q_len: 1, context: 256 },
            Shape { batch: 1, q_len: 1, context: 2048 },
            Shape { batch: 64, q_len: 1, context: 2048 },
            Shape { batch: 256, q_len: 1, context: 1024 },
            Shape { batch: 256, q_len: 1, context: 4096 },
            Shape { batch: 1, q_len: 512, context: 512 },
        ]
    } else {
        &[Shape { batch: 4, q_len: 1, context: 256 }, Shape { batch: 1, q_len: 32, context: 64 }]
    };
    let copy_gbs = copy_bandwidth(&dev, dtype, if on_gpu { 1 << 30 } else { 1 << 24 })?;
    println!("device {dev:?}, dtype {dtype:?}: device-to-device copy {copy_gbs:.0} GB/s (bytes read + written)");
    println!(
        "{:>9} {:>6} {:>6} {:>8} {:>10} {:>10} {:>8}",
        "kernel", "batch", "q_len", "context", "median_us", "GB/s", "of_copy"
    );
    for &shape in shapes {
        for per_head in [false, true] {
            let (secs, bytes) = time_attention(&dev, dtype, shape, per_head)?;
            let gbs = bytes as f64 / secs / 1e9;
            println!(
                "{:>9} {:>6} {:>6} {:>8} {:>10.1} {:>10.0} {:>7.0}%",
                if per_head { "per-head" } else { "default" },
                shape.batch,
                shape.q_len,
                shape.context,
                secs * 1e6,
                gbs,
                100.0 * gbs / copy_gbs
            );
        }
    }
    Ok(())
}

/// Median seconds of `f` over `reps` calls after three warm-up calls, synchronising around each.
fn median_secs(dev: &Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        dev.synchronize()?;
        let start = Instant::now();
        f()?;
        dev.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[reps / 2])
}

/// GB/s of copying `bytes` of random data into an existing buffer, counting bytes read plus bytes
/// written: a device-to-device `memcpy` on CUDA (no allocation inside the timed call).
fn copy_bandwidth(dev: &Device, dtype: DType, bytes: usize) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = dev {
        let host: Vec<u8> = (0..bytes).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let src = cuda.clone_htod(&host)?;
        let mut dst = cuda.alloc_zeros::<u8>(bytes)?;
        let secs = median_secs(dev, 20, || cuda.memcpy_dtod(&src, &mut dst))?;
        return Ok(2.0 * bytes as f64 / secs / 1e9);
    }
    // The CPU smoke test: a tensor copy, allocation included.
    let src = Tensor::rand(-1f32, 1f32, bytes / dtype.size_in_bytes(), dev)?.to_dtype(dtype)?;
    let secs = median_secs(dev, 20, || src.copy().map(drop))?;
    Ok(2.0 * bytes as f64 / secs / 1e9)
}

/// Median seconds of one `paged_attention` call for `shape` (the per-head CUDA kernel if asked,
/// else the one `paged_attention` picks: grouped for this GQA shape), and the bytes it must move.
fn time_attention(dev: &Device, dtype: DType, shape: Shape, per_head: bool) -> Result<(f64, usize)> {
    let Shape { batch, q_len, context } = shape;
    let blocks_per_seq = context.div_ceil(BLOCK_SIZE);
    let num_blocks = batch * blocks_per_seq;
    let cache_dims = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM);
    let k_cache = Tensor::rand(-1f32, 1f32, cache_dims, dev)?.to_dtype(dtype)?;
    let v_cache = Tensor::rand(-1f32, 1f32, cache_dims, dev)?.to_dtype(dtype)?;
    let q = Tensor::rand(-1f32, 1f32, (batch * q_len, NUM_HEADS, HEAD_DIM), dev)?.to_dtype(dtype)?;
    // Blocks in a shuffled order, as a long-running pool hands them out.
    let mut blocks: Vec<u32> = (0..num_blocks as u32).collect();
    blocks.shuffle(&mut StdRng::seed_from_u64(0));
    let block_tables = Tensor::from_vec(blocks, (batch, blocks_per_seq), dev)?;
    let cu: Vec<u32> = (0..=batch).map(|s| (s * q_len) as u32).collect();
    let cu_seqlens_q = Tensor::new(cu, dev)?;
    let seq_lens = Tensor::new(vec![context as u32; batch], dev)?;
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    let op = if per_head { paged_attention_per_head } else { paged_attention };
    let secs =
        median_secs(dev, 50, || op(&q, &k_cache, &v_cache, &block_tables, &cu_seqlens_q, &seq_lens, scale).map(drop))?;
    let elem = dtype.size_in_bytes();
    let kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * elem;
    let q_out_bytes = 2 * q.elem_count() * elem;
    Ok((secs, kv_bytes + q_out_bytes))
}

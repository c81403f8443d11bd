//! Small-batch projections: Sluice's `gemv` against candle's matmul (cuBLAS on CUDA) on the
//! decode step's shapes, next to a device-to-device copy on the same device.
//!
//! `cargo run --release -p sluice-kernels --features cuda --example gemv_bench -- cuda`
//! (`-- cpu` runs a small shape as a smoke test). Each time is the median over rounds of
//! `CALLS` back-to-back calls between two synchronisations, divided by `CALLS`, after warm-up;
//! the calls rotate over enough copies of the weight to pass 256 MB, so each reads its weight from
//! device memory, not from L2 (50 MB on an H100), as a decode step does.
//!
//! Bytes counted: the weight once, plus `x` and `y`. `gate_up+act` is the MLP's gate/up projection
//! with its SwiGLU as the engine runs it: `gemv_with(.., Epilogue::Swiglu)` (one launch) against the
//! matmul then `fused::swiglu`; the plain `gate_up` line beside it shows what the fusion costs or
//! saves. The last lines add up one decode step's projections of the random 1B Llama of the GPU
//! proof (16 layers and the LM head) at each row count, both ways.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use sluice_kernels::fused::swiglu;
use sluice_kernels::gemv::{gemv_with, Epilogue};

/// Llama-3.2-1B's projections (with SmolLM2's 49,152-token vocabulary): (name, out, in, per step,
/// epilogue). The plain `gate_up` is for comparison only (the step runs `gate_up+act`).
const SHAPES: [(&str, usize, usize, usize, Epilogue); 6] = [
    ("qkv", 3072, 2048, 16, Epilogue::Store),
    ("o", 2048, 2048, 16, Epilogue::Store),
    ("gate_up", 16384, 2048, 0, Epilogue::Store),
    ("gate_up+act", 16384, 2048, 16, Epilogue::Swiglu),
    ("down", 2048, 8192, 16, Epilogue::Store),
    ("lm_head", 49152, 2048, 1, Epilogue::Store),
];
/// Calls between two synchronisations.
const CALLS: usize = 50;
/// Rounds timed; the median is kept.
const ROUNDS: usize = 15;

fn main() -> Result<()> {
    let on_gpu = std::env::args().nth(1).as_deref() != Some("cpu");
    let (dev, dtype) = if on_gpu { (Device::new_cuda(0)?, DType::BF16) } else { (Device::Cpu, DType::F32) };
    let shapes: Vec<(&str, usize, usize, usize, Epilogue)> = if on_gpu {
        SHAPES.to_vec()
    } else {
        vec![("small", 256, 512, 1, Epilogue::Store), ("small+act", 256, 512, 1, Epilogue::Swiglu)]
    };
    let rows: &[usize] = if on_gpu { &[1, 2, 4, 8] } else { &[1, 8] };
    let copy_gbs = copy_bandwidth(&dev, if on_gpu { 1 << 30 } else { 1 << 24 })?;
    println!("device {dev:?}, dtype {dtype:?}: device-to-device copy {copy_gbs:.0} GB/s (bytes read + written)");
    println!(
        "{:>11} {:>6} {:>6} {:>4} {:>10} {:>10} {:>8} {:>10} {:>8} {:>7}",
        "shape", "out", "in", "rows", "gemv_us", "GB/s", "of_copy", "matmul_us", "of_copy", "speedup"
    );
    // Per row count: (gemv, matmul) seconds of one step's projections.
    let mut step = vec![(0.0f64, 0.0f64); rows.len()];
    for &(name, n, k, per_step, epilogue) in &shapes {
        let weights = weight_copies(&dev, dtype, n, k)?;
        let out = if epilogue == Epilogue::Swiglu { n / 2 } else { n };
        for (i, &m) in rows.iter().enumerate() {
            let x = Tensor::rand(-1f32, 1f32, (m, k), &dev)?.to_dtype(dtype)?;
            let t_gemv = time_calls(&dev, &weights, |w| gemv_with(&x, w, epilogue))?;
            let t_mm = time_calls(&dev, &weights, |w| match epilogue {
                Epilogue::Store => x.matmul(&w.t()?),
                Epilogue::Swiglu => swiglu(&x.matmul(&w.t()?)?),
            })?;
            let bytes = (n * k + m * k + m * out) * dtype.size_in_bytes();
            let (g_gbs, m_gbs) = (bytes as f64 / t_gemv / 1e9, bytes as f64 / t_mm / 1e9);
            println!(
                "{name:>11} {n:>6} {k:>6} {m:>4} {:>10.1} {g_gbs:>10.0} {:>7.0}% {:>10.1} {:>7.0}% {:>6.2}x",
                t_gemv * 1e6,
                100.0 * g_gbs / copy_gbs,
                t_mm * 1e6,
                100.0 * m_gbs / copy_gbs,
                t_mm / t_gemv
            );
            step[i].0 += per_step as f64 * t_gemv;
            step[i].1 += per_step as f64 * t_mm;
        }
    }
    if on_gpu {
        let bytes: usize = shapes.iter().map(|&(_, n, k, c, _)| c * n * k * dtype.size_in_bytes()).sum();
        let floor = bytes as f64 / (copy_gbs * 1e9);
        println!(
            "one decode step's projections ({:.2} GB; at the copy's rate {:.3} ms):",
            bytes as f64 / 1e9,
            floor * 1e3
        );
        for (&m, &(g, mm)) in rows.iter().zip(&step) {
            println!(
                "  {m} rows: gemv {:.3} ms ({:.0}% of the copy's rate), matmul {:.3} ms ({:.0}%)",
                g * 1e3,
                100.0 * floor / g,
                mm * 1e3,
                100.0 * floor / mm
            );
        }
    }
    Ok(())
}

/// Enough random `(n, k)` weights (at least two) to pass 256 MB together on a GPU, so that a call
/// finds its weight out of L2; one on the CPU.
fn weight_copies(dev: &Device, dtype: DType, n: usize, k: usize) -> Result<Vec<Tensor>> {
    let bytes = n * k * dtype.size_in_bytes();
    let copies = if dev.is_cpu() { 1 } else { (256usize << 20).div_ceil(bytes).max(2) };
    (0..copies).map(|_| Tensor::rand(-1f32, 1f32, (n, k), dev)?.to_dtype(dtype)).collect()
}

/// Seconds per call of `f`, cycling over `weights`: the median over `ROUNDS` rounds of `CALLS`
/// calls between synchronisations, after a warm-up round.
fn time_calls(dev: &Device, weights: &[Tensor], f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<f64> {
    let mut next = 0;
    let mut round = || -> Result<f64> {
        dev.synchronize()?;
        let start = Instant::now();
        for _ in 0..CALLS {
            drop(f(&weights[next % weights.len()])?);
            next += 1;
        }
        dev.synchronize()?;
        Ok(start.elapsed().as_secs_f64() / CALLS as f64)
    };
    round()?;
    let mut times = (0..ROUNDS).map(|_| round()).collect::<Result<Vec<_>>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[ROUNDS / 2])
}

/// GB/s of copying `bytes` into an existing buffer, counting bytes read plus bytes written.
fn copy_bandwidth(dev: &Device, bytes: usize) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = dev {
        let host: Vec<u8> = (0..bytes).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let src = cuda.clone_htod(&host)?;
        let mut dst = cuda.alloc_zeros::<u8>(bytes)?;
        let mut times = Vec::new();
        for _ in 0..21 {
            dev.synchronize()?;
            let start = Instant::now();
            cuda.memcpy_dtod(&src, &mut dst)?;
            dev.synchronize()?;
            times.push(start.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        return Ok(2.0 * bytes as f64 / times[10] / 1e9);
    }
    let src = Tensor::rand(-1f32, 1f32, bytes / 4, dev)?;
    let start = Instant::now();
    drop(src.copy()?);
    Ok(2.0 * bytes as f64 / start.elapsed().as_secs_f64() / 1e9)
}

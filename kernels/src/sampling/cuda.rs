//! The CUDA body of `top_candidates`: launches `kernels/cuda/sampling.cu`, one block per row.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaStorage, DType, Layout, Shape};

use super::MAX_CANDIDATES;
use crate::cuda::{contiguous_view, load, to_u32, SAMPLING};

/// Threads per block; must equal `kThreads` in `sampling.cu`.
const THREADS: u32 = 512;
/// Threads per block of `argmax_rows`; must equal `kArgmaxThreads` in `sampling.cu`.
const ARGMAX_THREADS: u32 = 1024;

pub(super) fn argmax_rows((logits, logits_l): (&CudaStorage, &Layout)) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = logits.device().clone();
    let (rows, vocab) = logits_l.shape().dims2()?;
    let x = contiguous_view::<f32>(logits, logits_l, "logits")?;
    if x.len() != rows * vocab {
        bail!("argmax_rows: {} logits for {rows} rows of {vocab}", x.len())
    }
    // SAFETY: each row's block writes its id before anything reads it; the spare element of an
    // empty output lies outside its shape.
    let mut out = unsafe { dev.alloc::<u32>(rows.max(1))? };
    if rows > 0 {
        let func = load(&dev, &SAMPLING, "argmax_rows", DType::F32)?;
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        let vocab = to_u32(vocab, "vocab")?;
        builder.arg(&x).arg(&mut out).arg(&vocab);
        let cfg = LaunchConfig {
            grid_dim: (to_u32(rows, "rows")?, 1, 1),
            block_dim: (ARGMAX_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `argmax_rows_f32` in `sampling.cu` (the f32 input of
        // rows * vocab elements, the u32 output of rows, vocab as u32); one block per row.
        unsafe { builder.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(rows)))
}

pub(super) fn top_candidates(
    k: usize,
    (logits, logits_l): (&CudaStorage, &Layout),
    (inv_temps, inv_temps_l): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = logits.device().clone();
    let (rows, vocab) = logits_l.shape().dims2()?;
    let x = contiguous_view::<f32>(logits, logits_l, "logits")?;
    let t = contiguous_view::<f32>(inv_temps, inv_temps_l, "inv_temps")?;
    // The public function checked these; the kernel's shared arrays rely on them.
    if k == 0 || k > MAX_CANDIDATES || k > vocab || x.len() != rows * vocab || t.len() != rows {
        bail!("top_candidates: k = {k} for {rows} rows of {vocab}")
    }
    let len = rows * (2 * k + 2);
    // SAFETY: each row's block writes all `2k + 2` of its outputs before anything reads them; the
    // spare element of an empty output lies outside its shape.
    let mut out = unsafe { dev.alloc::<f32>(len.max(1))? };
    if rows > 0 {
        let func = load(&dev, &SAMPLING, "top_candidates", DType::F32)?;
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        let (vocab, k32) = (to_u32(vocab, "vocab")?, to_u32(k, "k")?);
        builder.arg(&x).arg(&t).arg(&mut out).arg(&vocab).arg(&k32);
        let cfg =
            LaunchConfig { grid_dim: (to_u32(rows, "rows")?, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments match `top_candidates_f32` in `sampling.cu` (two f32 inputs of
        // rows * vocab and rows elements, the f32 output of rows * (2k + 2), vocab and k as u32),
        // with 1 <= k <= min(vocab, 256) as the kernel's shared arrays need.
        unsafe { builder.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((rows, 2 * k + 2))))
}

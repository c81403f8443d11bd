//! The CUDA body of `reshape_and_cache`: launches `kernels/cuda/reshape_and_cache.cu`.
//!
//! It compiles in CI, and `cache::tests` checks it bit for bit wherever a GPU is present
//! (`benches/GPU.md`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout};

use super::check_slots;
use crate::cuda::{capturing, contiguous_view, load, to_u32, RESHAPE_AND_CACHE};

/// Threads per token; each copies every 128th element of the token's row.
const THREADS: u32 = 128;

/// Writes row `i` of `src` (`(num_tokens, num_kv_heads, head_dim)`, last stride 1) into slot
/// `slots[i]` of `cache` (`(num_blocks, block_size, num_kv_heads, head_dim)`, contiguous).
pub(super) fn scatter(
    what: &str,
    cache: (&mut CudaStorage, &Layout),
    src: (&CudaStorage, &Layout),
    slots: (&CudaStorage, &Layout),
) -> candle_core::Result<()> {
    match (cache.0.dtype(), src.0.dtype()) {
        (DType::F32, DType::F32) => run::<f32>(what, cache, src, slots),
        (DType::F16, DType::F16) => run::<half::f16>(what, cache, src, slots),
        (DType::BF16, DType::BF16) => run::<half::bf16>(what, cache, src, slots),
        (c, s) => bail!("`{what}` has dtype {s:?} but the cache holds {c:?}"),
    }
}

/// Checks the layouts against the storages, then launches `reshape_and_cache_<T>`.
fn run<T: CudaDType + DeviceRepr>(
    what: &str,
    (cache, cache_l): (&mut CudaStorage, &Layout),
    (src, src_l): (&CudaStorage, &Layout),
    (slots, slots_l): (&CudaStorage, &Layout),
) -> candle_core::Result<()> {
    let (dev, dtype) = (cache.device().clone(), cache.dtype());
    let (&[num_blocks, block_size, num_kv_heads, head_dim], &[token_stride, head_stride, 1]) =
        (cache_l.dims(), src_l.stride())
    else {
        bail!("`{what}`: unexpected layouts {cache_l:?} and {src_l:?}")
    };
    let num_slots = num_blocks * block_size;
    let slots = contiguous_view::<u32>(slots, slots_l, "slot_mapping")?;
    let num_tokens = slots.len();
    if num_tokens == 0 || num_kv_heads * head_dim == 0 {
        return Ok(());
    }
    // Reading the slots back waits for the GPU, so only debug builds do it; the kernel skips an
    // out-of-range slot in any build. A graph capture cannot read back either.
    if cfg!(debug_assertions) && !capturing(&dev) {
        check_slots(&dev.clone_dtoh(&slots)?, num_slots)?;
    }
    // The last element the kernel reads must lie inside `src`'s storage.
    let src_all = src.as_cuda_slice::<T>()?;
    let last = (num_tokens - 1) * token_stride + (num_kv_heads - 1) * head_stride + head_dim;
    let Some(src_view) = src_all.try_slice(src_l.start_offset()..src_l.start_offset() + last) else {
        bail!("`{what}`: layout runs past its storage")
    };
    let Some((start, end)) = cache_l.contiguous_offsets() else { bail!("the `{what}` cache must be contiguous") };
    let Some(mut cache_view) = cache.as_cuda_slice_mut::<T>()?.try_slice_mut(start..end) else {
        bail!("the `{what}` cache layout runs past its storage")
    };

    let func = load(&dev, &RESHAPE_AND_CACHE, "reshape_and_cache", dtype)?;
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    let (num_kv_heads, head_dim) = (to_u32(num_kv_heads, "num_kv_heads")?, to_u32(head_dim, "head_dim")?);
    builder.arg(&mut cache_view).arg(&src_view).arg(&slots);
    builder.arg(&num_slots).arg(&num_kv_heads).arg(&head_dim).arg(&token_stride).arg(&head_stride);
    let cfg = LaunchConfig {
        grid_dim: (to_u32(num_tokens, "num_tokens")?, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match `reshape_and_cache_<T>` in `reshape_and_cache.cu` (a `T*`, a
    // `const T*`, a `const uint32_t*`, then size_t, u32, u32, size_t, size_t). `cache_view` holds
    // exactly `num_slots` rows of `num_kv_heads * head_dim` and the kernel skips any slot past
    // `num_slots`; `src_view` ends at the last element the strides reach (checked above); one block
    // per token of `slots`.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(())
}

//! The CUDA side of the ops (`cuda` feature): the PTX that `build.rs` compiles from
//! `kernels/cuda/*.cu`, and the helpers each op's `cuda_fwd` shares.
//!
//! Kernels are named `<op>_<dtype>` and loaded once per device through candle's
//! [`CudaDevice::get_or_load_custom_func`], which caches the module.
//!
//! CI compiles this with `make check-cuda` (no GPU there); the tests that compare it with the CPU
//! bodies run on a GPU through `scripts/gpu-proof.sh` (`benches/GPU.md`: passed on an H200).

use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{bail, CudaDevice, DType, Layout, Storage, Tensor};

/// One PTX module embedded in the crate.
pub(crate) struct Module {
    /// The key of candle's per-device module cache; unique across crates.
    name: &'static str,
    ptx: &'static str,
}

/// `kernels/cuda/reshape_and_cache.cu`.
pub(crate) const RESHAPE_AND_CACHE: Module =
    Module { name: "sluice_reshape_and_cache", ptx: include_str!(concat!(env!("OUT_DIR"), "/reshape_and_cache.ptx")) };

/// `kernels/cuda/paged_attention.cu`.
pub(crate) const PAGED_ATTENTION: Module =
    Module { name: "sluice_paged_attention", ptx: include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx")) };

/// `kernels/cuda/fused.cu`.
pub(crate) const FUSED: Module =
    Module { name: "sluice_fused", ptx: include_str!(concat!(env!("OUT_DIR"), "/fused.ptx")) };

/// `kernels/cuda/sampling.cu`.
pub(crate) const SAMPLING: Module =
    Module { name: "sluice_sampling", ptx: include_str!(concat!(env!("OUT_DIR"), "/sampling.ptx")) };

/// `kernels/cuda/gemv.cu`.
pub(crate) const GEMV: Module =
    Module { name: "sluice_gemv", ptx: include_str!(concat!(env!("OUT_DIR"), "/gemv.ptx")) };

/// Loads kernel `<op>_<dtype>` of `module` on `dev` (compiled by the driver on first use).
pub(crate) fn load(
    dev: &CudaDevice,
    module: &Module,
    op: &str,
    dtype: DType,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaFunction> {
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("{op}: no CUDA kernel for dtype {other:?}"),
    };
    Ok(dev.get_or_load_custom_func(&format!("{op}_{suffix}"), module.name, module.ptx)?.into_cuda_function())
}

/// The CUDA storage behind `storage`, or an error naming `what` when it lives elsewhere.
pub(crate) fn cuda<'a>(storage: &'a Storage, what: &str) -> candle_core::Result<&'a CudaStorage> {
    match storage {
        Storage::Cuda(s) => Ok(s),
        _ => bail!("`{what}` must be on the same CUDA device as the op's first operand"),
    }
}

/// The storage and layout of a tensor an op holds (beside its operands), or an error naming `what`
/// when it is not on a GPU; `cuda` and `contiguous_view` then give its elements.
pub(crate) fn held<'a>(
    t: &'a Tensor,
    what: &str,
) -> candle_core::Result<(impl std::ops::Deref<Target = Storage> + 'a, Layout)> {
    let (s, l) = t.storage_and_layout();
    if !matches!(&*s, Storage::Cuda(_)) {
        bail!("`{what}` is not on the GPU")
    }
    Ok((s, l.clone()))
}

/// The elements of a contiguous tensor as a device view, with its start offset applied.
pub(crate) fn contiguous_view<'a, T: CudaDType + DeviceRepr>(
    storage: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("`{what}` must be contiguous") };
    match storage.as_cuda_slice::<T>()?.try_slice(start..end) {
        Some(view) => Ok(view),
        None => bail!("`{what}`: layout runs past its storage"),
    }
}

/// Whether `dev`'s stream is recording a CUDA graph: then nothing may be read back to the host,
/// so the debug builds' value checks are skipped (the kernels bound their indices in any build).
pub(crate) fn capturing(dev: &CudaDevice) -> bool {
    use candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus;
    !matches!(dev.cuda_stream().capture_status(), Ok(CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE))
}

/// `n` as the `uint32_t` a kernel takes, or an error naming `what`.
pub(crate) fn to_u32(n: usize, what: &str) -> candle_core::Result<u32> {
    match u32::try_from(n) {
        Ok(n) => Ok(n),
        Err(_) => bail!("`{what}` = {n} is too large for the CUDA kernels (at most {})", u32::MAX),
    }
}

/// In debug builds, that every position is inside the rotary tables and every slot a cache slot
/// or the padding slot. Reading back waits for the GPU, so only debug builds check the values (and
/// not while a graph is captured); the kernels bound both in any build.
pub(crate) fn check_positions_and_slots(
    dev: &CudaDevice,
    positions: &CudaView<'_, u32>,
    slots: &CudaView<'_, u32>,
    max_positions: usize,
    num_slots: usize,
) -> candle_core::Result<()> {
    if cfg!(debug_assertions) && !capturing(dev) && !positions.is_empty() {
        if let Some((i, p)) =
            dev.clone_dtoh(positions)?.into_iter().enumerate().find(|&(_, p)| p as usize >= max_positions)
        {
            bail!("`positions[{i}]` = {p} is past the rotary tables' {max_positions} positions")
        }
        crate::cache::check_slots(&dev.clone_dtoh(slots)?, num_slots)?;
    }
    Ok(())
}

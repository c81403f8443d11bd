//! Borrowing a tensor's CPU storage as a typed slice.

use candle_core::{bail, CpuStorage, Layout, Storage, WithDType};

/// The CPU storage behind `storage`, or an error naming `what` when it lives on another device.
pub(crate) fn cpu<'a>(storage: &'a Storage, what: &str) -> candle_core::Result<&'a CpuStorage> {
    match storage {
        Storage::Cpu(s) => Ok(s),
        _ => bail!("`{what}` must be on the same device as `q` (CPU)"),
    }
}

/// The elements of a contiguous tensor, in row-major order, with its start offset applied.
pub(crate) fn contiguous_slice<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("`{what}` must be contiguous") };
    let all = storage.as_slice::<T>()?;
    match all.get(start..end) {
        Some(s) => Ok(s),
        None => bail!("`{what}`: layout runs past its storage"),
    }
}

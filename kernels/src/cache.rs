//! `reshape_and_cache`: scatter this step's keys and values into their paged-cache slots.
//!
//! The same op as vLLM's `reshape_and_cache` (`csrc/cache_kernels.cu`), without the
//! padding-slot convention: every token here has a real slot.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, InplaceOp3, Layout, Tensor};

use crate::storage::contiguous_slice;

/// Writes each token's key and value into its slot of the layer's caches, in place.
///
/// - `key`, `value`: `(num_tokens, num_kv_heads, head_dim)`, the cache's dtype; any strides.
/// - `key_cache`, `value_cache`: `(num_blocks, block_size, num_kv_heads, head_dim)`, contiguous,
///   f32, f16 or bf16, same shape and dtype.
/// - `slot_mapping`: `(num_tokens,)` U32; token `i` goes to slot `slot_mapping[i]`, where a slot is
///   `block * block_size + offset`. Slots should be distinct; if one repeats, the later token wins.
///
/// All tensors must be on one device. Every slot is checked against `num_blocks * block_size`
/// before anything is written, so an error leaves both caches untouched.
pub fn reshape_and_cache(
    key: &Tensor,
    value: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    slot_mapping: &Tensor,
) -> candle_core::Result<()> {
    check_cache_pair(key_cache, value_cache)?;
    let (_, _, num_kv_heads, head_dim) = key_cache.dims4()?;
    let expected = [slot_mapping.elem_count(), num_kv_heads, head_dim];
    for (name, t) in [("key", key), ("value", value)] {
        if t.dims() != expected {
            bail!(
                "`{name}` must have shape (num_tokens, num_kv_heads, head_dim) = {expected:?}, got {:?}",
                t.dims()
            )
        }
        if t.dtype() != key_cache.dtype() {
            bail!(
                "`{name}` has dtype {:?} but the cache holds {:?}",
                t.dtype(),
                key_cache.dtype()
            )
        }
        if !t.device().same_device(key_cache.device()) {
            bail!("`{name}` must be on the cache's device")
        }
    }
    if slot_mapping.rank() != 1 || slot_mapping.dtype() != DType::U32 {
        bail!(
            "`slot_mapping` must be a (num_tokens,) U32 tensor, got {:?} {:?}",
            slot_mapping.dims(),
            slot_mapping.dtype()
        )
    }
    if !slot_mapping.device().same_device(key_cache.device()) {
        bail!("`slot_mapping` must be on the cache's device")
    }
    if slot_mapping.elem_count() == 0 {
        return Ok(());
    }
    let slot_mapping = slot_mapping.contiguous()?;
    // Keys and values often arrive as views into a fused QKV projection; only the innermost
    // `head_dim` has to be contiguous for the kernel, so copy only when it is not.
    let key = rows_contiguous(key)?;
    let value = rows_contiguous(value)?;
    key_cache.inplace_op3(&key, &slot_mapping, &ReshapeAndCache { what: "key" })?;
    value_cache.inplace_op3(&value, &slot_mapping, &ReshapeAndCache { what: "value" })
}

/// Checks that the key and value pools of a layer agree and have the paged-cache layout.
pub(crate) fn check_cache_pair(key_cache: &Tensor, value_cache: &Tensor) -> candle_core::Result<()> {
    if key_cache.rank() != 4 {
        bail!(
            "`key_cache` must have shape (num_blocks, block_size, num_kv_heads, head_dim), got {:?}",
            key_cache.dims()
        )
    }
    if value_cache.dims() != key_cache.dims() || value_cache.dtype() != key_cache.dtype() {
        bail!(
            "`value_cache` ({:?} {:?}) must match `key_cache` ({:?} {:?})",
            value_cache.dims(),
            value_cache.dtype(),
            key_cache.dims(),
            key_cache.dtype()
        )
    }
    if !matches!(key_cache.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        bail!("the cache dtype must be f32, f16 or bf16, got {:?}", key_cache.dtype())
    }
    if !key_cache.is_contiguous() || !value_cache.is_contiguous() {
        bail!("`key_cache` and `value_cache` must be contiguous")
    }
    if !value_cache.device().same_device(key_cache.device()) {
        bail!("`key_cache` and `value_cache` must be on one device")
    }
    Ok(())
}

/// `t` itself when its last dimension has stride 1, else a contiguous copy.
fn rows_contiguous(t: &Tensor) -> candle_core::Result<Tensor> {
    if t.stride().last() == Some(&1) {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// The in-place op on one cache pool; its two sources are the new rows and the slot mapping.
struct ReshapeAndCache {
    /// "key" or "value", for error messages.
    what: &'static str,
}

impl InplaceOp3 for ReshapeAndCache {
    fn name(&self) -> &'static str {
        "reshape-and-cache"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cache_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
        slots: &CpuStorage,
        slots_l: &Layout,
    ) -> candle_core::Result<()> {
        let slots = contiguous_slice::<u32>(slots, slots_l, "slot_mapping")?;
        let what = self.what;
        match (cache, src) {
            (CpuStorage::F32(c), CpuStorage::F32(s)) => scatter(c, cache_l, s, src_l, slots, what),
            (CpuStorage::F16(c), CpuStorage::F16(s)) => scatter(c, cache_l, s, src_l, slots, what),
            (CpuStorage::BF16(c), CpuStorage::BF16(s)) => scatter(c, cache_l, s, src_l, slots, what),
            (c, s) => bail!(
                "`{what}` has dtype {:?} but the cache holds {:?}",
                s.dtype(),
                c.dtype()
            ),
        }
    }
}

/// Copies row `i` of `src` (`(num_tokens, num_kv_heads, head_dim)`, last stride 1) into slot
/// `slots[i]` of `cache` (`(num_blocks, block_size, num_kv_heads, head_dim)`, contiguous).
fn scatter<T: Copy>(
    cache: &mut [T],
    cache_l: &Layout,
    src: &[T],
    src_l: &Layout,
    slots: &[u32],
    what: &str,
) -> candle_core::Result<()> {
    let Some((start, end)) = cache_l.contiguous_offsets() else {
        bail!("the `{what}` cache must be contiguous")
    };
    let Some(cache) = cache.get_mut(start..end) else {
        bail!("the `{what}` cache layout runs past its storage")
    };
    let (&[num_blocks, block_size, num_kv_heads, head_dim], &[tok_stride, head_stride, 1]) =
        (cache_l.dims(), src_l.stride())
    else {
        bail!("`{what}`: unexpected layouts {cache_l:?} and {src_l:?}")
    };
    let num_slots = num_blocks * block_size;
    if let Some((i, slot)) = slots.iter().enumerate().find(|(_, &s)| s as usize >= num_slots) {
        bail!("`slot_mapping[{i}]` = {slot} is out of range: the cache has {num_slots} slots")
    }
    let row = num_kv_heads * head_dim;
    // (num_slots, num_kv_heads * head_dim)
    for (i, &slot) in slots.iter().enumerate() {
        let dst = &mut cache[slot as usize * row..][..row];
        for (h, dst) in dst.chunks_exact_mut(head_dim).enumerate() {
            let from = src_l.start_offset() + i * tok_stride + h * head_stride;
            match src.get(from..from + head_dim) {
                Some(s) => dst.copy_from_slice(s),
                None => bail!("`{what}`: layout runs past its storage"),
            }
        }
    }
    Ok(())
}

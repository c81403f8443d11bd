//! `reshape_and_cache`: scatter this step's keys and values into their paged-cache slots.
//!
//! The same op as vLLM's `reshape_and_cache` (`csrc/cache_kernels.cu`), with its padding-slot
//! convention: a token whose slot is [`PAD_SLOT`] is not written (the padding rows of a decode
//! step run at a fixed batch size, as a CUDA graph replays it).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, InplaceOp3, Layout, Tensor};

use crate::storage::contiguous_slice;

#[cfg(feature = "cuda")]
mod cuda;

/// The slot of a token whose key and value are not to be stored (vLLM's `-1` as a `u32`).
pub const PAD_SLOT: u32 = u32::MAX;

/// Writes each token's key and value into its slot of the layer's caches, in place.
///
/// - `key`, `value`: `(num_tokens, num_kv_heads, head_dim)`, the cache's dtype; any strides.
/// - `key_cache`, `value_cache`: `(num_blocks, block_size, num_kv_heads, head_dim)`, contiguous,
///   f32, f16 or bf16, same shape and dtype.
/// - `slot_mapping`: `(num_tokens,)` U32; token `i` goes to slot `slot_mapping[i]`, where a slot is
///   `block * block_size + offset`, or nowhere when it is [`PAD_SLOT`]. Slots should be distinct;
///   if one repeats, the later token wins (on CUDA, either may).
///
/// All tensors must be on one device. Every slot is checked against `num_blocks * block_size`
/// before anything is written, so an error leaves both caches untouched. On CUDA that check reads
/// the slots back to the host, which waits for the GPU, so only debug builds run it; a release
/// build skips an out-of-range slot without an error (and never writes outside the cache).
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
            bail!("`{name}` must have shape (num_tokens, num_kv_heads, head_dim) = {expected:?}, got {:?}", t.dims())
        }
        if t.dtype() != key_cache.dtype() {
            bail!("`{name}` has dtype {:?} but the cache holds {:?}", t.dtype(), key_cache.dtype())
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
            (c, s) => bail!("`{what}` has dtype {:?} but the cache holds {:?}", s.dtype(), c.dtype()),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        cache_l: &Layout,
        src: &candle_core::CudaStorage,
        src_l: &Layout,
        slots: &candle_core::CudaStorage,
        slots_l: &Layout,
    ) -> candle_core::Result<()> {
        cuda::scatter(self.what, (cache, cache_l), (src, src_l), (slots, slots_l))
    }
}

/// Checks that every slot lies in a cache of `num_slots` slots or is [`PAD_SLOT`].
pub(crate) fn check_slots(slots: &[u32], num_slots: usize) -> candle_core::Result<()> {
    if let Some((i, slot)) = slots.iter().enumerate().find(|(_, &s)| s != PAD_SLOT && s as usize >= num_slots) {
        bail!("`slot_mapping[{i}]` = {slot} is out of range: the cache has {num_slots} slots")
    }
    Ok(())
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
    let Some((start, end)) = cache_l.contiguous_offsets() else { bail!("the `{what}` cache must be contiguous") };
    let Some(cache) = cache.get_mut(start..end) else { bail!("the `{what}` cache layout runs past its storage") };
    let (&[num_blocks, block_size, num_kv_heads, head_dim], &[tok_stride, head_stride, 1]) =
        (cache_l.dims(), src_l.stride())
    else {
        bail!("`{what}`: unexpected layouts {cache_l:?} and {src_l:?}")
    };
    check_slots(slots, num_blocks * block_size)?;
    let row = num_kv_heads * head_dim;
    // (num_slots, num_kv_heads * head_dim)
    for (i, &slot) in slots.iter().enumerate().filter(|(_, &s)| s != PAD_SLOT) {
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, IndexOp, Result, Tensor};
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::SeedableRng;

    use super::{reshape_and_cache, PAD_SLOT};
    use crate::test_util::{bits, test_device, u32s, uniform};

    /// `cache` with row `slots[i]` of its `(num_slots, num_kv_heads, head_dim)` view replaced by
    /// `rows[i]`, computed row by row on the host.
    fn expected(cache: &Tensor, rows: &Tensor, slots: &[usize]) -> Result<Tensor> {
        let dims = cache.dims().to_vec();
        let flat = cache.flatten(0, 1)?; // (num_slots, num_kv_heads, head_dim)
        let mut out: Vec<Tensor> = (0..flat.dim(0)?).map(|s| flat.i(s)).collect::<Result<_>>()?;
        for (i, &s) in slots.iter().enumerate() {
            out[s] = rows.i(i)?;
        }
        Tensor::stack(&out, 0)?.reshape(dims)
    }

    fn writes_exactly_its_slots(dev: &Device) -> Result<()> {
        let mut rng = StdRng::seed_from_u64(3);
        let (num_blocks, block_size, num_kv_heads, head_dim, num_tokens) = (6, 4, 2, 8, 9);
        let cache_dims = [num_blocks, block_size, num_kv_heads, head_dim];
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let mut slots: Vec<usize> = (0..num_blocks * block_size).collect();
            slots.shuffle(&mut rng);
            slots.truncate(num_tokens);
            let slot_mapping = u32s(&slots, dev)?;
            let (k_cache, v_cache) =
                (uniform(&mut rng, &cache_dims, dtype, dev)?, uniform(&mut rng, &cache_dims, dtype, dev)?);
            let (k_before, v_before) = (k_cache.copy()?, v_cache.copy()?);
            // Keys as a strided view of a fused (num_tokens, 3, num_kv_heads, head_dim) QKV tensor;
            // values transposed so that not even their rows are contiguous.
            let qkv = uniform(&mut rng, &[num_tokens, 3, num_kv_heads, head_dim], dtype, dev)?;
            let key = qkv.i((.., 1))?;
            let value = uniform(&mut rng, &[head_dim, num_kv_heads, num_tokens], dtype, dev)?.permute((2, 1, 0))?;
            assert!(!key.is_contiguous() && !value.is_contiguous());
            reshape_and_cache(&key, &value, &k_cache, &v_cache, &slot_mapping)?;
            // The expected caches are built on the CPU, whatever device ran the op.
            let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
            let (want_k, want_v) =
                (expected(&cpu(&k_before)?, &cpu(&key)?, &slots)?, expected(&cpu(&v_before)?, &cpu(&value)?, &slots)?);
            assert_eq!(bits(&k_cache)?, bits(&want_k)?, "{dtype:?} keys");
            assert_eq!(bits(&v_cache)?, bits(&want_v)?, "{dtype:?} values");
        }
        Ok(())
    }
    test_device!(writes_exactly_its_slots);

    /// A cache narrowed out of a larger pool (non-zero start offset) is written at the right place.
    fn writes_into_a_view_with_offset(dev: &Device) -> Result<()> {
        let mut rng = StdRng::seed_from_u64(5);
        let pool = Tensor::zeros((2, 3, 2, 1, 4), DType::F32, dev)?; // (layers, blocks, block, heads, dim)
        let (k_cache, v_cache) = (pool.i(1)?, pool.i(0)?);
        let key = uniform(&mut rng, &[1, 1, 4], DType::F32, dev)?;
        let value = uniform(&mut rng, &[1, 1, 4], DType::F32, dev)?;
        reshape_and_cache(&key, &value, &k_cache, &v_cache, &u32s(&[5], dev)?)?;
        assert_eq!(bits(&pool.i((1, 2, 1))?)?, bits(&key.i(0)?)?);
        assert_eq!(bits(&pool.i((0, 2, 1))?)?, bits(&value.i(0)?)?);
        let written = (
            pool.abs()?.sum_all()?.to_scalar::<f32>()?,
            (key.abs()?.sum_all()? + value.abs()?.sum_all()?)?.to_scalar::<f32>()?,
        );
        assert_eq!(written.0, written.1, "nothing else in the pool changed");
        Ok(())
    }
    test_device!(writes_into_a_view_with_offset);

    /// Tokens whose slot is `PAD_SLOT` are skipped; the others land where they belong.
    fn padding_slots_write_nothing(dev: &Device) -> Result<()> {
        let mut rng = StdRng::seed_from_u64(11);
        let cache_dims = [3, 4, 2, 8];
        for dtype in [DType::F32, DType::BF16] {
            let (k_cache, v_cache) =
                (uniform(&mut rng, &cache_dims, dtype, dev)?, uniform(&mut rng, &cache_dims, dtype, dev)?);
            let (k_before, v_before) = (k_cache.copy()?, v_cache.copy()?);
            let key = uniform(&mut rng, &[4, 2, 8], dtype, dev)?;
            let value = uniform(&mut rng, &[4, 2, 8], dtype, dev)?;
            let pad = PAD_SLOT as usize;
            reshape_and_cache(&key, &value, &k_cache, &v_cache, &u32s(&[pad, 5, pad, 11], dev)?)?;
            let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
            let real =
                |t: &Tensor| -> Result<Tensor> { Tensor::stack(&[t.i(1)?, t.i(3)?], 0)?.to_device(&Device::Cpu) };
            let want_k = expected(&cpu(&k_before)?, &real(&key)?, &[5, 11])?;
            let want_v = expected(&cpu(&v_before)?, &real(&value)?, &[5, 11])?;
            assert_eq!(bits(&k_cache)?, bits(&want_k)?, "{dtype:?} keys");
            assert_eq!(bits(&v_cache)?, bits(&want_v)?, "{dtype:?} values");
            // Padding only: nothing changes.
            reshape_and_cache(&key.narrow(0, 0, 1)?, &value.narrow(0, 0, 1)?, &k_cache, &v_cache, &u32s(&[pad], dev)?)?;
            assert_eq!(bits(&k_cache)?, bits(&want_k)?, "{dtype:?} keys after padding only");
        }
        Ok(())
    }
    test_device!(padding_slots_write_nothing);

    /// Every malformed argument is an `Err`, never a panic, and leaves the caches untouched.
    fn bad_arguments_are_errors(dev: &Device) -> Result<()> {
        let mut rng = StdRng::seed_from_u64(9);
        let k_cache = uniform(&mut rng, &[4, 2, 2, 8], DType::F32, dev)?;
        let v_cache = uniform(&mut rng, &[4, 2, 2, 8], DType::F32, dev)?;
        let before = (bits(&k_cache)?, bits(&v_cache)?);
        let kv = uniform(&mut rng, &[3, 2, 8], DType::F32, dev)?;
        let slots = u32s(&[0, 7, 3], dev)?;
        let (kc, vc) = (&k_cache, &v_cache);
        let mut cases: Vec<(&str, Result<()>)> = vec![
            ("slot dtype", reshape_and_cache(&kv, &kv, kc, vc, &slots.to_dtype(DType::I64)?)),
            ("too few slots", reshape_and_cache(&kv, &kv, kc, vc, &u32s(&[0, 1], dev)?)),
            ("key shape", reshape_and_cache(&kv.narrow(2, 0, 4)?, &kv, kc, vc, &slots)),
            ("value heads", reshape_and_cache(&kv, &kv.narrow(1, 0, 1)?, kc, vc, &slots)),
            ("key dtype", reshape_and_cache(&kv.to_dtype(DType::BF16)?, &kv, kc, vc, &slots)),
            ("cache rank", reshape_and_cache(&kv, &kv, &kc.flatten(0, 1)?, &vc.flatten(0, 1)?, &slots)),
            ("caches differ", reshape_and_cache(&kv, &kv, kc, &vc.narrow(0, 0, 3)?, &slots)),
            ("cache not contiguous", reshape_and_cache(&kv, &kv, &kc.transpose(0, 1)?, &vc.transpose(0, 1)?, &slots)),
            ("key aliases its cache", reshape_and_cache(&kc.flatten(0, 1)?.narrow(0, 0, 3)?, &kv, kc, vc, &slots)),
        ];
        // Slot values: always checked on the CPU, on CUDA in debug builds only (see `reshape_and_cache`).
        if dev.is_cpu() || cfg!(debug_assertions) {
            cases.push(("slot out of range", reshape_and_cache(&kv, &kv, kc, vc, &u32s(&[0, 8, 3], dev)?)));
        }
        for (name, result) in cases {
            assert!(result.is_err(), "{name}: expected an error");
        }
        assert_eq!((bits(&k_cache)?, bits(&v_cache)?), before, "caches untouched");
        Ok(())
    }
    test_device!(bad_arguments_are_errors);
}

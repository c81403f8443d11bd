//! `paged_attention`: unified prefill + decode attention over the paged KV cache.
//!
//! The packed ("varlen") layout of vLLM v1's unified attention (`vllm/v1/attention/`): there is no
//! prefill batch and no decode batch. Every sequence contributes the query rows it is catching up
//! on this step (a whole prompt, a chunk of one, or a single decoded token), and each row attends
//! causally to its own sequence's cache through the sequence's block table.
//!
//! Numerics are a product guarantee: see [`paged_attention`].

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(test)]
mod tests;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::cache::check_cache_pair;
use crate::elem::Elem;
use crate::storage::{contiguous_slice, cpu};

/// Attention of every packed query row over its own sequence's paged context.
///
/// - `q`: `(num_tokens, num_heads, head_dim)`, the cache's dtype (f32, f16 or bf16), packed over
///   the batch's sequences with no padding. On the CPU an f32 `q` may also read an f16 or bf16
///   cache (each cached element widened to f32 exactly, so the result is the f32 computation on
///   the cached values).
/// - `key_cache`, `value_cache`: `(num_blocks, block_size, num_kv_heads, head_dim)`, contiguous;
///   this step's keys and values are already written (see [`crate::reshape_and_cache`]).
/// - `block_tables`: `(num_seqs, max_blocks_per_seq)` U32; row `s` lists sequence `s`'s blocks in
///   position order. Entries past `ceil(seq_lens[s] / block_size)` are never read.
/// - `cu_seqlens_q`: `(num_seqs + 1,)` U32, non-decreasing from 0 to `num_tokens`; sequence `s`
///   owns query rows `cu_seqlens_q[s]..cu_seqlens_q[s + 1]` (`q_len` rows, possibly none).
/// - `seq_lens`: `(num_seqs,)` U32, each sequence's context length after this step, `>= q_len`.
///
/// Row `j` of sequence `s` sits at position `seq_lens[s] - q_len + j` and attends to positions
/// `0..=pos` of its sequence. Head `h` reads kv head `h / (num_heads / num_kv_heads)` (GQA), so
/// `num_heads` must be a multiple of `num_kv_heads`. Scores are `scale * q·k`.
///
/// Returns `(num_tokens, num_heads, head_dim)` in `q`'s dtype.
///
/// # Determinism
///
/// Each (row, head) is computed by the same f32 operations in the same order whatever else is in
/// the batch, however the sequence's prompt was chunked, and however many threads run: scores over
/// positions `0..=pos` in order, a max-subtracted softmax, then `sum(p * v)` in position order.
/// A row's reduction is never split across threads, so the output is bit-identical across batch
/// compositions. The CUDA body keeps the same guarantee with its own fixed order (a row's positions
/// split over eight warps by position alone, merged in warp order), so CUDA and CPU agree to f32
/// rounding, not bit for bit. On CUDA, when `num_heads / num_kv_heads` is 2, 3, 4 or 8 and
/// `head_dim <= 128`, one block serves all the query heads of a kv head (each K/V row read once for
/// the group); otherwise one block serves one head. The choice depends on the shapes alone, so a
/// model always runs the same kernel.
///
/// # Errors
///
/// Shapes, dtypes and devices are always checked, as are the metadata values (`cu_seqlens_q`,
/// `seq_lens`, block ids) on the CPU. On CUDA the value checks read the metadata back to the host,
/// which waits for the GPU, so only debug builds run them; in a release build a malformed row comes
/// out as zeros, and no index ever leaves its tensor. CUDA also needs `head_dim <= 256`.
pub fn paged_attention(
    q: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    block_tables: &Tensor,
    cu_seqlens_q: &Tensor,
    seq_lens: &Tensor,
    scale: f32,
) -> candle_core::Result<Tensor> {
    checked_op(q, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens, scale, true)
}

/// [`paged_attention`] with the CUDA kernel that serves one query head per block whatever the
/// shapes: for benchmarks that compare it with the grouped kernel. On the CPU it is the same op.
pub fn paged_attention_per_head(
    q: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    block_tables: &Tensor,
    cu_seqlens_q: &Tensor,
    seq_lens: &Tensor,
    scale: f32,
) -> candle_core::Result<Tensor> {
    checked_op(q, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens, scale, false)
}

/// Checks the operands and applies the op; `grouped` allows the grouped CUDA kernel.
#[allow(clippy::too_many_arguments)]
fn checked_op(
    q: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    block_tables: &Tensor,
    cu_seqlens_q: &Tensor,
    seq_lens: &Tensor,
    scale: f32,
    grouped: bool,
) -> candle_core::Result<Tensor> {
    check_cache_pair(key_cache, value_cache)?;
    let (_, block_size, num_kv_heads, head_dim) = key_cache.dims4()?;
    if block_size == 0 {
        bail!("the caches' `block_size` (second dimension) must be > 0")
    }
    let &[_, num_heads, q_head_dim] = q.dims() else {
        bail!("`q` must have shape (num_tokens, num_heads, head_dim), got {:?}", q.dims())
    };
    if q_head_dim != head_dim || head_dim == 0 {
        bail!("`q` has head_dim {q_head_dim} but the cache has {head_dim} (must be equal and > 0)")
    }
    if num_kv_heads == 0 || num_heads == 0 || num_heads % num_kv_heads != 0 {
        bail!("`num_heads` ({num_heads}) must be a positive multiple of `num_kv_heads` ({num_kv_heads})")
    }
    let f32_over_half = q.dtype() == DType::F32 && key_cache.dtype() != DType::F32 && q.device().is_cpu();
    if q.dtype() != key_cache.dtype() && !f32_over_half {
        bail!("`q` has dtype {:?} but the cache holds {:?}", q.dtype(), key_cache.dtype())
    }
    let num_seqs = seq_lens.elem_count();
    check_u32(block_tables, "block_tables", 2, None)?;
    check_u32(seq_lens, "seq_lens", 1, None)?;
    check_u32(cu_seqlens_q, "cu_seqlens_q", 1, Some(num_seqs + 1))?;
    if block_tables.dims()[0] != num_seqs {
        bail!("`block_tables` has {} rows but `seq_lens` has {num_seqs} sequences", block_tables.dims()[0])
    }
    for (name, t) in [
        ("key_cache", key_cache),
        ("block_tables", block_tables),
        ("cu_seqlens_q", cu_seqlens_q),
        ("seq_lens", seq_lens),
    ] {
        if !t.device().same_device(q.device()) {
            bail!("`{name}` must be on `q`'s device")
        }
    }
    let op = PagedAttention {
        key_cache: key_cache.clone(),
        value_cache: value_cache.clone(),
        block_tables: block_tables.contiguous()?,
        cu_seqlens_q: cu_seqlens_q.contiguous()?,
        seq_lens: seq_lens.contiguous()?,
        scale,
        grouped,
    };
    q.contiguous()?.apply_op1_no_bwd(&op)
}

/// Checks that `t` is a U32 tensor of the given rank (and length, for rank 1).
fn check_u32(t: &Tensor, name: &str, rank: usize, len: Option<usize>) -> candle_core::Result<()> {
    let len_ok = len.is_none_or(|n| t.elem_count() == n);
    if t.dtype() != DType::U32 || t.rank() != rank || !len_ok {
        bail!(
            "`{name}` must be a rank-{rank} U32 tensor{}, got {:?} {:?}",
            len.map(|n| format!(" of length {n}")).unwrap_or_default(),
            t.dims(),
            t.dtype()
        )
    }
    Ok(())
}

/// Sizes shared by every row of one call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub scale: f32,
}

/// The batch's sequence metadata, host-side and validated by [`Batch::new`].
pub(crate) struct Batch<'a> {
    /// `(num_seqs, max_blocks_per_seq)`, row-major.
    pub block_tables: &'a [u32],
    pub max_blocks_per_seq: usize,
    /// `(num_seqs + 1,)`
    pub cu_seqlens_q: &'a [u32],
    /// `(num_seqs,)`
    pub seq_lens: &'a [u32],
}

impl<'a> Batch<'a> {
    /// Checks every invariant the kernel indexes by, so that it cannot read out of bounds.
    fn new(
        block_tables: &'a [u32],
        cu_seqlens_q: &'a [u32],
        seq_lens: &'a [u32],
        num_tokens: usize,
        geo: &Geometry,
    ) -> candle_core::Result<Self> {
        let num_seqs = seq_lens.len();
        let max_blocks_per_seq = block_tables.len().checked_div(num_seqs).unwrap_or(0);
        if cu_seqlens_q.len() != num_seqs + 1 || block_tables.len() != num_seqs * max_blocks_per_seq {
            bail!("`cu_seqlens_q` must have num_seqs + 1 entries and `block_tables` num_seqs rows")
        }
        if cu_seqlens_q.first() != Some(&0) || cu_seqlens_q.last() != Some(&(num_tokens as u32)) {
            bail!("`cu_seqlens_q` must run from 0 to num_tokens ({num_tokens}), got {cu_seqlens_q:?}")
        }
        for (s, &seq_len) in seq_lens.iter().enumerate() {
            let (lo, hi) = (cu_seqlens_q[s], cu_seqlens_q[s + 1]);
            let Some(q_len) = hi.checked_sub(lo) else {
                bail!("`cu_seqlens_q` must be non-decreasing, got {cu_seqlens_q:?}")
            };
            if q_len > seq_len {
                bail!("sequence {s} has {q_len} query rows but `seq_lens[{s}]` is {seq_len}")
            }
            let num_blocks = (seq_len as usize).div_ceil(geo.block_size);
            if num_blocks > max_blocks_per_seq {
                bail!("`seq_lens[{s}]` = {seq_len} needs {num_blocks} blocks but `block_tables` has {max_blocks_per_seq} columns")
            }
            let table = &block_tables[s * max_blocks_per_seq..][..num_blocks];
            if let Some(b) = table.iter().find(|&&b| b as usize >= geo.num_blocks) {
                bail!("`block_tables` row {s} names block {b}, but the cache has {} blocks", geo.num_blocks)
            }
        }
        Ok(Self { block_tables, max_blocks_per_seq, cu_seqlens_q, seq_lens })
    }
}

/// The custom op on `q`; it holds the other operands so each backend can read them on its device.
struct PagedAttention {
    /// `(num_blocks, block_size, num_kv_heads, head_dim)`
    key_cache: Tensor,
    /// `(num_blocks, block_size, num_kv_heads, head_dim)`
    value_cache: Tensor,
    /// `(num_seqs, max_blocks_per_seq)` U32, contiguous
    block_tables: Tensor,
    /// `(num_seqs + 1,)` U32, contiguous
    cu_seqlens_q: Tensor,
    /// `(num_seqs,)` U32, contiguous
    seq_lens: Tensor,
    scale: f32,
    /// On CUDA: the grouped kernel where the shapes allow it.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    grouped: bool,
}

impl CustomOp1 for PagedAttention {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(&self, q: &CpuStorage, q_l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (kc_guard, kc_l) = self.key_cache.storage_and_layout();
        let (vc_guard, vc_l) = self.value_cache.storage_and_layout();
        let (bt_guard, bt_l) = self.block_tables.storage_and_layout();
        let (cu_guard, cu_l) = self.cu_seqlens_q.storage_and_layout();
        let (sl_guard, sl_l) = self.seq_lens.storage_and_layout();
        let (kc, vc) = (cpu(&kc_guard, "key_cache")?, cpu(&vc_guard, "value_cache")?);
        let bt = contiguous_slice(cpu(&bt_guard, "block_tables")?, bt_l, "block_tables")?;
        let cu = contiguous_slice(cpu(&cu_guard, "cu_seqlens_q")?, cu_l, "cu_seqlens_q")?;
        let sl = contiguous_slice(cpu(&sl_guard, "seq_lens")?, sl_l, "seq_lens")?;

        let (&[num_tokens, num_heads, head_dim], &[num_blocks, block_size, num_kv_heads, _]) =
            (q_l.dims(), kc_l.dims())
        else {
            bail!("paged-attention: unexpected layouts {q_l:?} and {kc_l:?}")
        };
        let geo = Geometry { num_heads, num_kv_heads, head_dim, num_blocks, block_size, scale: self.scale };
        let batch = Batch::new(bt, cu, sl, num_tokens, &geo)?;
        let operands = Operands { q: (q, q_l), k: (kc, kc_l), v: (vc, vc_l) };
        let out = match (q.dtype(), kc.dtype()) {
            (DType::F32, DType::F32) => run::<f32, f32>(operands, &geo, &batch)?,
            (DType::F32, DType::F16) => run::<f32, half::f16>(operands, &geo, &batch)?,
            (DType::F32, DType::BF16) => run::<f32, half::bf16>(operands, &geo, &batch)?,
            (DType::F16, DType::F16) => run::<half::f16, half::f16>(operands, &geo, &batch)?,
            (DType::BF16, DType::BF16) => run::<half::bf16, half::bf16>(operands, &geo, &batch)?,
            (q, c) => bail!(
                "`q` must be f32, f16 or bf16 over a cache of its dtype (or f32 over f16/bf16), got {q:?} over {c:?}"
            ),
        };
        Ok((out, q_l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        q_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self, q, q_l)
    }
}

/// The three dense operands of the CPU body, with their layouts.
struct Operands<'a> {
    q: (&'a CpuStorage, &'a Layout),
    k: (&'a CpuStorage, &'a Layout),
    v: (&'a CpuStorage, &'a Layout),
}

/// Borrows the operands as `T` (queries) and `C` (cache) slices and runs the CPU body.
fn run<T: Elem, C: Elem>(ops: Operands<'_>, geo: &Geometry, batch: &Batch<'_>) -> candle_core::Result<CpuStorage> {
    let q = contiguous_slice::<T>(ops.q.0, ops.q.1, "q")?;
    let k = contiguous_slice::<C>(ops.k.0, ops.k.1, "key_cache")?;
    let v = contiguous_slice::<C>(ops.v.0, ops.v.1, "value_cache")?;
    Ok(T::to_cpu_storage_owned(cpu::forward(q, k, v, geo, batch)))
}

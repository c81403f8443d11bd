//! The CUDA body of `paged_attention`: launches `kernels/cuda/paged_attention.cu`.
//!
//! One thread block of eight warps per (query row, head); see the `.cu` file for the algorithm and
//! why its results do not depend on the batch. `attention::tests` compares it with the CPU body
//! wherever a GPU is present (`benches/GPU.md`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Shape};

use super::{Batch, Geometry, PagedAttention};
use crate::cuda::{capturing, contiguous_view, cuda, load, to_u32, PAGED_ATTENTION};

/// Warps per (row, head) block; must equal `kWarps` in `paged_attention.cu`.
const WARPS: u32 = 8;
/// Largest `head_dim` the kernel holds in registers (`kMaxHeadDim` in `paged_attention.cu`).
const MAX_HEAD_DIM: usize = 256;
/// Largest `head_dim` of the grouped kernel (`kGroupMaxHeadDim`).
const MAX_GROUPED_HEAD_DIM: usize = 128;
/// The grouped kernels (`paged_attention_g<G>_<dtype>`) by their G, query heads per kv head.
const GROUPED: [(usize, &str); 4] =
    [(2, "paged_attention_g2"), (3, "paged_attention_g3"), (4, "paged_attention_g4"), (8, "paged_attention_g8")];
/// The grid is one block per (row, head) along x, which holds at most this many blocks.
const MAX_GRID_X: usize = i32::MAX as usize;

/// The kernel's operands as device views, all contiguous.
struct Views<'a, T> {
    /// `(num_tokens, num_heads, head_dim)`
    q: CudaView<'a, T>,
    /// `(num_blocks, block_size, num_kv_heads, head_dim)`
    k: CudaView<'a, T>,
    /// `(num_blocks, block_size, num_kv_heads, head_dim)`
    v: CudaView<'a, T>,
    /// `(num_seqs, max_blocks_per_seq)`
    block_tables: CudaView<'a, u32>,
    /// `(num_seqs + 1,)`
    cu_seqlens_q: CudaView<'a, u32>,
    /// `(num_seqs,)`
    seq_lens: CudaView<'a, u32>,
}

/// `paged_attention` for `q` on a CUDA device. The public function has checked shapes, dtypes and
/// devices; this checks what the kernel needs on top (`head_dim`, sizes that fit its `u32`s).
pub(super) fn forward(op: &PagedAttention, q: &CudaStorage, q_l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
    let out = match q.dtype() {
        DType::F32 => run::<f32>(op, q, q_l)?,
        DType::F16 => run::<half::f16>(op, q, q_l)?,
        DType::BF16 => run::<half::bf16>(op, q, q_l)?,
        other => bail!("`q` must be f32, f16 or bf16, got {other:?}"),
    };
    Ok((out, q_l.shape().clone()))
}

/// Checks, allocates the output and launches `paged_attention_<T>`.
fn run<T: CudaDType + DeviceRepr>(
    op: &PagedAttention,
    q: &CudaStorage,
    q_l: &Layout,
) -> candle_core::Result<CudaStorage> {
    let dev = q.device();
    let (kc_guard, kc_l) = op.key_cache.storage_and_layout();
    let (vc_guard, vc_l) = op.value_cache.storage_and_layout();
    let (bt_guard, bt_l) = op.block_tables.storage_and_layout();
    let (cu_guard, cu_l) = op.cu_seqlens_q.storage_and_layout();
    let (sl_guard, sl_l) = op.seq_lens.storage_and_layout();
    let views = Views {
        q: contiguous_view::<T>(q, q_l, "q")?,
        k: contiguous_view::<T>(cuda(&kc_guard, "key_cache")?, kc_l, "key_cache")?,
        v: contiguous_view::<T>(cuda(&vc_guard, "value_cache")?, vc_l, "value_cache")?,
        block_tables: contiguous_view::<u32>(cuda(&bt_guard, "block_tables")?, bt_l, "block_tables")?,
        cu_seqlens_q: contiguous_view::<u32>(cuda(&cu_guard, "cu_seqlens_q")?, cu_l, "cu_seqlens_q")?,
        seq_lens: contiguous_view::<u32>(cuda(&sl_guard, "seq_lens")?, sl_l, "seq_lens")?,
    };
    let (&[num_tokens, num_heads, head_dim], &[num_blocks, block_size, num_kv_heads, _]) = (q_l.dims(), kc_l.dims())
    else {
        bail!("paged-attention: unexpected layouts {q_l:?} and {kc_l:?}")
    };
    if head_dim > MAX_HEAD_DIM {
        bail!("`head_dim` = {head_dim}: the CUDA paged attention supports at most {MAX_HEAD_DIM}")
    }
    if num_tokens.saturating_mul(num_heads) > MAX_GRID_X {
        bail!("{num_tokens} rows of {num_heads} heads: the CUDA paged attention supports at most {MAX_GRID_X} in all")
    }
    let geo = Geometry { num_heads, num_kv_heads, head_dim, num_blocks, block_size, scale: op.scale };
    // The value checks read the metadata back to the host, which waits for the GPU; release builds
    // skip them (as does a graph capture), and the kernel bounds every index it derives from the
    // metadata itself.
    if cfg!(debug_assertions) && !capturing(dev) {
        let bt = dev.clone_dtoh(&views.block_tables)?;
        let cu = dev.clone_dtoh(&views.cu_seqlens_q)?;
        let sl = dev.clone_dtoh(&views.seq_lens)?;
        Batch::new(&bt, &cu, &sl, num_tokens, &geo)?;
    }
    // One block per (row, kv head) for the whole group where a grouped kernel exists.
    let group = num_heads / num_kv_heads;
    let grouped_kernel = GROUPED.iter().find(|&&(g, _)| g == group).map(|&(_, name)| name);
    let (kernel, blocks_per_row) = match grouped_kernel {
        Some(name) if op.grouped && head_dim <= MAX_GROUPED_HEAD_DIM => (name, num_kv_heads),
        _ => ("paged_attention", num_heads),
    };
    let sizes = Sizes {
        blocks: to_u32(num_tokens * blocks_per_row, "num_tokens")?,
        args: [
            to_u32(sl_l.shape().elem_count(), "num_seqs")?,
            to_u32(num_heads, "num_heads")?,
            to_u32(num_kv_heads, "num_kv_heads")?,
            to_u32(head_dim, "head_dim")?,
            to_u32(num_blocks, "num_blocks")?,
            to_u32(block_size, "block_size")?,
            to_u32(bt_l.dims().get(1).copied().unwrap_or(0), "max_blocks_per_seq")?,
        ],
        scale: op.scale,
    };
    let len = num_tokens * num_heads * head_dim;
    // SAFETY: the kernel writes all `len` elements (each (row, head) block writes its `head_dim`
    // outputs, zeros for a malformed row) before anything reads them; the spare element that keeps
    // an empty allocation valid lies outside the output's layout and is never read.
    let mut out = unsafe { dev.alloc::<T>(len.max(1))? };
    if len > 0 {
        launch(dev, kernel, &views, &mut out, &sizes, q.dtype())?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// The kernel's scalar arguments.
struct Sizes {
    /// The grid: `num_tokens * num_heads` blocks, or `num_tokens * num_kv_heads` for the grouped
    /// kernel (checked to fit).
    blocks: u32,
    /// `num_seqs, num_heads, num_kv_heads, head_dim, num_blocks, block_size, max_blocks_per_seq`,
    /// in the kernel's parameter order.
    args: [u32; 7],
    scale: f32,
}

/// Launches `<kernel>_<dtype>` over `sizes.blocks` blocks, a row's heads (or kv heads) adjacent.
fn launch<T: DeviceRepr>(
    dev: &CudaDevice,
    kernel: &str,
    views: &Views<'_, T>,
    out: &mut CudaSlice<T>,
    sizes: &Sizes,
    dtype: DType,
) -> candle_core::Result<()> {
    let func = load(dev, &PAGED_ATTENTION, kernel, dtype)?;
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    builder.arg(out).arg(&views.q).arg(&views.k).arg(&views.v);
    builder.arg(&views.block_tables).arg(&views.cu_seqlens_q).arg(&views.seq_lens);
    for arg in &sizes.args {
        builder.arg(arg);
    }
    builder.arg(&sizes.scale);
    let cfg = LaunchConfig { grid_dim: (sizes.blocks, 1, 1), block_dim: (WARPS * 32, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the arguments match `paged_attention_<T>` and `paged_attention_g<G>_<T>` in
    // `paged_attention.cu` (the grouped kernel only for num_heads = G * num_kv_heads and head_dim
    // <= 128, as `run` chose it): four pointers to
    // `T`, three to u32, seven u32 and an f32. The views cover exactly the shapes the kernel indexes
    // (`q` and `out` are `(num_tokens, num_heads, head_dim)`, the caches `(num_blocks, block_size,
    // num_kv_heads, head_dim)`, checked by `paged_attention`), `head_dim <= MAX_HEAD_DIM` and
    // `num_heads % num_kv_heads == 0` hold, and the kernel bounds every index it derives from the
    // metadata values.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(())
}

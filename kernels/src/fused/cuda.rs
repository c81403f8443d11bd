//! The CUDA bodies of `qkv_rope`, `swiglu` and `add_rms_norm`: launch `kernels/cuda/fused.cu`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Shape};

use super::{QkvRope, QkvRopeCache};
use crate::cuda::{check_positions_and_slots, contiguous_view, cuda, held, load, to_u32, FUSED};

/// Threads per block of both kernels.
const THREADS: u32 = 256;
/// Most blocks `swiglu` launches; its grid-stride loop covers the rest.
const MAX_BLOCKS: usize = 1 << 16;

pub(super) fn qkv_rope(
    op: &QkvRope,
    qkv: (&CudaStorage, &Layout),
    cos: (&CudaStorage, &Layout),
    sin: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    match qkv.0.dtype() {
        DType::F32 => qkv_rope_t::<f32>(op, qkv, cos, sin),
        DType::F16 => qkv_rope_t::<half::f16>(op, qkv, cos, sin),
        DType::BF16 => qkv_rope_t::<half::bf16>(op, qkv, cos, sin),
        other => bail!("qkv_rope: `qkv` must be f32, f16 or bf16, got {other:?}"),
    }
}

fn qkv_rope_t<T: CudaDType + DeviceRepr>(
    op: &QkvRope,
    (qkv, qkv_l): (&CudaStorage, &Layout),
    (cos, cos_l): (&CudaStorage, &Layout),
    (sin, sin_l): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = qkv.device().clone();
    let n = qkv_l.dims()[0];
    let len = n * (op.heads + 2 * op.kv_heads) * op.head_dim;
    let (x, c, s) = (
        contiguous_view::<T>(qkv, qkv_l, "qkv")?,
        contiguous_view::<T>(cos, cos_l, "cos")?,
        contiguous_view::<T>(sin, sin_l, "sin")?,
    );
    // The public function checked the shapes: `x` holds `len` elements, `c` and `s` n * head_dim / 2.
    if x.len() != len || c.len() != n * (op.head_dim / 2) || s.len() != c.len() {
        bail!("qkv_rope: operand sizes {}, {}, {} do not fit {len}", x.len(), c.len(), s.len())
    }
    // SAFETY: the kernel writes all `len` elements (every pair of every q/k head and every v
    // element of every row) before anything reads them; the spare element of an empty output is
    // outside its shape.
    let mut out = unsafe { dev.alloc::<T>(len.max(1))? };
    if len > 0 {
        let func = load(&dev, &FUSED, "qkv_rope", qkv.dtype())?;
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        let sizes = [
            to_u32(n, "n")?,
            to_u32(op.heads, "heads")?,
            to_u32(op.kv_heads, "kv_heads")?,
            to_u32(op.head_dim, "head_dim")?,
        ];
        builder.arg(&mut out).arg(&x).arg(&c).arg(&s);
        for size in &sizes {
            builder.arg(size);
        }
        let cfg = LaunchConfig { grid_dim: (sizes[0], 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments match `qkv_rope_<T>` in `fused.cu` (a `T*`, three `const T*`, four
        // u32); one block per row; the views hold exactly the elements the kernel indexes (checked
        // above).
        unsafe { builder.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(len)))
}

pub(super) fn qkv_rope_cache(
    op: &QkvRopeCache,
    qkv: (&CudaStorage, &Layout),
    positions: (&CudaStorage, &Layout),
    slots: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    match qkv.0.dtype() {
        DType::F32 => qkv_rope_cache_t::<f32>(op, qkv, positions, slots),
        DType::F16 => qkv_rope_cache_t::<half::f16>(op, qkv, positions, slots),
        DType::BF16 => qkv_rope_cache_t::<half::bf16>(op, qkv, positions, slots),
        other => bail!("qkv_rope_cache: `qkv` must be f32, f16 or bf16, got {other:?}"),
    }
}

fn qkv_rope_cache_t<T: CudaDType + DeviceRepr>(
    op: &QkvRopeCache,
    (qkv, qkv_l): (&CudaStorage, &Layout),
    (positions, positions_l): (&CudaStorage, &Layout),
    (slots, slots_l): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = qkv.device().clone();
    let n = qkv_l.dims()[0];
    let (h, kv, d) = (op.heads, op.kv_heads, op.head_dim);
    let x = contiguous_view::<T>(qkv, qkv_l, "qkv")?;
    let positions = contiguous_view::<u32>(positions, positions_l, "positions")?;
    let slots = contiguous_view::<u32>(slots, slots_l, "slot_mapping")?;
    // The tables and caches the op holds (the public function checked their shapes and dtypes).
    let ((cos_s, cos_l), (sin_s, sin_l)) = (held(&op.cos, "cos")?, held(&op.sin, "sin")?);
    let ((k_s, k_l), (v_s, v_l)) = (held(&op.key_cache, "key_cache")?, held(&op.value_cache, "value_cache")?);
    let cos = contiguous_view::<T>(cuda(&cos_s, "cos")?, &cos_l, "cos")?;
    let sin = contiguous_view::<T>(cuda(&sin_s, "sin")?, &sin_l, "sin")?;
    let k_cache = contiguous_view::<T>(cuda(&k_s, "key_cache")?, &k_l, "key_cache")?;
    let v_cache = contiguous_view::<T>(cuda(&v_s, "value_cache")?, &v_l, "value_cache")?;
    let half = d / 2;
    let max_positions = cos_l.dims()[0];
    let num_slots = k_l.dims()[0] * k_l.dims()[1];
    if x.len() != n * (h + 2 * kv) * d
        || positions.len() != n
        || slots.len() != n
        || cos.len() != max_positions * half
        || sin.len() != cos.len()
        || k_cache.len() != num_slots * kv * d
        || v_cache.len() != k_cache.len()
    {
        bail!("qkv_rope_cache: operand sizes do not fit ({n}, {h} + 2 × {kv} heads of {d})")
    }
    check_positions_and_slots(&dev, &positions, &slots, max_positions, num_slots)?;
    let len = n * h * d;
    // SAFETY: every row's block writes all `h * d` elements of its q (rotated pairs, or zeros for a
    // row past the tables) before anything reads them; the spare element of an empty output is
    // outside its shape.
    let mut q = unsafe { dev.alloc::<T>(len.max(1))? };
    if len > 0 {
        let func = load(&dev, &FUSED, "qkv_rope_cache", qkv.dtype())?;
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        let sizes = [
            to_u32(h, "heads")?,
            to_u32(kv, "kv_heads")?,
            to_u32(d, "head_dim")?,
            to_u32(max_positions, "max_positions")?,
        ];
        builder.arg(&mut q).arg(&k_cache).arg(&v_cache).arg(&x).arg(&cos).arg(&sin).arg(&positions).arg(&slots);
        for size in &sizes {
            builder.arg(size);
        }
        builder.arg(&num_slots);
        let cfg = LaunchConfig { grid_dim: (to_u32(n, "n")?, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments match `qkv_rope_cache_<T>` in `fused.cu` (three `T*`, three
        // `const T*`, two `const uint32_t*`, four u32, a size_t); one block per row. The views
        // hold exactly the elements the kernel may index (checked above): it reads row `r`'s
        // table rows only when `positions[r] < max_positions` and writes cache rows only for a
        // slot below `num_slots`. The caches are written in place through views of tensors this
        // op holds, as `reshape_and_cache` writes them: the engine's step is their only user, on
        // this stream, so nothing reads them concurrently.
        unsafe { builder.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(q, dev), Shape::from(len)))
}

pub(super) fn swiglu(s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
    match s.dtype() {
        DType::F32 => swiglu_t::<f32>(s, l),
        DType::F16 => swiglu_t::<half::f16>(s, l),
        DType::BF16 => swiglu_t::<half::bf16>(s, l),
        other => bail!("swiglu: `gate_up` must be f32, f16 or bf16, got {other:?}"),
    }
}

fn swiglu_t<T: CudaDType + DeviceRepr>(s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = s.device().clone();
    let (n, width) = l.shape().dims2()?;
    let inter = width / 2;
    let x = contiguous_view::<T>(s, l, "gate_up")?;
    let len = n * inter;
    // SAFETY: the grid-stride loop writes every one of the `len` outputs before anything reads
    // them; the spare element of an empty output is outside its shape.
    let mut out = unsafe { dev.alloc::<T>(len.max(1))? };
    if len > 0 {
        let func = load(&dev, &FUSED, "swiglu", s.dtype())?;
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        let (n32, inter32) = (to_u32(n, "n")?, to_u32(inter, "inter")?);
        builder.arg(&mut out).arg(&x).arg(&n32).arg(&inter32);
        let blocks = len.div_ceil(THREADS as usize).min(MAX_BLOCKS) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments match `swiglu_<T>` in `fused.cu` (a `T*`, a `const T*`, two u32);
        // `x` is the contiguous `(n, 2 * inter)` input and `out` holds `n * inter` elements.
        unsafe { builder.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, inter))))
}

pub(super) fn add_rms_norm(
    eps: f32,
    x: (&CudaStorage, &Layout),
    y: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    match x.0.dtype() {
        DType::F32 => add_rms_norm_t::<f32>(eps, x, y, w),
        DType::F16 => add_rms_norm_t::<half::f16>(eps, x, y, w),
        DType::BF16 => add_rms_norm_t::<half::bf16>(eps, x, y, w),
        other => bail!("add_rms_norm: `x` must be f32, f16 or bf16, got {other:?}"),
    }
}

fn add_rms_norm_t<T: CudaDType + DeviceRepr>(
    eps: f32,
    (x, x_l): (&CudaStorage, &Layout),
    (y, y_l): (&CudaStorage, &Layout),
    (w, w_l): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = x.device().clone();
    let (n, hidden) = x_l.shape().dims2()?;
    let (xs, ys, ws) = (
        contiguous_view::<T>(x, x_l, "x")?,
        contiguous_view::<T>(y, y_l, "y")?,
        contiguous_view::<T>(w, w_l, "weight")?,
    );
    if xs.len() != n * hidden || ys.len() != xs.len() || ws.len() != hidden {
        bail!("add_rms_norm: operand sizes {}, {}, {} do not fit ({n}, {hidden})", xs.len(), ys.len(), ws.len())
    }
    let len = 2 * n * hidden;
    // SAFETY: each row's block writes its `hidden` sums and `hidden` normed values before anything
    // reads them; the spare element of an empty output is outside its shape.
    let mut out = unsafe { dev.alloc::<T>(len.max(1))? };
    if len > 0 {
        let func = load(&dev, &FUSED, "add_rms_norm", x.dtype())?;
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        let (n32, hidden32) = (to_u32(n, "n")?, to_u32(hidden, "hidden")?);
        builder.arg(&mut out).arg(&xs).arg(&ys).arg(&ws).arg(&n32).arg(&hidden32).arg(&eps);
        let cfg = LaunchConfig { grid_dim: (n32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments match `add_rms_norm_<T>` in `fused.cu` (a `T*`, three `const T*`,
        // two u32, an f32); one block per row; the views hold exactly `n * hidden`, `n * hidden`
        // and `hidden` elements (checked above), and `out` holds both planes.
        unsafe { builder.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(len)))
}

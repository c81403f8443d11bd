//! The CUDA body of `gemv`: launches `kernels/cuda/gemv.cu`.

use candle_core::backend::BackendStorage;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    CudaStream, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Shape};

use super::qkv::GemvNormQkv;
use super::{Epilogue, CHUNK_BYTES, MAX_NORM_ROWS, MAX_ROWS};
use crate::cuda::{check_positions_and_slots, contiguous_view, cuda, held, load, to_u32, GEMV};

/// Output columns per block: one warp each (`kWarpsPerBlock` in `gemv.cu`).
const COLUMNS_PER_BLOCK: usize = 4;

pub(super) fn gemv(
    epilogue: Epilogue,
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    match x.0.dtype() {
        DType::F32 => gemv_t::<f32>(epilogue, x, w),
        DType::F16 => gemv_t::<half::f16>(epilogue, x, w),
        DType::BF16 => gemv_t::<half::bf16>(epilogue, x, w),
        other => bail!("gemv: `x` must be f32, f16 or bf16, got {other:?}"),
    }
}

/// Launches `gemv<m>_<T>` or `gemv_swiglu<m>_<T>`: `w` has `rows` rows, the output `(m, n)` with
/// `n` the epilogue's columns (a warp each).
fn gemv_t<T: CudaDType + DeviceRepr>(
    epilogue: Epilogue,
    (x, x_l): (&CudaStorage, &Layout),
    (w, w_l): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = x.device().clone();
    let (m, k) = x_l.shape().dims2()?;
    let (rows, w_k) = w_l.shape().dims2()?;
    let n = epilogue.columns(rows)?;
    let (xs, ws) = (contiguous_view::<T>(x, x_l, "x")?, contiguous_view::<T>(w, w_l, "w")?);
    let stream = dev.cuda_stream();
    check_operands("gemv", MAX_ROWS, (m, k, rows, w_k), &xs, None, &ws, &stream)?;
    let len = m * n;
    // SAFETY: every one of the `n` columns' warps writes its `m` outputs before anything reads
    // them; the spare element of an empty output is outside its shape.
    let mut out = unsafe { dev.alloc::<T>(len.max(1))? };
    if len > 0 {
        let func = load(&dev, &GEMV, &format!("gemv{}{m}", epilogue.suffix()), x.dtype())?;
        let mut builder = stream.launch_builder(&func);
        let (n32, k32) = (to_u32(n, "n")?, to_u32(k, "k")?);
        builder.arg(&mut out).arg(&xs).arg(&ws).arg(&n32).arg(&k32);
        let blocks = to_u32(n.div_ceil(COLUMNS_PER_BLOCK), "blocks")?;
        let threads = (COLUMNS_PER_BLOCK * 32) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments match `gemv[_swiglu]<m>_<T>` in `gemv.cu` (a `T*`, two `const T*`,
        // two u32); `xs` holds `m * k` and `ws` `rows * k` elements (`rows` is `n`, or `2n` with
        // the SwiGLU epilogue, as the kernel reads), both 16-byte aligned with `k` a whole number
        // of 16-byte chunks (checked above); `out` holds `m * n`; one warp per column.
        unsafe { builder.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((m, n))))
}

/// What the public functions checked and the kernels' reads depend on: `x` (and `r`) `(m, k)` with
/// `1 <= m <= max_rows`, `w` `(n, k)` (`n` its rows), rows a whole number of 16-byte chunks, every operand starting
/// on a 16-byte boundary.
#[allow(clippy::too_many_arguments)]
fn check_operands<T: DeviceRepr>(
    op: &str,
    max_rows: usize,
    (m, k, n, w_k): (usize, usize, usize, usize),
    xs: &CudaView<'_, T>,
    rs: Option<&CudaView<'_, T>>,
    ws: &CudaView<'_, T>,
    stream: &Arc<CudaStream>,
) -> candle_core::Result<()> {
    if !(1..=max_rows).contains(&m)
        || w_k != k
        || xs.len() != m * k
        || ws.len() != n * k
        || rs.is_some_and(|r| r.len() != m * k)
    {
        bail!("{op}: operands ({m}, {k}) and ({n}, {w_k}) do not fit")
    }
    if !(k * std::mem::size_of::<T>()).is_multiple_of(CHUNK_BYTES) {
        bail!("{op}: a row of {k} elements is not a whole number of 16-byte chunks")
    }
    let aligned = |v: &CudaView<'_, T>| (v.device_ptr(stream).0 as usize).is_multiple_of(CHUNK_BYTES);
    if !aligned(xs) || !aligned(ws) || rs.is_some_and(|r| !aligned(r)) {
        bail!("{op}: `x`, `w` (and a residual) must start on a 16-byte boundary")
    }
    Ok(())
}

pub(super) fn gemv_norm(
    eps: f32,
    epilogue: Epilogue,
    x: (&CudaStorage, &Layout),
    r: Option<(&CudaStorage, &Layout)>,
    w: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    match x.0.dtype() {
        DType::F32 => gemv_norm_t::<f32>(eps, epilogue, x, r, w),
        DType::F16 => gemv_norm_t::<half::f16>(eps, epilogue, x, r, w),
        DType::BF16 => gemv_norm_t::<half::bf16>(eps, epilogue, x, r, w),
        other => bail!("gemv_norm: `x` must be f32, f16 or bf16, got {other:?}"),
    }
}

/// Launches `gemv_norm[_swiglu]<m>_<T>` (no residual: the output is `y`, `(m, n)`) or
/// `gemv_add_norm[_swiglu]<m>_<T>` (the output is `s`, `m * k` elements, then `y`, `m * n`); `n`
/// is the epilogue's columns for `w`'s rows.
fn gemv_norm_t<T: CudaDType + DeviceRepr>(
    eps: f32,
    epilogue: Epilogue,
    (x, x_l): (&CudaStorage, &Layout),
    r: Option<(&CudaStorage, &Layout)>,
    (w, w_l): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = x.device().clone();
    let (m, k) = x_l.shape().dims2()?;
    let (rows, w_k) = w_l.shape().dims2()?;
    let n = epilogue.columns(rows)?;
    let (xs, ws) = (contiguous_view::<T>(x, x_l, "x")?, contiguous_view::<T>(w, w_l, "w")?);
    let rs = match r {
        Some((r, r_l)) => Some(contiguous_view::<T>(r, r_l, "residual")?),
        None => None,
    };
    let stream = dev.cuda_stream();
    check_operands("gemv_norm", MAX_NORM_ROWS.min(MAX_ROWS), (m, k, rows, w_k), &xs, rs.as_ref(), &ws, &stream)?;
    if n == 0 {
        bail!("gemv_norm: a weight with no output column (whose warp would write `s`)")
    }
    let sum_len = if rs.is_some() { m * k } else { 0 };
    let len = sum_len + m * n;
    // SAFETY: every column's warp writes its `m` outputs, and column 0's warp (there is one: n >= 1)
    // writes all `m * k` elements of `s` when there is a residual, before anything reads them.
    let mut out = unsafe { dev.alloc::<T>(len)? };
    let kernel = if rs.is_some() { "gemv_add_norm" } else { "gemv_norm" };
    let func = load(&dev, &GEMV, &format!("{kernel}{}{m}", epilogue.suffix()), x.dtype())?;
    let mut builder = stream.launch_builder(&func);
    let (n32, k32) = (to_u32(n, "n")?, to_u32(k, "k")?);
    let blocks = to_u32(n.div_ceil(COLUMNS_PER_BLOCK), "blocks")?;
    let threads = (COLUMNS_PER_BLOCK * 32) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    match &rs {
        Some(rs) => {
            let (mut sum, mut y) = out.split_at_mut(sum_len);
            builder.arg(&mut y).arg(&mut sum).arg(&xs).arg(rs).arg(&ws).arg(&n32).arg(&k32).arg(&eps);
            // SAFETY: the arguments match `gemv_add_norm[_swiglu]<m>_<T>` in `gemv.cu` (two `T*`,
            // three `const T*`, two u32, an f32); `xs` and `rs` hold `m * k` and `ws` `rows * k`
            // elements (`n` or `2n` rows, as the kernel reads),
            // 16-byte aligned with `k` a whole number of 16-byte chunks (checked above); `sum`
            // holds `m * k` (16-byte aligned: the buffer's start) and `y` `m * n`.
            unsafe { builder.launch(cfg) }.w()?;
        }
        None => {
            builder.arg(&mut out).arg(&xs).arg(&ws).arg(&n32).arg(&k32).arg(&eps);
            // SAFETY: the arguments match `gemv_norm[_swiglu]<m>_<T>` in `gemv.cu` (a `T*`, two `const T*`,
            // two u32, an f32); the sizes and alignment are as above; `out` holds `m * n`.
            unsafe { builder.launch(cfg) }.w()?;
        }
    }
    let shape = if rs.is_some() { Shape::from(len) } else { Shape::from((m, n)) };
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

pub(super) fn gemv_norm_qkv(
    op: &GemvNormQkv,
    x: (&CudaStorage, &Layout),
    r: Option<(&CudaStorage, &Layout)>,
    w: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    match x.0.dtype() {
        DType::F32 => gemv_norm_qkv_t::<f32>(op, x, r, w),
        DType::F16 => gemv_norm_qkv_t::<half::f16>(op, x, r, w),
        DType::BF16 => gemv_norm_qkv_t::<half::bf16>(op, x, r, w),
        other => bail!("gemv_norm_qkv_cache: `x` must be f32, f16 or bf16, got {other:?}"),
    }
}

/// Launches `gemv_norm_qkv<m>_<T>` (no residual: the output is q, `m * heads * head_dim`) or
/// `gemv_add_norm_qkv<m>_<T>` (the output is `s`, `m * k` elements, then q), one warp per RoPE
/// pair; k and v go into the caches the op holds.
fn gemv_norm_qkv_t<T: CudaDType + DeviceRepr>(
    op: &GemvNormQkv,
    (x, x_l): (&CudaStorage, &Layout),
    r: Option<(&CudaStorage, &Layout)>,
    (w, w_l): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = x.device().clone();
    let (m, k) = x_l.shape().dims2()?;
    let (rows, w_k) = w_l.shape().dims2()?;
    let (h, kv, d) = (op.heads, op.kv_heads, op.head_dim);
    let (xs, ws) = (contiguous_view::<T>(x, x_l, "x")?, contiguous_view::<T>(w, w_l, "w")?);
    let rs = match r {
        Some((r, r_l)) => Some(contiguous_view::<T>(r, r_l, "residual")?),
        None => None,
    };
    let stream = dev.cuda_stream();
    check_operands(
        "gemv_norm_qkv_cache",
        MAX_NORM_ROWS.min(MAX_ROWS),
        (m, k, rows, w_k),
        &xs,
        rs.as_ref(),
        &ws,
        &stream,
    )?;
    // The tables, positions, slots and caches the op holds (the public function checked their
    // shapes and dtypes).
    let ((cos_s, cos_l), (sin_s, sin_l)) = (held(&op.cos, "cos")?, held(&op.sin, "sin")?);
    let ((pos_s, pos_l), (slot_s, slot_l)) = (held(&op.positions, "positions")?, held(&op.slot_mapping, "slots")?);
    let ((k_s, k_l), (v_s, v_l)) = (held(&op.key_cache, "key_cache")?, held(&op.value_cache, "value_cache")?);
    let cos = contiguous_view::<T>(cuda(&cos_s, "cos")?, &cos_l, "cos")?;
    let sin = contiguous_view::<T>(cuda(&sin_s, "sin")?, &sin_l, "sin")?;
    let positions = contiguous_view::<u32>(cuda(&pos_s, "positions")?, &pos_l, "positions")?;
    let slots = contiguous_view::<u32>(cuda(&slot_s, "slot_mapping")?, &slot_l, "slot_mapping")?;
    let k_cache = contiguous_view::<T>(cuda(&k_s, "key_cache")?, &k_l, "key_cache")?;
    let v_cache = contiguous_view::<T>(cuda(&v_s, "value_cache")?, &v_l, "value_cache")?;
    let half = d / 2;
    let max_positions = cos_l.dims()[0];
    let num_slots = k_l.dims()[0] * k_l.dims()[1];
    if d == 0
        || !d.is_multiple_of(2)
        || rows != (h + 2 * kv) * d
        || positions.len() != m
        || slots.len() != m
        || cos.len() != max_positions * half
        || sin.len() != cos.len()
        || k_cache.len() != num_slots * kv * d
        || v_cache.len() != k_cache.len()
    {
        bail!("gemv_norm_qkv_cache: operand sizes do not fit ({m}, {k}), {h} + 2 × {kv} heads of {d}")
    }
    check_positions_and_slots(&dev, &positions, &slots, max_positions, num_slots)?;
    let sum_len = if rs.is_some() { m * k } else { 0 };
    let q_len = m * h * d;
    let len = sum_len + q_len;
    // SAFETY: every q pair's warp writes its `m` rows' two elements (rotated, or zeros for a row past
    // the tables), and the warp of pair 0 (there is one: h >= 1, d >= 2) writes all `m * k`
    // elements of `s` when there is a residual, before anything reads them.
    let mut out = unsafe { dev.alloc::<T>(len)? };
    let kernel = if rs.is_some() { "gemv_add_norm_qkv" } else { "gemv_norm_qkv" };
    let func = load(&dev, &GEMV, &format!("{kernel}{m}"), x.dtype())?;
    let mut builder = stream.launch_builder(&func);
    let pairs = (h + 2 * kv) * half;
    let (n32, k32) = (to_u32(pairs, "pairs")?, to_u32(k, "k")?);
    let sizes =
        [to_u32(h, "heads")?, to_u32(kv, "kv_heads")?, to_u32(d, "head_dim")?, to_u32(max_positions, "max_positions")?];
    let blocks = to_u32(pairs.div_ceil(COLUMNS_PER_BLOCK), "blocks")?;
    let threads = (COLUMNS_PER_BLOCK * 32) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    let (mut sum, mut q) = out.split_at_mut(sum_len);
    builder.arg(&mut q);
    if let Some(rs) = &rs {
        builder.arg(&mut sum).arg(&k_cache).arg(&v_cache).arg(&xs).arg(rs);
    } else {
        builder.arg(&k_cache).arg(&v_cache).arg(&xs);
    }
    builder.arg(&ws).arg(&cos).arg(&sin).arg(&positions).arg(&slots).arg(&n32).arg(&k32).arg(&op.eps);
    for size in &sizes {
        builder.arg(size);
    }
    builder.arg(&num_slots);
    // SAFETY: the arguments match `gemv_add_norm_qkv<m>_<T>` (q, sum, the two caches as `T*`; x,
    // r, w, cos, sin as `const T*`; positions and slots as `const uint32_t*`; n, k; eps; heads,
    // kv_heads, head_dim, max_positions; num_slots as size_t) or, without a residual,
    // `gemv_norm_qkv<m>_<T>` (the same without sum and r). `xs` (and `rs`) hold `m * k` and `ws`
    // `(h + 2 kv) * d * k` elements, 16-byte aligned with `k` a whole number of 16-byte chunks; q
    // holds `m * h * d` and `sum` `m * k` (its start is the buffer's: aligned); the tables hold
    // `max_positions * d / 2` and the caches `num_slots * kv * d` (all checked above). The kernel
    // reads a table row only for a position below `max_positions` and writes a cache row only for
    // a slot below `num_slots`. The caches are written in place through views of tensors the op
    // holds, as `reshape_and_cache` writes them: the engine's step is their only user, on this
    // stream, so nothing reads them concurrently.
    unsafe { builder.launch(cfg) }.w()?;
    drop(builder);
    let shape = if rs.is_some() { Shape::from(len) } else { Shape::from(q_len) };
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

//! Elementwise steps of a Llama layer fused into one op each, for devices where every separate
//! candle op costs a kernel launch (CUDA): on the GPU the engine's decode step at small batches is
//! bound by launches, not by memory.
//!
//! - [`qkv_rope`]: split the fused QKV projection into q, k and v and rotate q and k (candle's
//!   `rope_thd`: half-split pairs), in one pass instead of three copies and two rotary ops.
//! - [`swiglu`]: `silu(gate) * up` from the fused gate/up projection, in one pass instead of two
//!   narrows, a `silu` and a product.
//! - [`add_rms_norm`]: the residual add and the next RMS norm, in one pass instead of two.
//!
//! All compute in f32 and round once to the element type (f32, f16 or bf16), on the CPU and in
//! `kernels/cuda/fused.cu`; candle's expressions round after each step, so they agree to the
//! element type's rounding, not bit for bit. The CPU bodies compute the same formulas as the CUDA
//! ones (which may contract to FMAs, use `rsqrtf` and sum in another order: equal to rounding); they
//! exist to test them. The engine uses these ops on CUDA only; its CPU path has its own ops.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};

use crate::elem::Elem;
use crate::storage::contiguous_slice;

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(test)]
mod tests;

/// `qkv: (n, (heads + 2 * kv_heads) * head_dim)`, `cos`, `sin`: `(n, head_dim / 2)`, one dtype
/// (f32, f16 or bf16) on one device → q `(n, heads, head_dim)`, k and v `(n, kv_heads, head_dim)`,
/// each contiguous (three planes of one buffer).
pub fn qkv_rope(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let n = qkv.dim(0)?;
    let width = (heads + 2 * kv_heads) * head_dim;
    if qkv.dims() != [n, width] {
        bail!("`qkv` must be (n, {width}) for {heads} + 2 × {kv_heads} heads of {head_dim}, got {:?}", qkv.dims())
    }
    if !head_dim.is_multiple_of(2) {
        bail!("`head_dim` must be even, got {head_dim}")
    }
    for (name, t) in [("cos", cos), ("sin", sin)] {
        if t.dims() != [n, head_dim / 2] {
            bail!("`{name}` must be (n, head_dim / 2) = ({n}, {}), got {:?}", head_dim / 2, t.dims())
        }
        if t.dtype() != qkv.dtype() || !t.device().same_device(qkv.device()) {
            bail!("`{name}` must have `qkv`'s dtype and device")
        }
    }
    let op = QkvRope { heads, kv_heads, head_dim };
    let flat = qkv.contiguous()?.apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &op)?;
    let (q_len, kv_len) = (n * heads * head_dim, n * kv_heads * head_dim);
    let q = flat.narrow(0, 0, q_len)?.reshape((n, heads, head_dim))?;
    let k = flat.narrow(0, q_len, kv_len)?.reshape((n, kv_heads, head_dim))?;
    let v = flat.narrow(0, q_len + kv_len, kv_len)?.reshape((n, kv_heads, head_dim))?;
    Ok((q, k, v))
}

/// `x`, `y`: `(n, hidden)`, `weight`: `(hidden,)`, one dtype (f32, f16 or bf16) on one device →
/// the residual sum `s = x + y` (rounded to the dtype, as a separate add stores it) and
/// `rms_norm(s) * weight` (`s / sqrt(mean(s²) + eps)`, in f32, rounded once), both `(n, hidden)`
/// and contiguous (two planes of one buffer): candle's add and candle-nn's `rms_norm` in one pass.
pub fn add_rms_norm(x: &Tensor, y: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<(Tensor, Tensor)> {
    let (n, hidden) = x.dims2()?;
    if y.dims() != x.dims() || weight.dims() != [hidden] {
        bail!(
            "add_rms_norm: `y` must be {:?} and `weight` ({hidden},), got {:?} and {:?}",
            x.dims(),
            y.dims(),
            weight.dims()
        )
    }
    for (name, t) in [("y", y), ("weight", weight)] {
        if t.dtype() != x.dtype() || !t.device().same_device(x.device()) {
            bail!("add_rms_norm: `{name}` must have `x`'s dtype and device")
        }
    }
    let flat = x.contiguous()?.apply_op3_no_bwd(&y.contiguous()?, &weight.contiguous()?, &AddRmsNorm { eps })?;
    let sum = flat.narrow(0, 0, n * hidden)?.reshape((n, hidden))?;
    let normed = flat.narrow(0, n * hidden, n * hidden)?.reshape((n, hidden))?;
    Ok((sum, normed))
}

/// What [`qkv_rope_cache`] (and `gemv::gemv_norm_qkv_cache`) require of their rotary tables,
/// positions, caches and slots, for `n` rows of `dtype` on `device` and `(kv_heads, head_dim)`.
pub(crate) fn check_rope_cache_operands(
    (n, dtype, device): (usize, DType, &candle_core::Device),
    (cos, sin, positions): (&Tensor, &Tensor, &Tensor),
    (key_cache, value_cache, slot_mapping): (&Tensor, &Tensor, &Tensor),
    (kv_heads, head_dim): (usize, usize),
) -> candle_core::Result<()> {
    if !head_dim.is_multiple_of(2) {
        bail!("`head_dim` must be even, got {head_dim}")
    }
    for (name, t) in [("cos", cos), ("sin", sin)] {
        if t.rank() != 2 || t.dim(1)? != head_dim / 2 || t.dims() != cos.dims() {
            bail!("`{name}` must be (max_positions, head_dim / 2 = {}), got {:?}", head_dim / 2, t.dims())
        }
        if t.dtype() != dtype || !t.device().same_device(device) {
            bail!("`{name}` must have the activations' dtype and device")
        }
    }
    for (name, t) in [("positions", positions), ("slot_mapping", slot_mapping)] {
        if t.dims() != [n] || t.dtype() != DType::U32 || !t.device().same_device(device) {
            bail!("`{name}` must be a ({n},) U32 tensor on the activations' device, got {:?} {:?}", t.dims(), t.dtype())
        }
    }
    crate::cache::check_cache_pair(key_cache, value_cache)?;
    if key_cache.dims()[2..] != [kv_heads, head_dim] || key_cache.dtype() != dtype {
        bail!(
            "the caches must be (num_blocks, block_size, {kv_heads}, {head_dim}) of the activations' dtype, got {:?} {:?}",
            key_cache.dims(),
            key_cache.dtype()
        )
    }
    if !key_cache.device().same_device(device) {
        bail!("the caches must be on the activations' device")
    }
    Ok(())
}

/// [`qkv_rope`] with the rotary tables gathered by position and the keys and values stored into
/// the paged cache ([`crate::reshape_and_cache`]), in one launch on CUDA: returns q
/// `(n, heads, head_dim)` and writes each row's rotated k and its v into slot `slot_mapping[i]` of
/// `key_cache` and `value_cache` (a [`crate::PAD_SLOT`] row is not stored).
///
/// - `qkv`: `(n, (heads + 2 * kv_heads) * head_dim)`; `cos`, `sin`: the whole tables,
///   `(max_positions, head_dim / 2)`, of `qkv`'s dtype (f32, f16 or bf16).
/// - `positions`, `slot_mapping`: `(n,)` U32.
/// - `key_cache`, `value_cache`: `(num_blocks, block_size, kv_heads, head_dim)` of `qkv`'s dtype.
///
/// The results are the bits of `qkv_rope` on the gathered tables followed by `reshape_and_cache`,
/// which is what the CPU body runs (and where a position past the tables or a slot out of range is
/// an error, nothing written). On CUDA only debug builds read the positions and slots back to check
/// them (not while a graph is captured); in any build the kernel writes a row whose position is past
/// the tables as a q of zeros, stores nothing for it, and skips a slot out of range.
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope_cache(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    positions: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    slot_mapping: &Tensor,
    (heads, kv_heads, head_dim): (usize, usize, usize),
) -> candle_core::Result<Tensor> {
    let n = qkv.dim(0)?;
    let width = (heads + 2 * kv_heads) * head_dim;
    if qkv.dims() != [n, width] {
        bail!("`qkv` must be (n, {width}) for {heads} + 2 × {kv_heads} heads of {head_dim}, got {:?}", qkv.dims())
    }
    check_rope_cache_operands(
        (n, qkv.dtype(), qkv.device()),
        (cos, sin, positions),
        (key_cache, value_cache, slot_mapping),
        (kv_heads, head_dim),
    )?;
    if !qkv.device().is_cuda() {
        let (cos, sin) = (cos.index_select(positions, 0)?, sin.index_select(positions, 0)?);
        let (q, k, v) = qkv_rope(qkv, &cos, &sin, heads, kv_heads, head_dim)?;
        crate::reshape_and_cache(&k, &v, key_cache, value_cache, slot_mapping)?;
        return Ok(q);
    }
    #[cfg(feature = "cuda")]
    {
        let op = QkvRopeCache {
            heads,
            kv_heads,
            head_dim,
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
            key_cache: key_cache.clone(),
            value_cache: value_cache.clone(),
        };
        let q = qkv.contiguous()?.apply_op3_no_bwd(&positions.contiguous()?, &slot_mapping.contiguous()?, &op)?;
        q.reshape((n, heads, head_dim))
    }
    #[cfg(not(feature = "cuda"))]
    bail!("qkv_rope_cache: a CUDA tensor without the `cuda` feature")
}

/// The CUDA launch of [`qkv_rope_cache`]: a custom op over `(qkv, positions, slot_mapping)` that
/// returns q and writes the caches it holds (see `fused::cuda::qkv_rope_cache`).
#[cfg(feature = "cuda")]
struct QkvRopeCache {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    cos: Tensor,
    sin: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
}

#[cfg(feature = "cuda")]
impl CustomOp3 for QkvRopeCache {
    fn name(&self) -> &'static str {
        "sluice-qkv-rope-cache"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("qkv_rope_cache: the fused op runs on CUDA; the CPU composes qkv_rope and reshape_and_cache")
    }

    fn cuda_fwd(
        &self,
        qkv: &candle_core::CudaStorage,
        qkv_l: &Layout,
        positions: &candle_core::CudaStorage,
        positions_l: &Layout,
        slots: &candle_core::CudaStorage,
        slots_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::qkv_rope_cache(self, (qkv, qkv_l), (positions, positions_l), (slots, slots_l))
    }
}

/// `gate_up: (n, 2 * inter)` (gate, then up, per row; f32, f16 or bf16) → `(n, inter)` of
/// `silu(gate) * up`.
pub fn swiglu(gate_up: &Tensor) -> candle_core::Result<Tensor> {
    let (_, width) = gate_up.dims2()?;
    if !width.is_multiple_of(2) {
        bail!("`gate_up` must have an even width, got {width}")
    }
    gate_up.contiguous()?.apply_op1_no_bwd(&Swiglu)
}

struct QkvRope {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl QkvRope {
    /// The CPU body over one element type: the kernel's formula, row by row.
    fn cpu<T: Elem>(&self, qkv: &[T], cos: &[T], sin: &[T], n: usize) -> Vec<T> {
        let (h, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let (half, width) = (d / 2, (h + 2 * kv) * d);
        let mut out = vec![T::from_f64(0.0); n * width];
        let (q_out, rest) = out.split_at_mut(n * h * d);
        let (k_out, v_out) = rest.split_at_mut(n * kv * d);
        for r in 0..n {
            let x = &qkv[r * width..(r + 1) * width];
            let (c, s) = (&cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half]);
            for head in 0..h + kv {
                let src = &x[head * d..(head + 1) * d];
                let dst = if head < h {
                    &mut q_out[(r * h + head) * d..(r * h + head + 1) * d]
                } else {
                    &mut k_out[(r * kv + head - h) * d..(r * kv + head - h + 1) * d]
                };
                for i in 0..half {
                    let (x1, x2) = (src[i].widen1(), src[i + half].widen1());
                    let (cc, ss) = (c[i].widen1(), s[i].widen1());
                    dst[i] = T::from_f64((x1 * cc - x2 * ss) as f64);
                    dst[i + half] = T::from_f64((x2 * cc + x1 * ss) as f64);
                }
            }
            v_out[r * kv * d..(r + 1) * kv * d].copy_from_slice(&x[(h + kv) * d..]);
        }
        out
    }
}

impl CustomOp3 for QkvRope {
    fn name(&self) -> &'static str {
        "sluice-qkv-rope"
    }

    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        qkv_l: &Layout,
        cos: &CpuStorage,
        cos_l: &Layout,
        sin: &CpuStorage,
        sin_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = qkv_l.dims()[0];
        let shape = Shape::from(n * (self.heads + 2 * self.kv_heads) * self.head_dim);
        macro_rules! body {
            ($t:ty) => {{
                let out = self.cpu::<$t>(
                    contiguous_slice(qkv, qkv_l, "qkv")?,
                    contiguous_slice(cos, cos_l, "cos")?,
                    contiguous_slice(sin, sin_l, "sin")?,
                    n,
                );
                Ok((<$t as candle_core::WithDType>::to_cpu_storage_owned(out), shape))
            }};
        }
        match qkv.dtype() {
            DType::F32 => body!(f32),
            DType::F16 => body!(half::f16),
            DType::BF16 => body!(half::bf16),
            other => bail!("qkv_rope: `qkv` must be f32, f16 or bf16, got {other:?}"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qkv: &candle_core::CudaStorage,
        qkv_l: &Layout,
        cos: &candle_core::CudaStorage,
        cos_l: &Layout,
        sin: &candle_core::CudaStorage,
        sin_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::qkv_rope(self, (qkv, qkv_l), (cos, cos_l), (sin, sin_l))
    }
}

struct AddRmsNorm {
    eps: f32,
}

impl AddRmsNorm {
    /// The CPU body over one element type: the kernel's formula, row by row.
    fn cpu<T: Elem>(&self, x: &[T], y: &[T], weight: &[T], n: usize, hidden: usize) -> Vec<T> {
        let mut out = vec![T::from_f64(0.0); 2 * n * hidden];
        let (sums, normed) = out.split_at_mut(n * hidden);
        for r in 0..n {
            let row = r * hidden..(r + 1) * hidden;
            let sum = &mut sums[row.clone()];
            for ((s, a), b) in sum.iter_mut().zip(&x[row.clone()]).zip(&y[row.clone()]) {
                *s = T::from_f64((a.widen1() + b.widen1()) as f64);
            }
            let squares: f32 = sum.iter().map(|s| s.widen1() * s.widen1()).sum();
            let scale = 1.0 / (squares / hidden as f32 + self.eps).sqrt();
            for ((o, s), w) in normed[row].iter_mut().zip(sum.iter()).zip(weight) {
                *o = T::from_f64((scale * s.widen1() * w.widen1()) as f64);
            }
        }
        out
    }
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "sluice-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        y: &CpuStorage,
        y_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, hidden) = x_l.shape().dims2()?;
        let shape = Shape::from(2 * n * hidden);
        macro_rules! body {
            ($t:ty) => {{
                let out = self.cpu::<$t>(
                    contiguous_slice(x, x_l, "x")?,
                    contiguous_slice(y, y_l, "y")?,
                    contiguous_slice(w, w_l, "weight")?,
                    n,
                    hidden,
                );
                Ok((<$t as candle_core::WithDType>::to_cpu_storage_owned(out), shape))
            }};
        }
        match x.dtype() {
            DType::F32 => body!(f32),
            DType::F16 => body!(half::f16),
            DType::BF16 => body!(half::bf16),
            other => bail!("add_rms_norm: `x` must be f32, f16 or bf16, got {other:?}"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        y: &candle_core::CudaStorage,
        y_l: &Layout,
        w: &candle_core::CudaStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::add_rms_norm(self.eps, (x, x_l), (y, y_l), (w, w_l))
    }
}

struct Swiglu;

/// One output element of [`swiglu`], in f32.
#[inline]
pub(crate) fn swiglu1(g: f32, u: f32) -> f32 {
    g / (1.0 + (-g).exp()) * u
}

impl CustomOp1 for Swiglu {
    fn name(&self) -> &'static str {
        "sluice-swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, width) = l.shape().dims2()?;
        let inter = width / 2;
        macro_rules! body {
            ($t:ty) => {{
                let xs = contiguous_slice::<$t>(s, l, "gate_up")?;
                let mut out = Vec::with_capacity(n * inter);
                for row in xs.chunks_exact(width.max(1)).take(n) {
                    let (gate, up) = row.split_at(inter);
                    out.extend(gate.iter().zip(up).map(|(g, u)| {
                        <$t as candle_core::WithDType>::from_f64(swiglu1(g.widen1(), u.widen1()) as f64)
                    }));
                }
                Ok((<$t as candle_core::WithDType>::to_cpu_storage_owned(out), Shape::from((n, inter))))
            }};
        }
        match s.dtype() {
            DType::F32 => body!(f32),
            DType::F16 => body!(half::f16),
            DType::BF16 => body!(half::bf16),
            other => bail!("swiglu: `gate_up` must be f32, f16 or bf16, got {other:?}"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::swiglu(s, l)
    }
}

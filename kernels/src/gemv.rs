//! `gemv`: `y = x · Wᵀ` for a handful of rows against a weight stored as Hugging Face stores it,
//! `(out, in)` row-major: the engine's projections at small decode batches on CUDA.
//!
//! There a decode step reads every weight once for one to eight rows, so a projection's time is
//! the time to stream its weight. cuBLAS tiles a one-row product into a few dozen output tiles,
//! which leaves most of an H100's 132 SMs idle; `kernels/cuda/gemv.cu` gives every output column
//! a warp of its own instead (see there), so every SM streams.
//!
//! Numerics: f32 products and sums, one rounding of each output to the element type. Each row of
//! `y` is summed the same way whatever the number of rows, so a sequence's projections have the
//! same bits alone or with up to [`MAX_ROWS`] - 1 others, and the same bits on every run. The CPU
//! body sums each output in plain `k` order (not the kernel's lane order): it exists to test the
//! kernel and to run `gemv_bench` off a GPU.
//!
//! [`Epilogue::Swiglu`] fuses an MLP's activation into its gate/up projection: against the stacked
//! `(2 · inter, k)` weight (gate rows, then up rows) each output is `silu(gate) · up` of its
//! column's two products, each rounded to the dtype first, so the result has the bits of the plain
//! product followed by `fused::swiglu`, in one launch. [`gemv_norm_qkv_cache`] does the same for
//! an attention's QKV projection and `fused::qkv_rope_cache` (RoPE and the KV cache writes).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use crate::elem::Elem;
use crate::storage::contiguous_slice;

#[cfg(feature = "cuda")]
mod cuda;
mod qkv;
#[cfg(test)]
mod tests;

pub use qkv::{gemv_norm_qkv_cache, QkvCache};

/// Most rows of `x` one call takes.
pub const MAX_ROWS: usize = 8;

/// Most rows of `x` one [`gemv_norm`] call takes: its warps each round and square every row of the
/// input, which past two rows costs more arithmetic than the weight takes to stream.
pub const MAX_NORM_ROWS: usize = 2;

/// Bytes the kernel reads at once per lane; `k` must be a whole number of them and `x` and `w`
/// must start on such a boundary.
const CHUNK_BYTES: usize = 16;

/// What the kernels do with each column's product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// Store it: `y` is `(m, n)` for a weight of `n` rows.
    Store,
    /// For a gate/up weight of `2 · inter` rows (gate, then up): `y` is `(m, inter)` of
    /// `silu(gate) · up`, each product rounded to the dtype before the activation (the bits of
    /// [`Epilogue::Store`] followed by `fused::swiglu`).
    Swiglu,
}

impl Epilogue {
    /// Output columns for a weight of `rows` rows, or an error if the weight does not fit.
    fn columns(self, rows: usize) -> candle_core::Result<usize> {
        match self {
            Self::Store => Ok(rows),
            Self::Swiglu if rows.is_multiple_of(2) => Ok(rows / 2),
            Self::Swiglu => {
                bail!("gemv: a SwiGLU epilogue needs a gate/up weight of an even number of rows, got {rows}")
            }
        }
    }

    /// The CUDA kernels' name suffix.
    #[cfg(feature = "cuda")]
    fn suffix(self) -> &'static str {
        match self {
            Self::Store => "",
            Self::Swiglu => "_swiglu",
        }
    }

    /// The outputs of one row from its `products` (rounded to `T`, as stored), in the order of
    /// the weight's rows.
    fn finish<T: Elem>(self, products: Vec<T>) -> Vec<T> {
        match self {
            Self::Store => products,
            Self::Swiglu => {
                let (gate, up) = products.split_at(products.len() / 2);
                gate.iter()
                    .zip(up)
                    .map(|(g, u)| T::from_f64(crate::fused::swiglu1(g.widen1(), u.widen1()) as f64))
                    .collect()
            }
        }
    }
}

/// Whether [`gemv`] takes `m` rows of `k` elements of `dtype`: `1 <= m <= MAX_ROWS`, `dtype` f32,
/// f16 or bf16, and rows a whole number of 16-byte chunks.
pub fn supports(m: usize, k: usize, dtype: DType) -> bool {
    (1..=MAX_ROWS).contains(&m)
        && matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
        && k > 0
        && (k * dtype.size_in_bytes()).is_multiple_of(CHUNK_BYTES)
}

/// `x: (m, k)` against `w: (n, k)` → `(m, n)` = `x · wᵀ`, with `m`, `k` and the dtype as
/// [`supports`] requires, `x` and `w` of one dtype on one device and `w` contiguous. `x` is made
/// contiguous (and copied if its first element is not 16-byte aligned in its buffer).
pub fn gemv(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    gemv_with(x, w, Epilogue::Store)
}

/// [`gemv`] with an [`Epilogue`]: with [`Epilogue::Swiglu`], `w` is `(2 · inter, k)` and the result
/// `(m, inter)`.
pub fn gemv_with(x: &Tensor, w: &Tensor, epilogue: Epilogue) -> candle_core::Result<Tensor> {
    epilogue.columns(w.dim(0)?)?;
    checked(x, w)?.apply_op2_no_bwd(w, &Gemv { epilogue })
}

/// The projection after an RMS norm, with the norm in it: `x: (m, k)` plus `residual` (if any,
/// the same shape) against `w: (n, k)`, a projection's weight with the norm's weight folded in
/// (`W · diag(norm weight)`, see [`fold_norm_weight`]), gives `(s, y)`: `s = x + residual` rounded to
/// the dtype (`None` without a residual: it is `x`), and `y = (s / sqrt(mean(s²) + eps)) · wᵀ`
/// (`m`, `n`): the residual add, `rms_norm` and the product in one launch on CUDA, for
/// `1 <= m <= MAX_NORM_ROWS`, `n >= 1` and what [`supports`] requires.
///
/// Against the separate ops (add, `rms_norm` with the norm's weight, rounded to the dtype, then the
/// product with `W`) the result differs by rounding: the normed row is not rounded, and `W` is
/// rounded once more where the norm's weight was folded in.
pub fn gemv_norm(
    x: &Tensor,
    residual: Option<&Tensor>,
    w: &Tensor,
    eps: f32,
) -> candle_core::Result<(Option<Tensor>, Tensor)> {
    gemv_norm_with(x, residual, w, eps, Epilogue::Store)
}

/// [`gemv_norm`] with an [`Epilogue`]: with [`Epilogue::Swiglu`], `w` is a folded gate/up weight
/// `(2 · inter, k)` and `y` is `(m, inter)`.
pub fn gemv_norm_with(
    x: &Tensor,
    residual: Option<&Tensor>,
    w: &Tensor,
    eps: f32,
    epilogue: Epilogue,
) -> candle_core::Result<(Option<Tensor>, Tensor)> {
    let (m, k) = x.dims2()?;
    let (rows, _) = w.dims2()?;
    let n = epilogue.columns(rows)?;
    if m > MAX_NORM_ROWS || n == 0 {
        bail!(
            "gemv_norm: takes 1 to {MAX_NORM_ROWS} rows and at least one output column, got ({m}, {k}) x ({rows}, {k})"
        )
    }
    let op = GemvNorm { eps, epilogue };
    let Some(r) = residual else {
        return Ok((None, checked(x, w)?.apply_op2_no_bwd(w, &op)?));
    };
    check_residual("gemv_norm", x, r)?;
    let x = checked(x, w)?;
    let r = checked(r, w)?;
    let flat = x.apply_op3_no_bwd(&r, w, &op)?;
    let sum = flat.narrow(0, 0, m * k)?.reshape((m, k))?;
    let y = flat.narrow(0, m * k, m * n)?.reshape((m, n))?;
    Ok((Some(sum), y))
}

/// A projection's weight `w: (n, k)` with an RMS norm's weight `(k,)` folded in, `w · diag(norm)`,
/// computed in f32 and rounded to `w`'s dtype: the weight [`gemv_norm`] takes. Done a slab of rows
/// at a time, so that loading a large LM head needs little memory beyond the two weights.
pub fn fold_norm_weight(w: &Tensor, norm: &Tensor) -> candle_core::Result<Tensor> {
    const ROWS: usize = 4096;
    let (n, k) = w.dims2()?;
    if norm.dims() != [k] {
        bail!("fold_norm_weight: the norm's weight must be ({k},), got {:?}", norm.dims())
    }
    let norm = norm.to_dtype(DType::F32)?.reshape((1, k))?;
    let slabs = (0..n)
        .step_by(ROWS)
        .map(|at| w.narrow(0, at, ROWS.min(n - at))?.to_dtype(DType::F32)?.broadcast_mul(&norm)?.to_dtype(w.dtype()))
        .collect::<candle_core::Result<Vec<_>>>()?;
    match slabs.as_slice() {
        [] => Ok(w.clone()),
        [one] => Ok(one.clone()),
        _ => Tensor::cat(&slabs, 0),
    }
}

/// That a residual `r` has `x`'s shape, dtype and device.
fn check_residual(op: &str, x: &Tensor, r: &Tensor) -> candle_core::Result<()> {
    if r.dims() != x.dims() || r.dtype() != x.dtype() || !r.device().same_device(x.device()) {
        bail!("{op}: `residual` must have `x`'s shape, dtype and device")
    }
    Ok(())
}

/// `x` checked against `w` as [`gemv`] checks them, contiguous and 16-byte aligned (copied if not).
fn checked(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (n, w_k) = w.dims2()?;
    if w_k != k {
        bail!("gemv: `x` is ({m}, {k}) but `w` is ({n}, {w_k})")
    }
    if w.dtype() != x.dtype() || !w.device().same_device(x.device()) {
        bail!("gemv: `w` must have `x`'s dtype and device")
    }
    if !supports(m, k, x.dtype()) {
        bail!(
            "gemv: takes 1 to {MAX_ROWS} rows of f32, f16 or bf16 whose width is a multiple of 16 bytes, got ({m}, {k}) \
             of {:?}",
            x.dtype()
        )
    }
    let elem = x.dtype().size_in_bytes();
    if !w.is_contiguous() || !(w.layout().start_offset() * elem).is_multiple_of(CHUNK_BYTES) {
        bail!("gemv: `w` must be contiguous and start on a 16-byte boundary")
    }
    let x = x.contiguous()?;
    if (x.layout().start_offset() * elem).is_multiple_of(CHUNK_BYTES) {
        return Ok(x);
    }
    // A fresh buffer: `Tensor::copy` would clone the whole buffer and keep the view's offset.
    x.force_contiguous()
}

struct GemvNorm {
    eps: f32,
    epilogue: Epilogue,
}

impl GemvNorm {
    /// The CPU body over one element type: `s` rounded, its squares and its products with `w`'s `n`
    /// rows in f32 in `k` order, each product scaled at the end and rounded, then the epilogue.
    /// Returns `s` (with a residual) then `y`.
    fn cpu<T: Elem>(&self, x: &[T], r: Option<&[T]>, w: &[T], m: usize, n: usize, k: usize) -> Vec<T> {
        let s: Vec<T> = match r {
            Some(r) => x.iter().zip(r).map(|(a, b)| T::from_f64((a.widen1() + b.widen1()) as f64)).collect(),
            None => x.to_vec(),
        };
        let mut out = if r.is_some() { s.clone() } else { Vec::with_capacity(m * n) };
        for row in s.chunks_exact(k).take(m) {
            let squares = row.iter().fold(0.0f32, |acc, v| v.widen1().mul_add(v.widen1(), acc));
            let scale = 1.0 / (squares / k as f32 + self.eps).sqrt();
            let products = w.chunks_exact(k).take(n).map(|col| {
                let dot = row.iter().zip(col).fold(0.0f32, |acc, (a, b)| a.widen1().mul_add(b.widen1(), acc));
                T::from_f64((dot * scale) as f64)
            });
            out.extend(self.epilogue.finish(products.collect()));
        }
        out
    }
}

impl CustomOp2 for GemvNorm {
    fn name(&self) -> &'static str {
        "sluice-gemv-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = x_l.shape().dims2()?;
        let (n, _) = w_l.shape().dims2()?;
        let columns = self.epilogue.columns(n)?;
        macro_rules! body {
            ($t:ty) => {{
                let (x, w) = (contiguous_slice::<$t>(x, x_l, "x")?, contiguous_slice::<$t>(w, w_l, "w")?);
                let out = self.cpu(x, None, w, m, n, k);
                Ok((<$t as candle_core::WithDType>::to_cpu_storage_owned(out), Shape::from((m, columns))))
            }};
        }
        match x.dtype() {
            DType::F32 => body!(f32),
            DType::F16 => body!(half::f16),
            DType::BF16 => body!(half::bf16),
            other => bail!("gemv_norm: `x` must be f32, f16 or bf16, got {other:?}"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        w: &candle_core::CudaStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::gemv_norm(self.eps, self.epilogue, (x, x_l), None, (w, w_l))
    }
}

impl CustomOp3 for GemvNorm {
    fn name(&self) -> &'static str {
        "sluice-gemv-add-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        r: &CpuStorage,
        r_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = x_l.shape().dims2()?;
        let (n, _) = w_l.shape().dims2()?;
        let columns = self.epilogue.columns(n)?;
        macro_rules! body {
            ($t:ty) => {{
                let x = contiguous_slice::<$t>(x, x_l, "x")?;
                let r = contiguous_slice::<$t>(r, r_l, "residual")?;
                let w = contiguous_slice::<$t>(w, w_l, "w")?;
                let out = self.cpu(x, Some(r), w, m, n, k);
                Ok((<$t as candle_core::WithDType>::to_cpu_storage_owned(out), Shape::from(m * (k + columns))))
            }};
        }
        match x.dtype() {
            DType::F32 => body!(f32),
            DType::F16 => body!(half::f16),
            DType::BF16 => body!(half::bf16),
            other => bail!("gemv_norm: `x` must be f32, f16 or bf16, got {other:?}"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        r: &candle_core::CudaStorage,
        r_l: &Layout,
        w: &candle_core::CudaStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::gemv_norm(self.eps, self.epilogue, (x, x_l), Some((r, r_l)), (w, w_l))
    }
}

struct Gemv {
    epilogue: Epilogue,
}

impl Gemv {
    /// The CPU body over one element type: each product a plain f32 dot product in `k` order with
    /// one of `w`'s `n` rows, rounded, then the epilogue.
    fn cpu<T: Elem>(&self, x: &[T], w: &[T], m: usize, n: usize, k: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(m * n);
        for row in x.chunks_exact(k).take(m) {
            let products = w.chunks_exact(k).take(n).map(|col| {
                let dot = row.iter().zip(col).fold(0.0f32, |acc, (a, b)| a.widen1().mul_add(b.widen1(), acc));
                T::from_f64(dot as f64)
            });
            out.extend(self.epilogue.finish(products.collect()));
        }
        out
    }
}

impl CustomOp2 for Gemv {
    fn name(&self) -> &'static str {
        "sluice-gemv"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = x_l.shape().dims2()?;
        let (n, _) = w_l.shape().dims2()?;
        let columns = self.epilogue.columns(n)?;
        macro_rules! body {
            ($t:ty) => {{
                let out = self.cpu::<$t>(contiguous_slice(x, x_l, "x")?, contiguous_slice(w, w_l, "w")?, m, n, k);
                Ok((<$t as candle_core::WithDType>::to_cpu_storage_owned(out), Shape::from((m, columns))))
            }};
        }
        match x.dtype() {
            DType::F32 => body!(f32),
            DType::F16 => body!(half::f16),
            DType::BF16 => body!(half::bf16),
            other => bail!("gemv: `x` must be f32, f16 or bf16, got {other:?}"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        w: &candle_core::CudaStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::gemv(self.epilogue, (x, x_l), (w, w_l))
    }
}

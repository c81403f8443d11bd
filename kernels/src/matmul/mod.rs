//! `PackedLinear`: `y[m, n] = x[m, k] · Wᵀ` against a weight packed once, in f32, bf16 or int8.
//!
//! # Numerics
//!
//! Every output is one chain of fused multiply-adds over `k` in order, with nothing else:
//!
//! ```text
//! acc = 0.0; for i in 0..k { acc = fma(x[r, i], w[c, i], acc) }; y[r, c] = acc
//! ```
//!
//! where `w[c, i]` is the weight as stored, widened to f32 exactly (bf16 is a shift; int8 is
//! `f32(q) * scale`, one rounded multiply; int4 is `f32(q) * d + m`, a rounded multiply then a
//! rounded add, which is also how GGUF's Q4_1 and Q8_0 blocks dequantise, so a weight packed from
//! those blocks computes with exactly the dequantised values). Outputs sit in SIMD lanes, so there is no horizontal
//! reduction, and the register tile (how many rows and outputs share a weight load) changes which
//! outputs are computed together, never the chain of one output. Work is split over output
//! columns only, never over `k`. So a row's result does not depend on `m`, on the other rows, on
//! the thread count, nor even on the instruction set: the AVX-512, AVX2+FMA and portable paths
//! produce the same bits (`f32::mul_add` is a correctly rounded FMA everywhere), and the tests
//! hold all of this.
//!
//! # Layout
//!
//! The weight is cut into panels of `PANEL` consecutive outputs (the last one zero-padded),
//! each stored k-major: `panel[i][j]` is `w[p * PANEL + j, i]`, so one step of `k` reads
//! `PANEL` contiguous weights. A task owns whole panels and runs every row of `x` through a panel
//! while it is hot in L2, then writes the panel's columns of `y`. At `m >= DEQUANT_MIN_ROWS` a bf16 or int8 panel is first widened into
//! a per-thread f32 scratch panel (the same values, so the same bits) so the inner loop is pure
//! FMA; below that it is widened in registers, which is what makes decode bandwidth-bound on the
//! compact bytes.

#[cfg(target_arch = "x86_64")]
mod avx2;
// AVX-512 intrinsics are stable from Rust 1.89, the workspace's minimum.
#[cfg(target_arch = "x86_64")]
mod avx512;
mod out;
mod pack;
mod quantized;
mod scalar;
#[cfg(test)]
mod tests;

use candle_core::{bail, DType, Device, Tensor};

use pack::Packed;
pub use pack::Quantized;
pub use quantized::QuantizedLinear;

/// Outputs per packed panel: three 16-lane AVX-512 vectors (six AVX2 ones). Divides every
/// projection width of the default model (576, 960, 3072, 49152).
const PANEL: usize = 48;

/// Weights of one int8 or int4 output row sharing one scale, along `k`.
pub const INT8_GROUP: usize = 32;

/// From this many rows on, compact panels are widened once into f32 scratch (see module docs).
#[cfg(target_arch = "x86_64")]
const DEQUANT_MIN_ROWS: usize = 16;

/// Multiply-adds a rayon task should at least carry, so that small matmuls are not split into
/// tasks costing more to schedule than to run. At m = 1 a task of this size takes some 10 µs
/// to stream its weights; eight times more kept decode's 576-wide projections on one thread.
const MIN_TASK_MACS: usize = 1 << 15;

/// How a [`PackedLinear`] stores its weight. Activations and arithmetic are f32 in every format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// 4 bytes a weight, exact.
    F32,
    /// 2 bytes a weight: round-to-nearest-even bf16, widened to f32 exactly in registers.
    Bf16,
    /// 1.125 bytes a weight: symmetric int8 with one f32 scale per output row and group of
    /// [`INT8_GROUP`] weights along `k` (`scale = max|w| / 127`). Activations are not quantised.
    Int8,
    /// 0.625 bytes a weight: unsigned 4-bit codes with an f16 scale `d` and f16 minimum `m` per
    /// output row and group of [`INT8_GROUP`] along `k` (GGUF's Q4_1): `w = f32(q) * d + m`.
    Int4,
}

/// A linear layer's weight `[n, k]` (out, in), packed for `y[m, n] = x[m, k] · Wᵀ` on the CPU.
///
/// Row `r` of `y` is bit-identical whatever the other rows of `x`, `m`, and the thread count
/// (see the module docs for the exact sequence of operations). The SIMD path is picked once per
/// process from the CPU's features; all paths give the same bits.
pub struct PackedLinear {
    /// Output features.
    n: usize,
    /// Input features.
    k: usize,
    format: WeightFormat,
    weights: Packed,
    /// Chosen once at construction, so every call on this machine takes one code path.
    isa: Isa,
}

impl PackedLinear {
    /// Packs `w`: `[n, k]` (out, in), any float dtype (widened to f32 first), on any device.
    /// Int8 expects finite weights (a group holding an infinity or NaN quantises to garbage).
    ///
    /// Errors if `w` is not 2-D, not a float tensor, or empty.
    pub fn from_tensor(w: &Tensor, format: WeightFormat) -> candle_core::Result<Self> {
        let (n, k) = w.dims2()?;
        if n == 0 || k == 0 {
            bail!("`w` must have non-zero dims, got [{n}, {k}]")
        }
        if !w.dtype().is_float() {
            bail!("`w` must be a float tensor, got {:?}", w.dtype())
        }
        let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self { n, k, format, weights: Packed::new(&data, n, k, format), isa: Isa::detect() })
    }

    /// Packs a weight `[n, k]` (out, in) that is already quantised, keeping its values exactly:
    /// the kernels then compute with `f32(code) * scale` (int8) or `f32(code) * d + m` (int4), the
    /// same numbers GGUF's Q8_0 and Q4_1 dequantise to.
    ///
    /// Errors if a dimension is zero, the lengths disagree with `[n, k]`, or an int4 code is over 15.
    pub fn from_quantized(w: &Quantized, n: usize, k: usize) -> candle_core::Result<Self> {
        if n == 0 || k == 0 {
            bail!("`w` must have non-zero dims, got [{n}, {k}]")
        }
        if let Err(e) = w.check(n, k) {
            bail!("quantised weight: {e}")
        }
        let format = match w {
            Quantized::Int8 { .. } => WeightFormat::Int8,
            Quantized::Int4 { .. } => WeightFormat::Int4,
        };
        Ok(Self { n, k, format, weights: Packed::quantized(w, n, k), isa: Isa::detect() })
    }

    /// `y = x · Wᵀ`: `x` is `[m, k]` f32 on the CPU (any `m`, including 0); returns `[m, n]` f32.
    ///
    /// Errors, without panicking, if `x` is not 2-D, not f32, not on the CPU, or has the wrong `k`.
    /// A non-contiguous `x` is copied first.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        out::forward_rows(x, self.k, self.n, |xs, m| self.matmul(xs, m))
    }

    /// Output features `n`.
    pub fn out_features(&self) -> usize {
        self.n
    }

    /// Input features `k`.
    pub fn in_features(&self) -> usize {
        self.k
    }

    /// The storage format chosen at construction.
    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// Bytes held by the packed weight (and int8 scales), padding included.
    pub fn weight_bytes(&self) -> usize {
        self.weights.bytes()
    }

    /// The weight `[n, k]` f32 exactly as the kernel sees it (after bf16 or int8 rounding), for
    /// references that must follow the same numeric path.
    pub fn dequantized(&self) -> candle_core::Result<Tensor> {
        Tensor::from_vec(self.weights.unpack(self.n, self.k), (self.n, self.k), &Device::Cpu)
    }

    /// `x`: `[m, k]` row-major, `m * k` long. Returns `[m, n]` row-major.
    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        out::by_panels(m, self.n, self.k, <(Vec<f32>, Vec<f32>)>::default, |(buf, scratch), p, mut out| {
            let job = PanelJob { x, k: self.k, w: self.weights.panel(p, self.k) };
            // These kernels write a `[m][PANEL]` buffer, copied into `y`.
            buf.resize(m * PANEL, 0.0);
            self.isa.panel(&job, buf, scratch);
            out.write(buf);
        })
    }
}

/// One task's unit of work: every row of `x` through one panel.
#[derive(Clone, Copy, Debug)]
struct PanelJob<'a> {
    /// `[m][k]` row-major.
    x: &'a [f32],
    k: usize,
    w: PanelRef<'a>,
}

impl PanelJob<'_> {
    /// Whether `x`, `w` and an `out_len`-long output agree on `m` and `k`: what the SIMD paths'
    /// pointer arithmetic relies on.
    fn fits(&self, out_len: usize) -> bool {
        let m = out_len / PANEL;
        self.k > 0 && out_len == m * PANEL && self.x.len() == m * self.k && self.w.fits(self.k)
    }
}

/// One panel of the packed weight: `PANEL` outputs, k-major.
#[derive(Clone, Copy, Debug)]
enum PanelRef<'a> {
    /// `[k][PANEL]`
    F32(&'a [f32]),
    /// `[k][PANEL]` bf16 bit patterns.
    Bf16(&'a [u16]),
    /// `q`: `[k][PANEL]`; `scales`: `[k.div_ceil(INT8_GROUP)][PANEL]`.
    Int8 { q: &'a [i8], scales: &'a [f32] },
    /// `q`: `[k.div_ceil(2)][PANEL]`: byte `(i / 2, j)` holds output `j`'s code at step `i` of `k`
    /// in its low nibble for even `i`, in its high one for odd `i`; `d`, `m`:
    /// `[k.div_ceil(INT8_GROUP)][PANEL]` f16 bit patterns.
    Int4 { q: &'a [u8], d: &'a [u16], m: &'a [u16] },
}

impl PanelRef<'_> {
    /// Whether the slices have the lengths a `k`-deep panel needs (what the SIMD paths rely on).
    fn fits(&self, k: usize) -> bool {
        match self {
            Self::F32(w) => w.len() == k * PANEL,
            Self::Bf16(w) => w.len() == k * PANEL,
            Self::Int8 { q, scales } => q.len() == k * PANEL && scales.len() == k.div_ceil(INT8_GROUP) * PANEL,
            Self::Int4 { q, d, m } => {
                let s_len = k.div_ceil(INT8_GROUP) * PANEL;
                q.len() == k.div_ceil(2) * PANEL && d.len() == s_len && m.len() == s_len
            }
        }
    }

    /// Widens the panel into `out` (`[k][PANEL]` f32) with the arithmetic the SIMD paths use in
    /// registers (a shift for bf16, one f32 multiply for int8, a multiply then an add for int4),
    /// so to the same values.
    fn widen_into(&self, out: &mut [f32]) {
        match *self {
            Self::F32(w) => out.copy_from_slice(w),
            Self::Bf16(w) => out.iter_mut().zip(w).for_each(|(o, &b)| *o = bf16_to_f32(b)),
            Self::Int8 { q, scales } => {
                for ((o, q), s) in
                    out.chunks_mut(INT8_GROUP * PANEL).zip(q.chunks(INT8_GROUP * PANEL)).zip(scales.chunks(PANEL))
                {
                    for (o, q) in o.chunks_mut(PANEL).zip(q.chunks(PANEL)) {
                        o.iter_mut().zip(q).zip(s).for_each(|((o, &q), &s)| *o = f32::from(q) * s);
                    }
                }
            }
            Self::Int4 { q, d, m } => {
                for (i, o) in out.chunks_mut(PANEL).enumerate() {
                    let (bytes, g) = (&q[i / 2 * PANEL..][..PANEL], i / INT8_GROUP * PANEL);
                    for (j, o) in o.iter_mut().enumerate() {
                        let code = if i % 2 == 0 { bytes[j] & 0xF } else { bytes[j] >> 4 };
                        *o = f32::from(code) * f16_to_f32(d[g + j]) + f16_to_f32(m[g + j]);
                    }
                }
            }
        }
    }
}

/// A bf16 bit pattern widened to f32 (exact).
#[inline(always)]
fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// An f16 bit pattern widened to f32 (exact).
#[inline(always)]
fn f16_to_f32(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

/// The instruction set the kernels run on, detected at runtime.
#[derive(Clone, Copy, Debug)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512(avx512::Avx512),
    #[cfg(target_arch = "x86_64")]
    Avx2(avx2::Avx2),
    Scalar,
}

impl Isa {
    /// The fastest path this CPU supports.
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(t) = avx512::Avx512::detect() {
                return Self::Avx512(t);
            }
            if let Some(t) = avx2::Avx2::detect() {
                return Self::Avx2(t);
            }
        }
        Self::Scalar
    }

    /// Every path this CPU supports, fastest first.
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut all = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            all.extend(avx512::Avx512::detect().map(Self::Avx512));
            all.extend(avx2::Avx2::detect().map(Self::Avx2));
        }
        all.push(Self::Scalar);
        all
    }

    /// `out[r][j] = Σ_i x[r][i] · w[i][j]` for all `m = out.len() / PANEL` rows of `job.x`.
    fn panel(self, job: &PanelJob<'_>, out: &mut [f32], scratch: &mut Vec<f32>) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512(t) => t.panel(job, out, scratch),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2(t) => t.panel(job, out, scratch),
            Self::Scalar => scalar::panel(job, out, scratch),
        }
    }
}

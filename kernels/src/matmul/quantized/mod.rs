//! `QuantizedLinear`: `y = x · Wᵀ` with the weight kept in its quantised blocks (int4 as GGUF's
//! Q4_1, int8 as Q8_0) and the activations quantised to int8 at each call, so the inner products
//! are integer dot products: on AVX-512 VNNI one `vpdpbusd` does 64 multiply-adds, against 16 for
//! an f32 FMA, and no weight is ever widened to f32.
//!
//! # Numerics
//!
//! Each row `r` of `x` is cut into groups of [`INT8_GROUP`] inputs (the weight's own groups). Per
//! group: `s = max|x| / 127`, codes `xq = round(x / s)` (half away from zero) clamped to `±127`,
//! and `S = s · f32(Σ xq)`, the sum of the quantised activations. Per output `c`, over the groups
//! in order, with `dot = Σ q · xq` an exact integer:
//!
//! ```text
//! int4 (w = q·d + m):  y = fma(m, S, fma(f32(dot), d·s, y))
//! int8 (w = q·d):      y = fma(f32(dot), d·s, y)
//! ```
//!
//! So `y` is the exact product of the weight with the quantised activations `s · xq` (up to f32
//! rounding of the group terms), as llama.cpp's Q4_1 × Q8_1 and Q8_0 × Q8_0 dots compute it. The
//! error is `Σ w · (s·xq − x)`, each activation off by at most half its group's step (taking the
//! minimum's term from the exact sum of `x` instead would weigh those errors by `w − m`, which is
//! not centred, and measured about twice the drift on the real model). A row's codes, scales and
//! sums depend on that row alone, the integer dots are exact, and every output's float operations
//! run in one fixed order, so a row's result does not depend on `m`, on the other rows, on the
//! thread count, nor on the instruction set (the AVX-512 VNNI path and the portable one give the
//! same bits). It is not the f32 product [`super::PackedLinear`] computes: this is a faster,
//! slightly rounder path.
//!
//! # Layout
//!
//! Panels of `PANEL` outputs as in `PackedLinear`, each stored group-major for `vpdpbusd`: a
//! 64-byte block holds 16 outputs × 4 consecutive inputs (output `c`'s four codes in bytes
//! `4c..4c + 4`). Int8 packs the 8 quads of a group as 8 blocks per 16 outputs; int4 packs quad
//! `b` in the low nibbles and quad `b + 4` in the high nibbles of 4 blocks.

#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(test)]
mod tests;

use candle_core::{bail, DType, Tensor};
use rayon::prelude::*;

use super::out::PanelOut;
use super::{Quantized, WeightFormat, INT8_GROUP, PANEL};

/// 16-lane vectors per panel.
const VECS: usize = PANEL / 16;
/// Inputs per `vpdpbusd` lane.
const QUAD: usize = 4;
/// Quads per group.
const QUADS: usize = INT8_GROUP / QUAD;
/// Bytes of one block: 16 outputs × one quad.
const BLOCK: usize = 16 * QUAD;

/// A projection whose weight stays quantised and whose activations are quantised to int8 per
/// call; see the module docs for the exact arithmetic.
pub struct QuantizedLinear {
    /// Output features.
    n: usize,
    /// Input features.
    k: usize,
    weights: Packed,
    isa: Isa,
}

/// The packed weight, `panels = n.div_ceil(PANEL)` panels back to back, outputs past `n` zero.
enum Packed {
    /// `q`: `[panels][groups][QUADS / 2][VECS][BLOCK]` (quads `b` and `b + 4` in the low and high
    /// nibbles); `d`, `m`: `[panels][groups][PANEL]`.
    Int4 { q: Vec<u8>, d: Vec<f32>, m: Vec<f32> },
    /// `q`: `[panels][groups][QUADS][VECS][BLOCK]`; `d`: `[panels][groups][PANEL]`; `bias`:
    /// `[panels][groups][PANEL]`, `128 · Σ q` over the group (the VNNI path feeds the activations
    /// as `xq + 128`, unsigned, and takes this back off).
    Int8 { q: Vec<i8>, d: Vec<f32>, bias: Vec<i32> },
}

/// One panel of [`Packed`].
#[derive(Clone, Copy)]
enum PanelRef<'a> {
    Int4 { q: &'a [u8], d: &'a [f32], m: &'a [f32] },
    Int8 { q: &'a [i8], d: &'a [f32], bias: &'a [i32] },
}

/// `x` quantised: `[m][groups * INT8_GROUP]` codes (signed for int4 weights; `xq + 128` for int8
/// weights, whose codes are the signed operand), and `[m][groups]` scales and sums.
struct Activations {
    q: Vec<u8>,
    s: Vec<f32>,
    sum: Vec<f32>,
}

impl QuantizedLinear {
    /// Packs a weight `[n, k]` (out, in) already quantised; the products use its codes and scales
    /// as they are.
    ///
    /// Errors if a dimension is zero, the lengths disagree with `[n, k]`, or an int4 code is over 15.
    pub fn from_quantized(w: &Quantized, n: usize, k: usize) -> candle_core::Result<Self> {
        if n == 0 || k == 0 {
            bail!("`w` must have non-zero dims, got [{n}, {k}]")
        }
        if let Err(e) = w.check(n, k) {
            bail!("quantised weight: {e}")
        }
        Ok(Self { n, k, weights: Packed::new(w, n, k), isa: Isa::detect() })
    }

    /// Quantises `w` (`[n, k]` (out, in), any float dtype) to `format` (int8 or int4, as
    /// [`super::PackedLinear`] would) and packs it.
    ///
    /// Errors if `format` is not int8 or int4, or `w` is not a non-empty 2-D float tensor.
    pub fn from_tensor(w: &Tensor, format: WeightFormat) -> candle_core::Result<Self> {
        let (n, k) = w.dims2()?;
        if n == 0 || k == 0 || !w.dtype().is_float() {
            bail!("`w` must be a non-empty float matrix, got {:?} {:?}", w.dims(), w.dtype())
        }
        let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let q = match format {
            WeightFormat::Int4 => Quantized::int4(&data, n, k),
            WeightFormat::Int8 => Quantized::int8(&data, n, k),
            other => bail!("quantised activations need int8 or int4 weights, got {other:?}"),
        };
        Self::from_quantized(&q, n, k)
    }

    /// `y = x · Wᵀ`: `x` is `[m, k]` f32 on the CPU (any `m`, including 0); returns `[m, n]` f32.
    ///
    /// Errors, without panicking, if `x` is not 2-D, not f32, not on the CPU, or has the wrong `k`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        super::out::forward_rows(x, self.k, self.n, |xs, m| self.matmul(xs, m))
    }

    /// Output features `n`.
    pub fn out_features(&self) -> usize {
        self.n
    }

    /// Input features `k`.
    pub fn in_features(&self) -> usize {
        self.k
    }

    /// The weight's format: int8 or int4.
    pub fn format(&self) -> WeightFormat {
        match self.weights {
            Packed::Int4 { .. } => WeightFormat::Int4,
            Packed::Int8 { .. } => WeightFormat::Int8,
        }
    }

    /// Bytes held by the packed weight and its scales, padding included.
    pub fn weight_bytes(&self) -> usize {
        match &self.weights {
            Packed::Int4 { q, d, m } => q.len() + (d.len() + m.len()) * 4,
            Packed::Int8 { q, d, bias } => q.len() + (d.len() + bias.len()) * 4,
        }
    }

    /// Whether this CPU runs the integer dots in SIMD (AVX-512 VNNI); elsewhere the portable path
    /// gives the same bits, slowly.
    pub fn accelerated() -> bool {
        !matches!(Isa::detect(), Isa::Portable)
    }

    fn groups(&self) -> usize {
        self.k.div_ceil(INT8_GROUP)
    }

    /// `x`: `[m, k]` row-major. Returns `[m, n]` row-major.
    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let acts = Activations::new(x, m, self.k, matches!(self.weights, Packed::Int8 { .. }), self.isa);
        let groups = self.groups();
        super::out::by_panels(
            m,
            self.n,
            self.k,
            || (),
            |(), p, out| {
                self.isa.panel(self.weights.panel(p, groups), &acts, groups, out);
            },
        )
    }
}

impl Packed {
    fn new(w: &Quantized, n: usize, k: usize) -> Self {
        let groups = k.div_ceil(INT8_GROUP);
        let panels = n.div_ceil(PANEL);
        // Per-output, per-group values, zero past `n`.
        let per_group = |at: &dyn Fn(usize, usize) -> f32| -> Vec<f32> {
            let mut out = Vec::with_capacity(panels * groups * PANEL);
            for p in 0..panels {
                for g in 0..groups {
                    out.extend((p * PANEL..(p + 1) * PANEL).map(|c| if c < n { at(c, g) } else { 0.0 }));
                }
            }
            out
        };
        match w {
            Quantized::Int4 { codes, d, m } => {
                let code = |c: usize, i: usize| if c < n && i < k { codes[c * k + i] } else { 0 };
                let mut q = Vec::with_capacity(panels * groups * (QUADS / 2) * VECS * BLOCK);
                for p in 0..panels {
                    for g in 0..groups {
                        for b in 0..QUADS / 2 {
                            for j in 0..VECS {
                                for c in 0..16 {
                                    let col = p * PANEL + 16 * j + c;
                                    let lo = g * INT8_GROUP + QUAD * b;
                                    let hi = lo + INT8_GROUP / 2;
                                    q.extend((0..QUAD).map(|t| code(col, lo + t) | (code(col, hi + t) << 4)));
                                }
                            }
                        }
                    }
                }
                Self::Int4 {
                    q,
                    d: per_group(&|c, g| d[c * groups + g].to_f32()),
                    m: per_group(&|c, g| m[c * groups + g].to_f32()),
                }
            }
            Quantized::Int8 { codes, scales } => {
                let code = |c: usize, i: usize| if c < n && i < k { codes[c * k + i] } else { 0 };
                let mut q = Vec::with_capacity(panels * groups * QUADS * VECS * BLOCK);
                for p in 0..panels {
                    for g in 0..groups {
                        for b in 0..QUADS {
                            for j in 0..VECS {
                                for c in 0..16 {
                                    let col = p * PANEL + 16 * j + c;
                                    q.extend((0..QUAD).map(|t| code(col, g * INT8_GROUP + QUAD * b + t)));
                                }
                            }
                        }
                    }
                }
                let sum =
                    |c: usize, g: usize| (0..INT8_GROUP).map(|t| i32::from(code(c, g * INT8_GROUP + t))).sum::<i32>();
                let mut bias = Vec::with_capacity(panels * groups * PANEL);
                for p in 0..panels {
                    for g in 0..groups {
                        bias.extend((p * PANEL..(p + 1) * PANEL).map(|c| 128 * sum(c, g)));
                    }
                }
                Self::Int8 { q, d: per_group(&|c, g| scales[c * groups + g]), bias }
            }
        }
    }

    /// Panel `p` of a packing with `groups` groups along `k`.
    fn panel(&self, p: usize, groups: usize) -> PanelRef<'_> {
        let s_len = groups * PANEL;
        match self {
            Self::Int4 { q, d, m } => {
                let q_len = groups * (QUADS / 2) * VECS * BLOCK;
                PanelRef::Int4 { q: &q[p * q_len..][..q_len], d: &d[p * s_len..][..s_len], m: &m[p * s_len..][..s_len] }
            }
            Self::Int8 { q, d, bias } => {
                let q_len = groups * QUADS * VECS * BLOCK;
                PanelRef::Int8 {
                    q: &q[p * q_len..][..q_len],
                    d: &d[p * s_len..][..s_len],
                    bias: &bias[p * s_len..][..s_len],
                }
            }
        }
    }
}

/// One row's activations with its codes, scales and sums to fill.
type RowOut<'a> = ((&'a [f32], &'a mut [u8]), (&'a mut [f32], &'a mut [f32]));

impl Activations {
    /// Quantises `x` (`[m, k]`); `offset` stores `xq + 128` (for int8 weights) instead of `xq`.
    /// Rows are independent, so large batches are split over threads without changing a bit.
    fn new(x: &[f32], m: usize, k: usize, offset: bool, isa: Isa) -> Self {
        let groups = k.div_ceil(INT8_GROUP);
        let width = groups * INT8_GROUP;
        let (mut q, mut s, mut sum) = (vec![0u8; m * width], vec![0.0f32; m * groups], vec![0.0f32; m * groups]);
        let row = |((x, q), (s, sum)): RowOut<'_>| {
            for (g, (q, (s, sum))) in q.chunks_exact_mut(INT8_GROUP).zip(s.iter_mut().zip(sum)).enumerate() {
                let xs = &x[g * INT8_GROUP..x.len().min((g + 1) * INT8_GROUP)];
                (*s, *sum) = isa.quantise_group(xs, q, offset);
            }
        };
        if m * k >= 1 << 14 {
            let (xs, qs) = (x.par_chunks_exact(k), q.par_chunks_exact_mut(width));
            xs.zip(qs).zip(s.par_chunks_exact_mut(groups).zip(sum.par_chunks_exact_mut(groups))).for_each(row);
        } else {
            let (xs, qs) = (x.chunks_exact(k), q.chunks_exact_mut(width));
            xs.zip(qs).zip(s.chunks_exact_mut(groups).zip(sum.chunks_exact_mut(groups))).for_each(row);
        }
        Self { q, s, sum }
    }

    /// Whether these are `m` rows of `groups` groups.
    fn fits(&self, groups: usize, m: usize) -> bool {
        self.q.len() == m * groups * INT8_GROUP && self.s.len() == m * groups && self.sum.len() == m * groups
    }
}

/// One group of up to [`INT8_GROUP`] activations (zero past the end) into `q` (`INT8_GROUP` long):
/// returns the scale `s = max|x| / 127` and `S = s · f32(Σ codes)`. Codes are `x / s` rounded half
/// away from zero, clamped to ±127, stored plus 128 when `offset`.
#[inline]
fn quantise_group(xs: &[f32], q: &mut [u8], offset: bool) -> (f32, f32) {
    const HALF: usize = INT8_GROUP / 2;
    let mut v = [0.0f32; INT8_GROUP];
    v[..xs.len()].copy_from_slice(xs);
    let mut amax = [0.0f32; HALF];
    for t in 0..HALF {
        amax[t] = v[t].abs().max(v[t + HALF].abs());
    }
    let amax = amax.iter().fold(0.0f32, |a, &b| a.max(b));
    let scale = amax / 127.0;
    let inv = if scale == 0.0 { 0.0 } else { 1.0 / scale };
    let pad = if offset { 128u8 } else { 0 };
    let mut total = 0i32;
    for (q, &x) in q.iter_mut().zip(&v) {
        let y = x * inv;
        // The cast truncates toward zero and saturates (NaN becomes 0), so nothing wraps.
        let code = ((y + 0.5f32.copysign(y)) as i32).clamp(-127, 127);
        total += code;
        *q = (code as i8 as u8).wrapping_add(pad);
    }
    (scale, scale * total as f32)
}

/// The instruction set the kernels run on, detected at runtime.
#[derive(Clone, Copy, Debug)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Vnni(avx512::Vnni),
    Portable,
}

impl Isa {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(t) = avx512::Vnni::detect() {
            return Self::Vnni(t);
        }
        Self::Portable
    }

    /// Every path this CPU supports, fastest first.
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut all = Vec::new();
        #[cfg(target_arch = "x86_64")]
        all.extend(avx512::Vnni::detect().map(Self::Vnni));
        all.push(Self::Portable);
        all
    }

    /// [`quantise_group`] on this instruction set (the same bits).
    #[inline]
    fn quantise_group(self, xs: &[f32], q: &mut [u8], offset: bool) -> (f32, f32) {
        assert!(xs.len() <= INT8_GROUP && q.len() == INT8_GROUP, "quantised group shapes");
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Vnni(t) => t.quantise_group(xs, q, offset),
            Self::Portable => quantise_group(xs, q, offset),
        }
    }

    /// `out[r][j]` for every row of `acts` through panel `w` (`out`: `m` rows).
    fn panel(self, w: PanelRef<'_>, acts: &Activations, groups: usize, out: PanelOut<'_>) {
        assert!(w.fits(groups) && acts.fits(groups, out.rows()), "quantised matmul shapes");
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Vnni(t) => t.panel(w, acts, groups, out),
            Self::Portable => portable(w, acts, groups, out),
        }
    }
}

impl PanelRef<'_> {
    /// Whether the slices have the lengths a panel of `groups` groups needs.
    fn fits(&self, groups: usize) -> bool {
        let s_len = groups * PANEL;
        match self {
            Self::Int4 { q, d, m } => {
                q.len() == groups * (QUADS / 2) * VECS * BLOCK && d.len() == s_len && m.len() == s_len
            }
            Self::Int8 { q, d, bias } => {
                q.len() == groups * QUADS * VECS * BLOCK && d.len() == s_len && bias.len() == s_len
            }
        }
    }
}

/// The module docs' arithmetic, written out: the yardstick the SIMD path must equal bit for bit.
fn portable(w: PanelRef<'_>, acts: &Activations, groups: usize, mut panel: PanelOut<'_>) {
    let width = groups * INT8_GROUP;
    for r in 0..panel.rows() {
        let mut out = [0.0f32; PANEL];
        for g in 0..groups {
            let xq = &acts.q[r * width + g * INT8_GROUP..][..INT8_GROUP];
            let (s, sum) = (acts.s[r * groups + g], acts.sum[r * groups + g]);
            for (col, y) in out.iter_mut().enumerate() {
                let (j, c) = (col / 16, col % 16);
                let at = g * PANEL + col;
                match w {
                    PanelRef::Int4 { q, d, m } => {
                        let mut dot = 0i32;
                        for (b, quad) in xq.chunks_exact(QUAD).enumerate() {
                            let block =
                                &q[((g * (QUADS / 2) + b % (QUADS / 2)) * VECS + j) * BLOCK + QUAD * c..][..QUAD];
                            for (&byte, &x) in block.iter().zip(quad) {
                                let code = if b < QUADS / 2 { byte & 0xF } else { byte >> 4 };
                                dot += i32::from(code) * i32::from(x as i8);
                            }
                        }
                        *y = (dot as f32).mul_add(d[at] * s, *y);
                        *y = m[at].mul_add(sum, *y);
                    }
                    PanelRef::Int8 { q, d, bias } => {
                        let mut dot = 0i32;
                        for (b, quad) in xq.chunks_exact(QUAD).enumerate() {
                            let block = &q[((g * QUADS + b) * VECS + j) * BLOCK + QUAD * c..][..QUAD];
                            for (&code, &x) in block.iter().zip(quad) {
                                dot += i32::from(code) * i32::from(x);
                            }
                        }
                        *y = ((dot - bias[at]) as f32).mul_add(d[at] * s, *y);
                    }
                }
            }
        }
        panel.write_row(r, &out);
    }
}

//! Packing a `[n, k]` weight into k-major panels of `PANEL` outputs, in each format.

use half::{bf16, f16};

use super::{PanelRef, WeightFormat, INT8_GROUP, PANEL};

/// The packed weight: `panels = n.div_ceil(PANEL)` panels back to back, outputs past `n` zero.
pub(super) enum Packed {
    /// `[panels][k][PANEL]`
    F32(Vec<f32>),
    /// `[panels][k][PANEL]` bf16 bit patterns.
    Bf16(Vec<u16>),
    /// `q`: `[panels][k][PANEL]`; `scales`: `[panels][groups][PANEL]`, `groups = k.div_ceil(INT8_GROUP)`.
    Int8 { q: Vec<i8>, scales: Vec<f32> },
    /// `q`: `[panels][k.div_ceil(2)][PANEL]`, two steps of `k` a byte (see [`PanelRef::Int4`]);
    /// `d`, `m`: `[panels][groups][PANEL]` f16 bit patterns.
    Int4 { q: Vec<u8>, d: Vec<u16>, m: Vec<u16> },
}

/// A weight already quantised, `[n, k]` row-major codes with one scale (and minimum) per output
/// row and group of [`INT8_GROUP`] along `k`, `[n][k.div_ceil(INT8_GROUP)]`.
#[derive(Clone, Debug, PartialEq)]
pub enum Quantized {
    /// `w = f32(code) * scale`.
    Int8 { codes: Vec<i8>, scales: Vec<f32> },
    /// `w = f32(code) * f32(d) + f32(m)` (two rounded operations, in that order), codes in
    /// `0..=15`: GGUF's Q4_1.
    Int4 { codes: Vec<u8>, d: Vec<f16>, m: Vec<f16> },
}

impl Quantized {
    /// Checks the lengths for an `[n, k]` weight and the code range; the message names the fault.
    pub(super) fn check(&self, n: usize, k: usize) -> Result<(), String> {
        let groups = n * k.div_ceil(INT8_GROUP);
        let (codes, scales) = match self {
            Self::Int8 { codes, scales } => (codes.len(), scales.len()),
            Self::Int4 { codes, d, m } => {
                if d.len() != m.len() {
                    return Err(format!("{} int4 scales but {} minimums", d.len(), m.len()));
                }
                if let Some(c) = codes.iter().find(|&&c| c > 15) {
                    return Err(format!("int4 code {c} is over 15"));
                }
                (codes.len(), d.len())
            }
        };
        if codes != n * k {
            return Err(format!("{codes} codes for a [{n}, {k}] weight"));
        }
        if scales != groups {
            return Err(format!("{scales} scales for a [{n}, {k}] weight (want {groups})"));
        }
        Ok(())
    }

    /// Quantises `w` (`[n, k]` row-major) symmetrically per group: `scale = max|w| / 127`, codes
    /// rounded to nearest (GGUF's Q8_0 in f32 scales).
    pub(super) fn int8(w: &[f32], n: usize, k: usize) -> Self {
        let mut codes = Vec::with_capacity(n * k);
        let mut scales = Vec::with_capacity(n * k.div_ceil(INT8_GROUP));
        for row in w.chunks(k).take(n) {
            for group in row.chunks(INT8_GROUP) {
                let scale = int8_scale(group);
                codes.extend(group.iter().map(|&v| quantise(v, scale)));
                scales.push(scale);
            }
        }
        Self::Int8 { codes, scales }
    }

    /// Quantises `w` (`[n, k]` row-major) the way GGUF's Q4_1 does: per group, `d = (max - min)
    /// / 15` and `m = min` (both rounded to f16), codes rounded to nearest.
    pub(super) fn int4(w: &[f32], n: usize, k: usize) -> Self {
        let (mut codes, mut ds, mut ms) = (Vec::with_capacity(n * k), Vec::new(), Vec::new());
        for row in w.chunks(k).take(n) {
            for group in row.chunks(INT8_GROUP) {
                let (lo, hi) = group.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
                let (d, m) = (f16::from_f32((hi - lo) / 15.0), f16::from_f32(lo));
                let (df, mf) = (d.to_f32(), m.to_f32());
                let inv = if df == 0.0 { 0.0 } else { 1.0 / df };
                // The cast saturates (and maps NaN to 0), so no value can wrap.
                codes.extend(group.iter().map(|&v| ((v - mf) * inv).round().clamp(0.0, 15.0) as u8));
                ds.push(d);
                ms.push(m);
            }
        }
        Self::Int4 { codes, d: ds, m: ms }
    }
}

impl Packed {
    /// Packs `w` (`[n, k]` row-major) in `format`.
    pub(super) fn new(w: &[f32], n: usize, k: usize, format: WeightFormat) -> Self {
        debug_assert_eq!(w.len(), n * k);
        match format {
            WeightFormat::F32 => Self::F32(panels(n, k, |c, i| w[c * k + i])),
            WeightFormat::Bf16 => Self::Bf16(panels(n, k, |c, i| bf16::from_f32(w[c * k + i]).to_bits())),
            WeightFormat::Int8 => Self::quantized(&Quantized::int8(w, n, k), n, k),
            WeightFormat::Int4 => Self::quantized(&Quantized::int4(w, n, k), n, k),
        }
    }

    /// Packs an already quantised weight (checked by [`Quantized::check`]).
    pub(super) fn quantized(w: &Quantized, n: usize, k: usize) -> Self {
        let groups = k.div_ceil(INT8_GROUP);
        match w {
            Quantized::Int8 { codes, scales } => Self::Int8 {
                q: panels(n, k, |c, i| codes[c * k + i]),
                scales: panels(n, groups, |c, g| scales[c * groups + g]),
            },
            Quantized::Int4 { codes, d, m } => {
                let code = |c: usize, i: usize| if i < k { codes[c * k + i] } else { 0 };
                Self::Int4 {
                    q: panels(n, k.div_ceil(2), |c, i| code(c, 2 * i) | (code(c, 2 * i + 1) << 4)),
                    d: panels(n, groups, |c, g| d[c * groups + g].to_bits()),
                    m: panels(n, groups, |c, g| m[c * groups + g].to_bits()),
                }
            }
        }
    }

    /// Panel `p` of a `k`-deep packing.
    pub(super) fn panel(&self, p: usize, k: usize) -> PanelRef<'_> {
        let len = k * PANEL;
        match self {
            Self::F32(w) => PanelRef::F32(&w[p * len..][..len]),
            Self::Bf16(w) => PanelRef::Bf16(&w[p * len..][..len]),
            Self::Int8 { q, scales } => {
                let s_len = k.div_ceil(INT8_GROUP) * PANEL;
                PanelRef::Int8 { q: &q[p * len..][..len], scales: &scales[p * s_len..][..s_len] }
            }
            Self::Int4 { q, d, m } => {
                let (q_len, s_len) = (k.div_ceil(2) * PANEL, k.div_ceil(INT8_GROUP) * PANEL);
                PanelRef::Int4 { q: &q[p * q_len..][..q_len], d: &d[p * s_len..][..s_len], m: &m[p * s_len..][..s_len] }
            }
        }
    }

    /// Bytes of weights and scales held.
    pub(super) fn bytes(&self) -> usize {
        match self {
            Self::F32(w) => w.len() * 4,
            Self::Bf16(w) => w.len() * 2,
            Self::Int8 { q, scales } => q.len() + scales.len() * 4,
            Self::Int4 { q, d, m } => q.len() + (d.len() + m.len()) * 2,
        }
    }

    /// The `[n, k]` row-major f32 weight the kernels compute with.
    pub(super) fn unpack(&self, n: usize, k: usize) -> Vec<f32> {
        let mut panel = vec![0.0; k * PANEL];
        let mut w = vec![0.0; n * k];
        for (p, rows) in w.chunks_mut(PANEL * k).enumerate() {
            self.panel(p, k).widen_into(&mut panel);
            for (j, row) in rows.chunks_mut(k).enumerate() {
                row.iter_mut().enumerate().for_each(|(i, v)| *v = panel[i * PANEL + j]);
            }
        }
        w
    }
}

/// `[panels][depth][PANEL]` with element `(i, j)` of panel `p` equal to `at(p * PANEL + j, i)`,
/// or zero past the last of `n` outputs.
fn panels<T: Copy + Default>(n: usize, depth: usize, at: impl Fn(usize, usize) -> T) -> Vec<T> {
    let count = n.div_ceil(PANEL);
    let mut out = Vec::with_capacity(count * depth * PANEL);
    for p in 0..count {
        for i in 0..depth {
            out.extend((p * PANEL..(p + 1) * PANEL).map(|c| if c < n { at(c, i) } else { T::default() }));
        }
    }
    out
}

/// The symmetric scale of one group: `max|w| / 127`, or 0 for an all-zero group.
fn int8_scale(group: &[f32]) -> f32 {
    group.iter().fold(0.0f32, |m, w| m.max(w.abs())) / 127.0
}

/// `w / scale` rounded to nearest and clamped to `[-127, 127]`; 0 where the scale is 0.
fn quantise(w: f32, scale: f32) -> i8 {
    if scale == 0.0 {
        return 0;
    }
    // The cast saturates (and maps NaN to 0), so no value can wrap.
    (w / scale).round().clamp(-127.0, 127.0) as i8
}

//! Packing a `[n, k]` weight into k-major panels of `PANEL` outputs, in each format.

use half::bf16;

use super::{PanelRef, WeightFormat, INT8_GROUP, PANEL};

/// The packed weight: `panels = n.div_ceil(PANEL)` panels back to back, outputs past `n` zero.
pub(super) enum Packed {
    /// `[panels][k][PANEL]`
    F32(Vec<f32>),
    /// `[panels][k][PANEL]` bf16 bit patterns.
    Bf16(Vec<u16>),
    /// `q`: `[panels][k][PANEL]`; `scales`: `[panels][groups][PANEL]`, `groups = k.div_ceil(INT8_GROUP)`.
    Int8 { q: Vec<i8>, scales: Vec<f32> },
}

impl Packed {
    /// Packs `w` (`[n, k]` row-major) in `format`.
    pub(super) fn new(w: &[f32], n: usize, k: usize, format: WeightFormat) -> Self {
        debug_assert_eq!(w.len(), n * k);
        match format {
            WeightFormat::F32 => Self::F32(panels(n, k, |c, i| w[c * k + i])),
            WeightFormat::Bf16 => Self::Bf16(panels(n, k, |c, i| bf16::from_f32(w[c * k + i]).to_bits())),
            WeightFormat::Int8 => {
                let groups = k.div_ceil(INT8_GROUP);
                // [n][groups]
                let row_scales: Vec<f32> = w.chunks(k).flat_map(|row| row.chunks(INT8_GROUP).map(int8_scale)).collect();
                let q = panels(n, k, |c, i| quantise(w[c * k + i], row_scales[c * groups + i / INT8_GROUP]));
                let scales = panels(n, groups, |c, g| row_scales[c * groups + g]);
                Self::Int8 { q, scales }
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
        }
    }

    /// Bytes of weights and scales held.
    pub(super) fn bytes(&self) -> usize {
        match self {
            Self::F32(w) => w.len() * 4,
            Self::Bf16(w) => w.len() * 2,
            Self::Int8 { q, scales } => q.len() + scales.len() * 4,
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

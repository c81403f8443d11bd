//! The AVX-512 VNNI path: register tiles of up to `ROWS` rows × one panel (three vectors of 16
//! outputs), integer dots with `vpdpbusd` per group, then the group's float terms.
//!
//! Each output's integer dot is exact whatever order the quads are added in, and its float
//! accumulator takes the groups in order with the module docs' operations, so the tile height never
//! changes bits and the portable path is the reference.

use std::arch::x86_64::*;

use super::{Activations, PanelOut, PanelRef, BLOCK, INT8_GROUP, PANEL, QUAD, QUADS, VECS};

/// Rows per register tile: 4 rows × 3 vectors need 12 integer and 12 float accumulators.
const ROWS: usize = 4;
/// How far ahead of its loads a tile prefetches the packed weights, in bytes (as the f32 kernels).
const PREFETCH: usize = 4096;

/// Proof that this CPU has AVX-512F, BW and VNNI: only [`Vnni::detect`] makes one.
#[derive(Clone, Copy, Debug)]
pub(super) struct Vnni(());

impl Vnni {
    /// `Some` when the running CPU supports AVX-512F, AVX-512BW and AVX-512 VNNI.
    pub(super) fn detect() -> Option<Self> {
        let ok = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni");
        ok.then_some(Self(()))
    }

    /// Every row of `acts` through panel `w` into `out`. The caller has checked that `w` is a
    /// panel of `groups` groups and `acts` holds `out.rows()` rows of them.
    pub(super) fn panel(self, w: PanelRef<'_>, acts: &Activations, groups: usize, out: PanelOut<'_>) {
        // SAFETY: `self` exists only where the features were detected; the shapes were checked by
        // the caller (`Isa::panel` asserts them), and every offset below stays within them.
        unsafe { panel(w, acts, groups, out) }
    }
}

impl Vnni {
    /// `super::quantise_group` (same bits): `xs` is at most `INT8_GROUP` long, `q` exactly.
    #[inline]
    pub(super) fn quantise_group(self, xs: &[f32], q: &mut [u8], offset: bool) -> (f32, f32) {
        debug_assert!(xs.len() <= INT8_GROUP && q.len() == INT8_GROUP);
        // SAFETY: the features were detected; the masked loads read `xs.len()` floats and the
        // stores write `INT8_GROUP` bytes, which the caller checked.
        unsafe { quantise_group(xs, q, offset) }
    }
}

/// See [`Vnni::quantise_group`]: the portable body's operations on two vectors of 16.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn quantise_group(xs: &[f32], q: &mut [u8], offset: bool) -> (f32, f32) {
    let len = xs.len();
    let mask = |from: usize| -> __mmask16 {
        let n = len.saturating_sub(from).min(16);
        ((1u32 << n) - 1) as __mmask16
    };
    let a = _mm512_maskz_loadu_ps(mask(0), xs.as_ptr());
    let b = _mm512_maskz_loadu_ps(mask(16), xs.as_ptr().wrapping_add(16));
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    let scale = amax / 127.0;
    let inv = _mm512_set1_ps(if scale == 0.0 { 0.0 } else { 1.0 / scale });
    let (half, sign) = (_mm512_set1_ps(0.5), _mm512_set1_ps(-0.0));
    let pad = _mm512_set1_epi32(if offset { 128 } else { 0 });
    let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
    let mut total = _mm512_setzero_si512();
    for (v, at) in [(a, 0), (b, 16)] {
        let y = _mm512_mul_ps(v, inv);
        let r = _mm512_add_ps(y, _mm512_or_ps(half, _mm512_and_ps(y, sign)));
        // Truncating convert; out-of-range and NaN lanes give i32::MIN, which the clamp maps to
        // -127 where the portable cast gives 0 or ±127: only for non-finite activations.
        let code = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvttps_epi32(r), lo), hi);
        total = _mm512_add_epi32(total, code);
        _mm_storeu_si128(q.as_mut_ptr().add(at).cast(), _mm512_cvtepi32_epi8(_mm512_add_epi32(code, pad)));
    }
    (scale, scale * _mm512_reduce_add_epi32(total) as f32)
}

/// Pointers to `R` consecutive rows of quantised activations.
#[derive(Clone, Copy)]
struct Rows {
    /// Row 0's codes; row `r` starts `r * groups * INT8_GROUP` bytes on.
    q: *const u8,
    /// Row 0's scales and sums; row `r` starts `r * groups` on.
    s: *const f32,
    sum: *const f32,
    groups: usize,
}

impl Rows {
    /// The four codes of quad `b` (counted from the group's start) in group `g` of row `r`, as one
    /// broadcast lane.
    #[inline(always)]
    unsafe fn quad(self, r: usize, g: usize, b: usize) -> __m512i {
        let at = self.q.add((r * self.groups + g) * INT8_GROUP + QUAD * b);
        _mm512_set1_epi32(at.cast::<i32>().read_unaligned())
    }

    #[inline(always)]
    unsafe fn scale(self, r: usize, g: usize) -> __m512 {
        _mm512_set1_ps(*self.s.add(r * self.groups + g))
    }

    #[inline(always)]
    unsafe fn sum(self, r: usize, g: usize) -> __m512 {
        _mm512_set1_ps(*self.sum.add(r * self.groups + g))
    }
}

/// See [`Vnni::panel`]. Safety: the features are available and the shapes agree.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn panel(w: PanelRef<'_>, acts: &Activations, groups: usize, mut out: PanelOut<'_>) {
    let (m, stride) = (out.rows(), out.stride());
    let mut r = 0;
    while r < m {
        let rows = Rows {
            q: acts.q.as_ptr().add(r * groups * INT8_GROUP),
            s: acts.s.as_ptr().add(r * groups),
            sum: acts.sum.as_ptr().add(r * groups),
            groups,
        };
        let o = Out { ptr: out.as_mut_ptr().add(r * stride), stride };
        let height = (m - r).min(ROWS);
        match (w, height) {
            (PanelRef::Int4 { q, d, m }, 1) => int4::<1>(q.as_ptr(), d.as_ptr(), m.as_ptr(), rows, o),
            (PanelRef::Int4 { q, d, m }, 2) => int4::<2>(q.as_ptr(), d.as_ptr(), m.as_ptr(), rows, o),
            (PanelRef::Int4 { q, d, m }, 3) => int4::<3>(q.as_ptr(), d.as_ptr(), m.as_ptr(), rows, o),
            (PanelRef::Int4 { q, d, m }, _) => int4::<ROWS>(q.as_ptr(), d.as_ptr(), m.as_ptr(), rows, o),
            (PanelRef::Int8 { q, d, bias }, 1) => int8::<1>(q.as_ptr(), d.as_ptr(), bias.as_ptr(), rows, o),
            (PanelRef::Int8 { q, d, bias }, 2) => int8::<2>(q.as_ptr(), d.as_ptr(), bias.as_ptr(), rows, o),
            (PanelRef::Int8 { q, d, bias }, 3) => int8::<3>(q.as_ptr(), d.as_ptr(), bias.as_ptr(), rows, o),
            (PanelRef::Int8 { q, d, bias }, _) => int8::<ROWS>(q.as_ptr(), d.as_ptr(), bias.as_ptr(), rows, o),
        }
        r += height;
    }
}

/// Prefetches into L1 the `VECS` blocks `PREFETCH` bytes past `at` (a hint: may point past the
/// panel).
#[inline(always)]
unsafe fn prefetch(at: *const u8) {
    for line in 0..VECS {
        _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH + line * BLOCK).cast());
    }
}

/// Where a tile's rows go: row `r` at `ptr + r * stride`, `PANEL` floats each.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    stride: usize,
}

/// Writes the `R × VECS` accumulators to `out`'s first `R` rows.
#[inline(always)]
unsafe fn store<const R: usize>(acc: &[[__m512; VECS]; R], out: Out) {
    for (r, acc) in acc.iter().enumerate() {
        for (j, &a) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.ptr.add(r * out.stride + 16 * j), a);
        }
    }
}

/// `R` rows through an int4 panel. Codes are the unsigned operand, activations the signed one.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn int4<const R: usize>(q: *const u8, d: *const f32, mn: *const f32, x: Rows, out: Out) {
    let mut acc = [[_mm512_setzero_ps(); VECS]; R];
    let low = _mm512_set1_epi8(0x0F);
    for g in 0..x.groups {
        let mut dot = [[_mm512_setzero_si512(); VECS]; R];
        for b in 0..QUADS / 2 {
            let blocks = q.add((g * (QUADS / 2) + b) * VECS * BLOCK);
            prefetch(blocks);
            let (mut lo, mut hi) = ([_mm512_setzero_si512(); VECS], [_mm512_setzero_si512(); VECS]);
            for j in 0..VECS {
                let raw = _mm512_loadu_si512(blocks.add(j * BLOCK).cast());
                lo[j] = _mm512_and_si512(raw, low);
                hi[j] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low);
            }
            for (r, dot) in dot.iter_mut().enumerate() {
                let (xa, xb) = (x.quad(r, g, b), x.quad(r, g, b + QUADS / 2));
                for j in 0..VECS {
                    dot[j] = _mm512_dpbusd_epi32(dot[j], lo[j], xa);
                    dot[j] = _mm512_dpbusd_epi32(dot[j], hi[j], xb);
                }
            }
        }
        for (r, (acc, dot)) in acc.iter_mut().zip(&dot).enumerate() {
            let (s, sum) = (x.scale(r, g), x.sum(r, g));
            for j in 0..VECS {
                let dj = _mm512_loadu_ps(d.add(g * PANEL + 16 * j));
                let mj = _mm512_loadu_ps(mn.add(g * PANEL + 16 * j));
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[j]), _mm512_mul_ps(dj, s), acc[j]);
                acc[j] = _mm512_fmadd_ps(mj, sum, acc[j]);
            }
        }
    }
    store(&acc, out);
}

/// `R` rows through an int8 panel. Activations (as `xq + 128`) are the unsigned operand, codes the
/// signed one; `bias` takes the offset's `128 · Σ q` back off.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn int8<const R: usize>(q: *const i8, d: *const f32, bias: *const i32, x: Rows, out: Out) {
    let mut acc = [[_mm512_setzero_ps(); VECS]; R];
    for g in 0..x.groups {
        let mut dot = [[_mm512_setzero_si512(); VECS]; R];
        for b in 0..QUADS {
            let blocks = q.add((g * QUADS + b) * VECS * BLOCK).cast::<u8>();
            prefetch(blocks);
            let mut wv = [_mm512_setzero_si512(); VECS];
            for (j, wv) in wv.iter_mut().enumerate() {
                *wv = _mm512_loadu_si512(blocks.add(j * BLOCK).cast());
            }
            for (r, dot) in dot.iter_mut().enumerate() {
                let xa = x.quad(r, g, b);
                for j in 0..VECS {
                    dot[j] = _mm512_dpbusd_epi32(dot[j], xa, wv[j]);
                }
            }
        }
        for (r, (acc, dot)) in acc.iter_mut().zip(&dot).enumerate() {
            let s = x.scale(r, g);
            for j in 0..VECS {
                let dj = _mm512_loadu_ps(d.add(g * PANEL + 16 * j));
                let bj = _mm512_loadu_si512(bias.add(g * PANEL + 16 * j).cast());
                let exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(dot[j], bj));
                acc[j] = _mm512_fmadd_ps(exact, _mm512_mul_ps(dj, s), acc[j]);
            }
        }
    }
    store(&acc, out);
}

//! The AVX2+FMA path: register tiles of up to `ROWS` rows × half a panel (three ymm vectors).
//!
//! With 16 ymm registers a tile holds `4 × 3` accumulators, 3 weights and 1 broadcast, so each
//! panel is run as two halves of `HALF` outputs. Each accumulator lane is one output's FMA chain,
//! exactly as on the AVX-512 path, so both give the same bits.

use std::arch::x86_64::*;

use super::{PanelJob, PanelRef, DEQUANT_MIN_ROWS, INT8_GROUP, PANEL};

/// Rows per register tile.
const ROWS: usize = 4;
/// Outputs per register tile: half a panel.
const HALF: usize = PANEL / 2;
/// 8-lane vectors per tile.
const VECS: usize = HALF / 8;

/// Proof that this CPU has AVX2 and FMA: only [`Avx2::detect`] makes one.
#[derive(Clone, Copy, Debug)]
pub(super) struct Avx2(());

impl Avx2 {
    /// `Some` when the running CPU supports AVX2 and FMA.
    pub(super) fn detect() -> Option<Self> {
        (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")).then_some(Self(()))
    }

    /// `out[r][j] = Σ_i x[r][i] · w[i][j]` for all `m = out.len() / PANEL` rows of `job.x`.
    pub(super) fn panel(self, job: &PanelJob<'_>, out: &mut [f32], scratch: &mut Vec<f32>) {
        // The raw-pointer reads below rely on these; `PackedLinear` always passes them.
        assert!(job.fits(out.len()), "matmul panel shapes");
        // SAFETY: `self` exists only where avx2 and fma were detected, and the slice lengths that
        // every pointer offset below stays within were checked above.
        unsafe { panel(job.x, job.k, job.w, out, scratch) }
    }
}

/// See [`Avx2::panel`]. Safety: avx2 and fma are available; `job.fits(out.len())`.
#[target_feature(enable = "avx2,fma")]
unsafe fn panel(x: &[f32], k: usize, w: PanelRef<'_>, out: &mut [f32], scratch: &mut Vec<f32>) {
    match w {
        PanelRef::F32(w) => rows(x, k, F32s(w.as_ptr()), out),
        PanelRef::Bf16(w) => widen_or_fuse(x, k, Bf16s(w.as_ptr()), out, scratch),
        PanelRef::Int8 { q, scales } => {
            widen_or_fuse(x, k, Int8s { q: q.as_ptr(), scales: scales.as_ptr() }, out, scratch)
        }
        PanelRef::Int4 { q, d, m } => {
            widen_or_fuse(x, k, Int4s { q: q.as_ptr(), d: d.as_ptr(), m: m.as_ptr() }, out, scratch)
        }
    }
}

/// Runs a compact panel: widened in registers by each tile, or, from `DEQUANT_MIN_ROWS` rows on,
/// widened once into `scratch` by the same `Weights::load` (so to the same values) and then run
/// as f32.
#[target_feature(enable = "avx2,fma")]
unsafe fn widen_or_fuse<W: Weights>(x: &[f32], k: usize, w: W, out: &mut [f32], scratch: &mut Vec<f32>) {
    if out.len() / PANEL < DEQUANT_MIN_ROWS {
        return rows(x, k, w, out);
    }
    scratch.resize(k * PANEL, 0.0);
    let dst = scratch.as_mut_ptr();
    let mut start = 0;
    while start < k {
        let end = (start + INT8_GROUP).min(k);
        for half in [0, HALF] {
            let scales = w.scales(start / INT8_GROUP, half);
            for i in start..end {
                for j in 0..VECS {
                    let col = half + 8 * j;
                    _mm256_storeu_ps(dst.add(i * PANEL + col), w.load(i, col, scales));
                }
            }
        }
        start = end;
    }
    rows(x, k, F32s(scratch.as_ptr()), out)
}

/// Runs every row of `x` through both halves of the panel `w`, `ROWS` rows at a time.
#[target_feature(enable = "avx2,fma")]
unsafe fn rows<W: Weights>(x: &[f32], k: usize, w: W, out: &mut [f32]) {
    for (x, out) in x.chunks(ROWS * k).zip(out.chunks_mut(ROWS * PANEL)) {
        for half in [0, HALF] {
            let (x, o) = (x.as_ptr(), out.as_mut_ptr().add(half));
            match out.len() / PANEL {
                1 => tile::<1, W>(x, k, w, half, o),
                2 => tile::<2, W>(x, k, w, half, o),
                3 => tile::<3, W>(x, k, w, half, o),
                _ => tile::<ROWS, W>(x, k, w, half, o),
            }
        }
    }
}

/// One register tile: `out[r][..HALF] = Σ_i x[r][i] · w[i][half..half + HALF]` for `r < R`.
///
/// Safety: avx2 and fma; `x` points at `R` rows of `k`; `out` at `R` rows of `PANEL` writable
/// floats (the first `HALF` of each are written); `w` is a `k`-deep panel; `half <= HALF`.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const R: usize, W: Weights>(x: *const f32, k: usize, w: W, half: usize, out: *mut f32) {
    let mut acc = [[_mm256_setzero_ps(); VECS]; R];
    let mut start = 0;
    while start < k {
        let end = (start + INT8_GROUP).min(k);
        let scales = w.scales(start / INT8_GROUP, half);
        for i in start..end {
            let mut wv = [_mm256_setzero_ps(); VECS];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = w.load(i, half + 8 * j, scales);
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let xi = _mm256_set1_ps(*x.add(r * k + i));
                for (a, &wj) in acc.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xi, wj, *a);
                }
            }
        }
        start = end;
    }
    for (r, acc) in acc.iter().enumerate() {
        for (j, &a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.add(r * PANEL + 8 * j), a);
        }
    }
}

/// A panel's weights, widened to f32 vectors. Safety for all methods: avx2 and fma; `i < k`,
/// `col + 8 <= PANEL` and `group < k.div_ceil(INT8_GROUP)` for the `k`-deep panel addressed.
trait Weights: Copy {
    /// Per-group state (a tile's int8 scales), loaded once per group of `INT8_GROUP` steps of `k`.
    type Scales: Copy;
    unsafe fn scales(self, group: usize, half: usize) -> Self::Scales;
    /// Outputs `col..col + 8` of the panel at step `i` of `k`, as f32.
    unsafe fn load(self, i: usize, col: usize, scales: Self::Scales) -> __m256;
}

/// `[k][PANEL]` f32.
#[derive(Clone, Copy)]
struct F32s(*const f32);

impl Weights for F32s {
    type Scales = ();

    #[inline(always)]
    unsafe fn scales(self, _group: usize, _half: usize) {}

    #[inline(always)]
    unsafe fn load(self, i: usize, col: usize, _: ()) -> __m256 {
        _mm256_loadu_ps(self.0.add(i * PANEL + col))
    }
}

/// `[k][PANEL]` bf16 bits; widening is a zero-extend and a 16-bit shift.
#[derive(Clone, Copy)]
struct Bf16s(*const u16);

impl Weights for Bf16s {
    type Scales = ();

    #[inline(always)]
    unsafe fn scales(self, _group: usize, _half: usize) {}

    #[inline(always)]
    unsafe fn load(self, i: usize, col: usize, _: ()) -> __m256 {
        let bits = _mm_loadu_si128(self.0.add(i * PANEL + col).cast());
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(bits)))
    }
}

/// `q`: `[k][PANEL]` i8; `scales`: `[groups][PANEL]` f32. A weight is `f32(q) * scale`.
#[derive(Clone, Copy)]
struct Int8s {
    q: *const i8,
    scales: *const f32,
}

impl Weights for Int8s {
    /// The scales of the tile's `HALF` outputs, and which half that is.
    type Scales = ([__m256; VECS], usize);

    #[inline(always)]
    unsafe fn scales(self, group: usize, half: usize) -> Self::Scales {
        let mut s = [_mm256_setzero_ps(); VECS];
        for (j, s) in s.iter_mut().enumerate() {
            *s = _mm256_loadu_ps(self.scales.add(group * PANEL + half + 8 * j));
        }
        (s, half)
    }

    #[inline(always)]
    unsafe fn load(self, i: usize, col: usize, (scales, half): Self::Scales) -> __m256 {
        let q = _mm_loadl_epi64(self.q.add(i * PANEL + col).cast());
        _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), scales[(col - half) / 8])
    }
}

/// `q`: `[k.div_ceil(2)][PANEL]`, steps `2t` and `2t + 1` in the low and high nibbles of row `t`;
/// `d`, `m`: `[groups][PANEL]` f16 bits. A weight is
/// `f32(q) * d + m`, a multiply and an add, each rounded (no FMA).
#[derive(Clone, Copy)]
struct Int4s {
    q: *const u8,
    d: *const u16,
    m: *const u16,
}

impl Weights for Int4s {
    /// The tile's `HALF` scales and minimums, widened once per group, and which half it is.
    type Scales = ([__m256; VECS], [__m256; VECS], usize);

    #[inline(always)]
    unsafe fn scales(self, group: usize, half: usize) -> Self::Scales {
        let widen = |p: *const u16| {
            let mut f = [0.0f32; 8];
            for (t, f) in f.iter_mut().enumerate() {
                *f = half::f16::from_bits(*p.add(t)).to_f32();
            }
            _mm256_loadu_ps(f.as_ptr())
        };
        let (mut d, mut m) = ([_mm256_setzero_ps(); VECS], [_mm256_setzero_ps(); VECS]);
        for j in 0..VECS {
            let at = group * PANEL + half + 8 * j;
            d[j] = widen(self.d.add(at));
            m[j] = widen(self.m.add(at));
        }
        (d, m, half)
    }

    #[inline(always)]
    unsafe fn load(self, i: usize, col: usize, (d, m, half): Self::Scales) -> __m256 {
        let bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(self.q.add(i / 2 * PANEL + col).cast()));
        let bytes = if i.is_multiple_of(2) { bytes } else { _mm256_srli_epi32::<4>(bytes) };
        let codes = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(0x0F)));
        let j = (col - half) / 8;
        _mm256_add_ps(_mm256_mul_ps(codes, d[j]), m[j])
    }
}

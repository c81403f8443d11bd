//! The AVX-512 path: register tiles of up to `ROWS` rows × one whole panel (three zmm vectors).
//!
//! A tile keeps `rows × 3` accumulators in registers; each step of `k` loads (and widens) the
//! panel's three weight vectors once and feeds them to every row of the tile with a broadcast
//! activation. With 8 rows that is 24 accumulators, 3 weights and 1 broadcast of the 32 zmm
//! registers. Each accumulator lane is one output's FMA chain, so tile height never changes bits.

use std::arch::x86_64::*;

use super::{PanelJob, PanelRef, DEQUANT_MIN_ROWS, INT8_GROUP, PANEL};

/// Rows per register tile.
const ROWS: usize = 8;
/// 16-lane vectors per panel.
const VECS: usize = PANEL / 16;
/// How far ahead of its loads a tile prefetches the packed weights, in bytes. Measured on the
/// whole model at m = 1: 2-4 KiB cut int8 and bf16 decode time by about a third against none;
/// prefetching into L2 instead of L1 (`_MM_HINT_T1`/`T2`) was no better.
const PREFETCH: usize = 4096;

/// Proof that this CPU has AVX-512F: only [`Avx512::detect`] makes one.
#[derive(Clone, Copy, Debug)]
pub(super) struct Avx512(());

impl Avx512 {
    /// `Some` when the running CPU supports AVX-512F.
    pub(super) fn detect() -> Option<Self> {
        is_x86_feature_detected!("avx512f").then_some(Self(()))
    }

    /// `out[r][j] = Σ_i x[r][i] · w[i][j]` for all `m = out.len() / PANEL` rows of `job.x`.
    pub(super) fn panel(self, job: &PanelJob<'_>, out: &mut [f32], scratch: &mut Vec<f32>) {
        // The raw-pointer reads below rely on these; `PackedLinear` always passes them.
        assert!(job.fits(out.len()), "matmul panel shapes");
        // SAFETY: `self` exists only where avx512f was detected, and the slice lengths that every
        // pointer offset below stays within were checked above.
        unsafe { panel(job, out, scratch) }
    }
}

/// See [`Avx512::panel`]. Safety: avx512f is available; `job.fits(out.len())`.
#[target_feature(enable = "avx512f")]
unsafe fn panel(job: &PanelJob<'_>, out: &mut [f32], scratch: &mut Vec<f32>) {
    match job.w {
        PanelRef::F32(w) => rows(job, F32s(w.as_ptr()), out),
        PanelRef::Bf16(w) => widen_or_fuse(job, Bf16s(w.as_ptr()), out, scratch),
        PanelRef::Int8 { q, scales } => {
            widen_or_fuse(job, Int8s { q: q.as_ptr(), scales: scales.as_ptr() }, out, scratch)
        }
        PanelRef::Int4 { q, d, m } => {
            widen_or_fuse(job, Int4s { q: q.as_ptr(), d: d.as_ptr(), m: m.as_ptr() }, out, scratch)
        }
    }
}

/// Runs a compact panel: widened in registers by each tile, or, from `DEQUANT_MIN_ROWS` rows on,
/// widened once into `scratch` by the same `Weights::load` (so to the same values) and then run
/// as f32.
#[target_feature(enable = "avx512f")]
unsafe fn widen_or_fuse<W: Weights>(job: &PanelJob<'_>, w: W, out: &mut [f32], scratch: &mut Vec<f32>) {
    if out.len() / PANEL < DEQUANT_MIN_ROWS {
        return rows(job, w, out);
    }
    scratch.resize(job.k * PANEL, 0.0);
    let dst = scratch.as_mut_ptr();
    let mut start = 0;
    while start < job.k {
        let end = (start + INT8_GROUP).min(job.k);
        let scales = w.scales(start / INT8_GROUP);
        for i in start..end {
            for (j, v) in w.load_all(i, scales).into_iter().enumerate() {
                _mm512_storeu_ps(dst.add(i * PANEL + 16 * j), v);
            }
        }
        start = end;
    }
    rows(job, F32s(scratch.as_ptr()), out)
}

/// Runs every row of `job.x` through the panel `w`, `ROWS` rows at a time.
#[target_feature(enable = "avx512f")]
unsafe fn rows<W: Weights>(job: &PanelJob<'_>, w: W, out: &mut [f32]) {
    let k = job.k;
    for (x, out) in job.x.chunks(ROWS * k).zip(out.chunks_mut(ROWS * PANEL)) {
        let (x, o) = (x.as_ptr(), out.as_mut_ptr());
        match out.len() / PANEL {
            1 => tile::<1, W>(x, k, w, o),
            2 => tile::<2, W>(x, k, w, o),
            3 => tile::<3, W>(x, k, w, o),
            4 => tile::<4, W>(x, k, w, o),
            5 => tile::<5, W>(x, k, w, o),
            6 => tile::<6, W>(x, k, w, o),
            7 => tile::<7, W>(x, k, w, o),
            _ => tile::<ROWS, W>(x, k, w, o),
        }
    }
}

/// One register tile: `out[r][..PANEL] = Σ_i x[r][i] · w[i][..]` for `r < R`.
///
/// Safety: avx512f; `x` points at `R` rows of `k`; `out` at `R * PANEL` writable floats; `w` is a
/// `k`-deep panel.
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize, W: Weights>(x: *const f32, k: usize, w: W, out: *mut f32) {
    let mut acc = [[_mm512_setzero_ps(); VECS]; R];
    let mut start = 0;
    while start < k {
        let end = (start + INT8_GROUP).min(k);
        let scales = w.scales(start / INT8_GROUP);
        // Steps in pairs (groups start at even steps), each output's chain still in order.
        let mut i = start;
        while i < end {
            w.prefetch(i);
            let steps = if i + 1 < end { 2 } else { 1 };
            let wv = if steps == 2 { w.load_pair(i, scales) } else { [w.load_all(i, scales); 2] };
            for (s, wv) in wv.iter().enumerate().take(steps) {
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xi = _mm512_set1_ps(*x.add(r * k + i + s));
                    for (a, &wj) in acc.iter_mut().zip(wv) {
                        *a = _mm512_fmadd_ps(xi, wj, *a);
                    }
                }
            }
            i += steps;
        }
        start = end;
    }
    for (r, acc) in acc.iter().enumerate() {
        for (j, &a) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add(r * PANEL + 16 * j), a);
        }
    }
}

/// Prefetches into L1 the cache lines covering `len` bytes, `PREFETCH` bytes past `at`. Hardware
/// prefetchers alone leave a lone decode row (m = 1) well short of memory bandwidth.
#[inline(always)]
unsafe fn prefetch(at: *const u8, len: usize) {
    for line in (0..len).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH + line).cast());
    }
}

/// A panel's weights, widened to f32 vectors. Safety for all methods: avx512f; `i < k`,
/// `j < VECS` and `group < k.div_ceil(INT8_GROUP)` for the `k`-deep panel the pointers address.
trait Weights: Copy {
    /// Per-group state (the int8 scales), loaded once per group of `INT8_GROUP` steps of `k`.
    type Scales: Copy;
    unsafe fn scales(self, group: usize) -> Self::Scales;
    /// Asks for the weights `PREFETCH` bytes past step `i` (a hint: may point past the panel).
    unsafe fn prefetch(self, i: usize);
    /// Outputs `16 * j..16 * j + 16` of the panel at step `i` of `k`, as f32.
    unsafe fn load(self, i: usize, j: usize, scales: Self::Scales) -> __m512;
    /// The whole panel's outputs at step `i`, as `VECS` vectors.
    #[inline(always)]
    unsafe fn load_all(self, i: usize, scales: Self::Scales) -> [__m512; VECS] {
        let mut wv = [_mm512_setzero_ps(); VECS];
        for (j, v) in wv.iter_mut().enumerate() {
            *v = self.load(i, j, scales);
        }
        wv
    }
    /// Steps `i` and `i + 1` (`i` even, `i + 1 < k`): what int4 loads at once.
    #[inline(always)]
    unsafe fn load_pair(self, i: usize, scales: Self::Scales) -> [[__m512; VECS]; 2] {
        [self.load_all(i, scales), self.load_all(i + 1, scales)]
    }
}

/// `[k][PANEL]` f32.
#[derive(Clone, Copy)]
struct F32s(*const f32);

impl Weights for F32s {
    type Scales = ();

    #[inline(always)]
    unsafe fn scales(self, _group: usize) {}

    #[inline(always)]
    unsafe fn prefetch(self, i: usize) {
        prefetch(self.0.wrapping_add(i * PANEL).cast(), 4 * PANEL);
    }

    #[inline(always)]
    unsafe fn load(self, i: usize, j: usize, _: ()) -> __m512 {
        _mm512_loadu_ps(self.0.add(i * PANEL + 16 * j))
    }
}

/// `[k][PANEL]` bf16 bits; widening is a zero-extend and a 16-bit shift.
#[derive(Clone, Copy)]
struct Bf16s(*const u16);

impl Weights for Bf16s {
    type Scales = ();

    #[inline(always)]
    unsafe fn scales(self, _group: usize) {}

    #[inline(always)]
    unsafe fn prefetch(self, i: usize) {
        prefetch(self.0.wrapping_add(i * PANEL).cast(), 2 * PANEL);
    }

    #[inline(always)]
    unsafe fn load(self, i: usize, j: usize, _: ()) -> __m512 {
        let bits = _mm256_loadu_si256(self.0.add(i * PANEL + 16 * j).cast());
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
    }
}

/// `q`: `[k][PANEL]` i8; `scales`: `[groups][PANEL]` f32. A weight is `f32(q) * scale`.
#[derive(Clone, Copy)]
struct Int8s {
    q: *const i8,
    scales: *const f32,
}

impl Weights for Int8s {
    type Scales = [__m512; VECS];

    #[inline(always)]
    unsafe fn scales(self, group: usize) -> [__m512; VECS] {
        let mut s = [_mm512_setzero_ps(); VECS];
        for (j, s) in s.iter_mut().enumerate() {
            *s = _mm512_loadu_ps(self.scales.add(group * PANEL + 16 * j));
        }
        s
    }

    #[inline(always)]
    unsafe fn prefetch(self, i: usize) {
        prefetch(self.q.wrapping_add(i * PANEL).cast(), PANEL);
    }

    #[inline(always)]
    unsafe fn load(self, i: usize, j: usize, scales: [__m512; VECS]) -> __m512 {
        let q = _mm_loadu_si128(self.q.add(i * PANEL + 16 * j).cast());
        _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), scales[j])
    }
}

/// `q`: `[k.div_ceil(2)][PANEL]`, steps `2t` and `2t + 1` in the low and high nibbles of row `t`;
/// `d`, `m`: `[groups][PANEL]` f16 bits. A weight is `f32(q) * d + m`, a multiply and an add,
/// each rounded (no FMA: that is the dequantised value).
#[derive(Clone, Copy)]
struct Int4s {
    q: *const u8,
    d: *const u16,
    m: *const u16,
}

impl Int4s {
    /// The 16 bytes of outputs `16 * j..16 * j + 16` for steps `i & !1` and `i | 1`, widened.
    #[inline(always)]
    unsafe fn bytes(self, i: usize, j: usize) -> __m512i {
        _mm512_cvtepu8_epi32(_mm_loadu_si128(self.q.add(i / 2 * PANEL + 16 * j).cast()))
    }

    /// `f32(code) * d + m`.
    #[inline(always)]
    unsafe fn value(codes: __m512i, d: __m512, m: __m512) -> __m512 {
        _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(codes), d), m)
    }
}

impl Weights for Int4s {
    /// Scales and minimums of the panel's outputs.
    type Scales = ([__m512; VECS], [__m512; VECS]);

    #[inline(always)]
    unsafe fn scales(self, group: usize) -> Self::Scales {
        let (mut d, mut m) = ([_mm512_setzero_ps(); VECS], [_mm512_setzero_ps(); VECS]);
        for j in 0..VECS {
            let at = group * PANEL + 16 * j;
            d[j] = _mm512_cvtph_ps(_mm256_loadu_si256(self.d.add(at).cast()));
            m[j] = _mm512_cvtph_ps(_mm256_loadu_si256(self.m.add(at).cast()));
        }
        (d, m)
    }

    #[inline(always)]
    unsafe fn prefetch(self, i: usize) {
        // One row of bytes serves two steps.
        if i.is_multiple_of(2) {
            prefetch(self.q.wrapping_add(i / 2 * PANEL), PANEL);
        }
    }

    #[inline(always)]
    unsafe fn load(self, i: usize, j: usize, (d, m): Self::Scales) -> __m512 {
        let bytes = self.bytes(i, j);
        let codes = if i.is_multiple_of(2) { bytes } else { _mm512_srli_epi32::<4>(bytes) };
        Self::value(_mm512_and_si512(codes, _mm512_set1_epi32(0x0F)), d[j], m[j])
    }

    #[inline(always)]
    unsafe fn load_pair(self, i: usize, (d, m): Self::Scales) -> [[__m512; VECS]; 2] {
        let low = _mm512_set1_epi32(0x0F);
        let mut pair = [[_mm512_setzero_ps(); VECS]; 2];
        for j in 0..VECS {
            let bytes = self.bytes(i, j);
            pair[0][j] = Self::value(_mm512_and_si512(bytes, low), d[j], m[j]);
            pair[1][j] = Self::value(_mm512_srli_epi32::<4>(bytes), d[j], m[j]);
        }
        pair
    }
}

//! The AVX-512 body of [`Math`]: the portable definition's operations, sixteen lanes at a time.

use std::arch::x86_64::*;

use super::{attend, Cache, Math, Portable, QueryRow, Scratch};
use crate::elem::Elem;

/// Proof that this CPU has AVX-512F: only [`Avx512::detect`] makes one.
#[derive(Clone, Copy)]
pub(super) struct Avx512(());

impl Avx512 {
    /// `Some` when the running CPU supports AVX-512F.
    pub(super) fn detect() -> Option<Self> {
        is_x86_feature_detected!("avx512f").then_some(Self(()))
    }

    /// [`attend`] with this body, the whole item compiled for AVX-512.
    pub(super) fn attend<T: Elem>(
        self,
        q: &[T],
        row: &QueryRow<'_>,
        kv_head: usize,
        cache: &Cache<'_, T>,
        scratch: &mut Scratch,
        out: &mut [T],
    ) {
        // SAFETY: `self` exists only where AVX-512F was detected.
        unsafe { attend_avx512(self, q, row, kv_head, cache, scratch, out) }
    }
}

/// Safety: AVX-512F is available.
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512<T: Elem>(
    simd: Avx512,
    q: &[T],
    row: &QueryRow<'_>,
    kv_head: usize,
    cache: &Cache<'_, T>,
    scratch: &mut Scratch,
    out: &mut [T],
) {
    attend(simd, q, row, kv_head, cache, scratch, out)
}

/// [`Portable::fold`] on a vector: `l[i] += l[i + 8]`, `l[i] += l[i + 4]`, `(l0 + l2) + (l1 + l3)`.
#[inline(always)]
unsafe fn fold(v: __m512) -> f32 {
    let l8 =
        _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))));
    let l4 = _mm_add_ps(_mm256_castps256_ps128(l8), _mm256_extractf128_ps::<1>(l8));
    // [l0 + l2, l1 + l3, ..]
    let l2 = _mm_add_ps(l4, _mm_movehl_ps(l4, l4));
    _mm_cvtss_f32(_mm_add_ss(l2, _mm_movehdup_ps(l2)))
}

/// [`super::exp`] on sixteen lanes, operation for operation.
#[inline(always)]
pub(crate) unsafe fn exp(x: __m512) -> __m512 {
    let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3)), _mm512_setzero_ps());
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_sub_ps(
        _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693_359_4))),
        _mm512_mul_ps(n, _mm512_set1_ps(-2.121_944_4e-4)),
    );
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(c));
    }
    let e = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0));
    let two_n = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)));
    _mm512_mul_ps(e, _mm512_castsi512_ps(two_n))
}

impl Math for Avx512 {
    #[inline(always)]
    fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let full = n / 16 * 16;
        // SAFETY: AVX-512F is available (`self`); loads stay below `full <= a.len(), b.len()`.
        unsafe {
            let mut acc = _mm512_setzero_ps();
            for i in (0..full).step_by(16) {
                let prod = _mm512_mul_ps(_mm512_loadu_ps(a.as_ptr().add(i)), _mm512_loadu_ps(b.as_ptr().add(i)));
                acc = _mm512_add_ps(acc, prod);
            }
            let mut tail = 0.0f32;
            for i in full..n {
                tail += a[i] * b[i];
            }
            fold(acc) + tail
        }
    }

    #[inline(always)]
    fn weighted_sum(self, acc: &mut [f32], w: &[f32], vals: &[f32], head_dim: usize) {
        let (heads, len) = (acc.len() / head_dim, vals.len() / head_dim);
        let full = head_dim / 16 * 16;
        // Up to `HEADS` heads' 16 outputs in registers over all positions: one value load serves
        // them all, and no accumulator goes through memory.
        const HEADS: usize = 4;
        for h0 in (0..heads).step_by(HEADS) {
            let hs = HEADS.min(heads - h0);
            for d in (0..full).step_by(16) {
                // SAFETY: AVX-512F is available; `h0 + hs <= heads`, `d + 16 <= head_dim`,
                // `p < len`, so every access is inside `acc`, `w` and `vals`.
                unsafe {
                    let mut a = [_mm512_setzero_ps(); HEADS];
                    for (h, a) in a.iter_mut().enumerate().take(hs) {
                        *a = _mm512_loadu_ps(acc.as_ptr().add((h0 + h) * head_dim + d));
                    }
                    for p in 0..len {
                        let v = _mm512_loadu_ps(vals.as_ptr().add(p * head_dim + d));
                        for (h, a) in a.iter_mut().enumerate().take(hs) {
                            let wp = _mm512_set1_ps(*w.get_unchecked((h0 + h) * len + p));
                            *a = _mm512_add_ps(*a, _mm512_mul_ps(wp, v));
                        }
                    }
                    for (h, a) in a.iter().enumerate().take(hs) {
                        _mm512_storeu_ps(acc.as_mut_ptr().add((h0 + h) * head_dim + d), *a);
                    }
                }
            }
        }
        if full < head_dim {
            // The last `head_dim % 16` outputs of each head, as the definition says.
            for (acc, w) in acc.chunks_exact_mut(head_dim).zip(w.chunks_exact(len)) {
                for (&w, v) in w.iter().zip(vals.chunks_exact(head_dim)) {
                    for (a, x) in acc[full..].iter_mut().zip(&v[full..]) {
                        *a += w * x;
                    }
                }
            }
        }
    }

    #[inline(always)]
    fn softmax_numerators(self, w: &mut [f32]) -> f32 {
        let full = w.len() / 16 * 16;
        // SAFETY: AVX-512F is available; accesses stay below `full <= w.len()`.
        unsafe {
            let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
            for i in (0..full).step_by(16) {
                m = _mm512_max_ps(m, _mm512_loadu_ps(w.as_ptr().add(i)));
            }
            let m = w[full..].iter().fold(_mm512_reduce_max_ps(m), |m, &s| m.max(s));
            let (mv, mut sum) = (_mm512_set1_ps(m), _mm512_setzero_ps());
            for i in (0..full).step_by(16) {
                let p = w.as_mut_ptr().add(i);
                let e = exp(_mm512_sub_ps(_mm512_loadu_ps(p), mv));
                _mm512_storeu_ps(p, e);
                sum = _mm512_add_ps(sum, e);
            }
            let mut tail = 0.0f32;
            for s in &mut w[full..] {
                *s = super::exp(*s - m);
                tail += *s;
            }
            fold(sum) + tail
        }
    }

    #[inline(always)]
    fn div(self, acc: &mut [f32], d: f32) {
        let full = acc.len() / 16 * 16;
        // SAFETY: AVX-512F is available; accesses stay below `full <= acc.len()`.
        unsafe {
            let dv = _mm512_set1_ps(d);
            for i in (0..full).step_by(16) {
                let a = acc.as_mut_ptr().add(i);
                _mm512_storeu_ps(a, _mm512_div_ps(_mm512_loadu_ps(a), dv));
            }
        }
        Portable.div(&mut acc[full..], d);
    }
}

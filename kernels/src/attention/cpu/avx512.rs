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
    pub(super) fn attend<T: Elem, C: Elem>(
        self,
        q: &[T],
        row: &QueryRow<'_>,
        kv_head: usize,
        cache: &Cache<'_, C>,
        scratch: &mut Scratch,
        out: &mut [T],
    ) {
        // SAFETY: `self` exists only where AVX-512F was detected.
        unsafe { attend_avx512(self, q, row, kv_head, cache, scratch, out) }
    }
}

/// Safety: AVX-512F is available.
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512<T: Elem, C: Elem>(
    simd: Avx512,
    q: &[T],
    row: &QueryRow<'_>,
    kv_head: usize,
    cache: &Cache<'_, C>,
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

/// The dot products of 16 positions, `acc[p]` holding position `p`'s sixteen partial sums, folded
/// exactly as [`fold`] folds one (the same additions of the same pairs), all at once: lane `p` of
/// the result is position `p`'s sum.
#[inline(always)]
unsafe fn fold16(acc: &[__m512; 16]) -> __m512 {
    // (Loops, not closures: a closure would be compiled without AVX-512.)
    // l[i] += l[i + 8]: quarters 0, 1 plus quarters 2, 3; two positions a vector.
    let mut b = [_mm512_setzero_ps(); 8];
    for j in 0..8 {
        let (x, y) = (acc[2 * j], acc[2 * j + 1]);
        b[j] = _mm512_add_ps(_mm512_shuffle_f32x4::<0b01_00_01_00>(x, y), _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y));
    }
    // l[i] += l[i + 4]: quarter 0 plus quarter 1 of each position; four positions a vector.
    let mut c = [_mm512_setzero_ps(); 4];
    for k in 0..4 {
        let (x, y) = (b[2 * k], b[2 * k + 1]);
        c[k] = _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(x, y), _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y));
    }
    // (l0 + l2), (l1 + l3), within each quarter, two vectors' positions interleaved.
    let mut d = [_mm512_setzero_ps(); 2];
    for k in 0..2 {
        let (x, y) = (c[2 * k], c[2 * k + 1]);
        d[k] = _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(x, y), _mm512_shuffle_ps::<0b11_10_11_10>(x, y));
    }
    // (l0 + l2) + (l1 + l3): lane 4q + t now holds position 4t + q.
    let r =
        _mm512_add_ps(_mm512_shuffle_ps::<0b10_00_10_00>(d[0], d[1]), _mm512_shuffle_ps::<0b11_01_11_01>(d[0], d[1]));
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(order, r)
}

/// Prefetches into L1 the `bytes` of `pool` from element `at` on (a hint: never faults).
#[inline(always)]
unsafe fn prefetch<C>(pool: &[C], at: usize, bytes: usize) {
    for line in (0..bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(pool.as_ptr().wrapping_add(at).cast::<i8>().wrapping_add(line));
    }
}

/// [`Math::dot`] of `q` with one pool row, widened in registers. Safety: AVX-512F.
#[inline(always)]
unsafe fn dot_row<C: Elem>(q: &[f32], k: &[C]) -> f32 {
    let n = q.len().min(k.len());
    let full = n / 16 * 16;
    let mut acc = _mm512_setzero_ps();
    for i in (0..full).step_by(16) {
        acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(q.as_ptr().add(i)), C::load16(k.as_ptr().add(i))));
    }
    let mut tail = 0.0f32;
    for i in full..n {
        tail += q[i] * k[i].widen1();
    }
    fold(acc) + tail
}

/// Sixteen positions' scores for one head, from `rows[0..16]`. Safety: AVX-512F; the sixteen rows
/// (and any of the next sixteen in `rows`, prefetched) lie in `pool`; `q.len() == head_dim`, a
/// multiple of 16.
#[inline(always)]
unsafe fn score_tile16<C: Elem>(out: &mut [f32], q: &[f32], pool: &[C], rows: &[usize], head_dim: usize, scale: f32) {
    for &at in rows.iter().take(32).skip(16) {
        prefetch(pool, at, size_of::<C>() * head_dim);
    }
    let mut acc = [_mm512_setzero_ps(); 16];
    for d in (0..head_dim).step_by(16) {
        let qd = _mm512_loadu_ps(q.as_ptr().add(d));
        for (p, acc) in acc.iter_mut().enumerate() {
            let k = C::load16(pool.as_ptr().add(*rows.get_unchecked(p) + d));
            *acc = _mm512_add_ps(*acc, _mm512_mul_ps(qd, k));
        }
    }
    // `+ 0.0`: the definition adds the (empty) tail.
    let dots = _mm512_add_ps(fold16(&acc), _mm512_setzero_ps());
    _mm512_storeu_ps(out.as_mut_ptr(), _mm512_mul_ps(_mm512_set1_ps(scale), dots));
}

/// How far ahead (in positions) value and key rows are prefetched: their rows sit in scattered
/// blocks, which the hardware prefetchers do not follow.
const AHEAD: usize = 8;

/// How many heads one scores tile covers at a time, of `remaining`: up to three (with eight
/// positions each, 24 accumulators and three query chunks fit in the 32 registers); four go as
/// two and two.
fn head_chunk(remaining: usize) -> usize {
    if remaining == 4 {
        2
    } else {
        remaining.min(3)
    }
}

/// The upper eight lanes of `v`.
#[inline(always)]
unsafe fn upper8(v: __m512) -> __m256 {
    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
}

/// One tile of scores: `H` heads (2 or 3) over the eight positions from `p0`.
struct ScoreTile<'a, C> {
    /// `(heads, len)`: row `h` holds head `h`'s scores.
    out: &'a mut [f32],
    /// `(H, head_dim)`: the heads' queries.
    q: &'a [f32],
    pool: &'a [C],
    rows: &'a [usize],
    head_dim: usize,
    scale: f32,
}

/// [`Math::scores`] of `H` heads at positions `p0..p0 + 8`: each key chunk is loaded once for all
/// `H` heads. Each dot keeps its sixteen partial sums in position order over `head_dim` and is
/// folded by [`fold16`], as [`Math::dot`] defines. Safety: AVX-512F; `head_dim` a multiple of 16;
/// rows `p0..p0 + 8` exist and lie in `pool`; `out` holds `H` rows of `rows.len()`.
#[inline(always)]
unsafe fn score_tile<const H: usize, C: Elem>(t: &mut ScoreTile<'_, C>, p0: usize) {
    let len = t.rows.len();
    for p in p0 + 2 * 8..(p0 + 3 * 8).min(len) {
        prefetch(t.pool, *t.rows.get_unchecked(p), size_of::<C>() * t.head_dim);
    }
    let mut acc = [[_mm512_setzero_ps(); 8]; H];
    for d in (0..t.head_dim).step_by(16) {
        let mut qd = [_mm512_setzero_ps(); H];
        for (h, qd) in qd.iter_mut().enumerate() {
            *qd = _mm512_loadu_ps(t.q.as_ptr().add(h * t.head_dim + d));
        }
        for p in 0..8 {
            let k = C::load16(t.pool.as_ptr().add(*t.rows.get_unchecked(p0 + p) + d));
            for (acc, &qd) in acc.iter_mut().zip(&qd) {
                acc[p] = _mm512_add_ps(acc[p], _mm512_mul_ps(qd, k));
            }
        }
    }
    // Two heads' eight dots per fold: lanes 0..8 the first head's, 8..16 the second's.
    let scale = _mm512_set1_ps(t.scale);
    for h in (0..H).step_by(2) {
        let mut pair = [_mm512_setzero_ps(); 16];
        pair[..8].copy_from_slice(&acc[h]);
        if h + 1 < H {
            pair[8..].copy_from_slice(&acc[h + 1]);
        }
        // `+ 0.0`: the definition adds the (empty) tail.
        let dots = _mm512_mul_ps(scale, _mm512_add_ps(fold16(&pair), _mm512_setzero_ps()));
        _mm256_storeu_ps(t.out.as_mut_ptr().add(h * len + p0), _mm512_castps512_ps256(dots));
        if h + 1 < H {
            _mm256_storeu_ps(t.out.as_mut_ptr().add((h + 1) * len + p0), upper8(dots));
        }
    }
}

/// One weighted sum over `H` heads: `acc` `(H, head_dim)`, `w` `(H, len)` at least.
struct Weighted<'a, C> {
    acc: &'a mut [f32],
    w: &'a [f32],
    pool: &'a [C],
    rows: &'a [usize],
    head_dim: usize,
}

/// [`Math::weighted_sum`] for `H` heads and the `16 * G` outputs from `d0`, all in registers over
/// every position: one value row load and one weight broadcast per head serve `H * G` independent
/// sums. Safety: AVX-512F; `job.acc` holds `H` heads, `job.w` `H` rows of `rows.len()`, every row
/// lies inside `job.pool`, and `d0 + 16 * G <= head_dim`.
#[inline(always)]
unsafe fn weighted<const H: usize, const G: usize, C: Elem>(job: &mut Weighted<'_, C>, d0: usize) {
    let Weighted { acc, w, pool, rows, head_dim } = job;
    let (len, head_dim) = (rows.len(), *head_dim);
    let mut a = [[_mm512_setzero_ps(); G]; H];
    for (h, a) in a.iter_mut().enumerate() {
        for (g, a) in a.iter_mut().enumerate() {
            *a = _mm512_loadu_ps(acc.as_ptr().add(h * head_dim + d0 + 16 * g));
        }
    }
    for p in 0..len {
        if p + AHEAD < len {
            prefetch(pool, *rows.get_unchecked(p + AHEAD) + d0, size_of::<C>() * 16 * G);
        }
        let at = *rows.get_unchecked(p) + d0;
        let mut v = [_mm512_setzero_ps(); G];
        for (g, v) in v.iter_mut().enumerate() {
            *v = C::load16(pool.as_ptr().add(at + 16 * g));
        }
        for (h, a) in a.iter_mut().enumerate() {
            let wp = _mm512_set1_ps(*w.get_unchecked(h * len + p));
            for (a, v) in a.iter_mut().zip(&v) {
                *a = _mm512_add_ps(*a, _mm512_mul_ps(wp, *v));
            }
        }
    }
    for (h, a) in a.iter().enumerate() {
        for (g, a) in a.iter().enumerate() {
            _mm512_storeu_ps(acc.as_mut_ptr().add(h * head_dim + d0 + 16 * g), *a);
        }
    }
}

/// [`weighted`] for `H` heads over every full chunk of 16 outputs: four chunks at a time, then one.
#[inline(always)]
unsafe fn weighted_heads<const H: usize, C: Elem>(job: &mut Weighted<'_, C>) {
    let full = job.head_dim / 16 * 16;
    let mut d0 = 0;
    while d0 + 64 <= full {
        weighted::<H, 4, C>(job, d0);
        d0 += 64;
    }
    while d0 < full {
        weighted::<H, 1, C>(job, d0);
        d0 += 16;
    }
}

impl Math for Avx512 {
    #[inline(always)]
    fn scores<C: Elem>(self, out: &mut [f32], q: &[f32], pool: &[C], rows: &[usize], head_dim: usize, scale: f32) {
        let (heads, len) = (q.len() / head_dim, rows.len());
        // The loads below trust `rows`; check them once.
        assert!(rows.iter().all(|&at| at + head_dim <= pool.len()), "key rows inside the pool");
        let vectors = head_dim.is_multiple_of(16);
        let mut h0 = 0;
        while h0 < heads {
            let hs = head_chunk(heads - h0);
            let out = &mut out[h0 * len..(h0 + hs) * len];
            let q = &q[h0 * head_dim..(h0 + hs) * head_dim];
            // Several heads: tiles of eight positions, each key chunk loaded once for them all.
            let tiled = if vectors && hs > 1 { len / 8 * 8 } else { 0 };
            let mut tile = ScoreTile { out: &mut *out, q, pool, rows, head_dim, scale };
            for p0 in (0..tiled).step_by(8) {
                // SAFETY: AVX-512F is available; rows `p0..p0 + 8` exist (`p0 + 8 <= len`) and lie
                // in `pool` (asserted); `head_dim` is a multiple of 16; `out` holds `hs` rows.
                unsafe {
                    match hs {
                        2 => score_tile::<2, C>(&mut tile, p0),
                        _ => score_tile::<3, C>(&mut tile, p0),
                    }
                }
            }
            for (out, q) in out.chunks_exact_mut(len).zip(q.chunks_exact(head_dim)) {
                let blocked = if vectors && tiled == 0 { len / 16 * 16 } else { tiled };
                if tiled == 0 {
                    // One head: tiles of sixteen positions.
                    for p0 in (0..blocked).step_by(16) {
                        // SAFETY: AVX-512F is available; rows `p0..p0 + 16` exist (`p0 + 16 <= len`),
                        // lie in `pool` (asserted), and `d + 16 <= head_dim = q.len()`.
                        unsafe { score_tile16(&mut out[p0..p0 + 16], q, pool, &rows[p0..], head_dim, scale) }
                    }
                }
                for p in blocked..len {
                    // SAFETY: AVX-512F is available (`self`).
                    out[p] = scale * unsafe { dot_row(q, &pool[rows[p]..rows[p] + head_dim]) };
                }
            }
            h0 += hs;
        }
    }

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
    fn weighted_sum<C: Elem>(self, acc: &mut [f32], w: &[f32], pool: &[C], rows: &[usize], head_dim: usize) {
        let (heads, len) = (acc.len() / head_dim, rows.len());
        // The loads below trust `rows`; check them once.
        assert!(rows.iter().all(|&at| at + head_dim <= pool.len()), "value rows inside the pool");
        let full = head_dim / 16 * 16;
        let mut h0 = 0;
        while h0 < heads {
            let hs = (heads - h0).min(4);
            let mut job = Weighted {
                acc: &mut acc[h0 * head_dim..(h0 + hs) * head_dim],
                w: &w[h0 * len..],
                pool,
                rows,
                head_dim,
            };
            // SAFETY: AVX-512F is available; `job` holds `hs` heads; rows fit in `pool` (asserted).
            unsafe {
                match hs {
                    1 => weighted_heads::<1, C>(&mut job),
                    2 => weighted_heads::<2, C>(&mut job),
                    3 => weighted_heads::<3, C>(&mut job),
                    _ => weighted_heads::<4, C>(&mut job),
                }
            }
            h0 += hs;
        }
        if full < head_dim {
            // The last `head_dim % 16` outputs of each head, as the definition says.
            for (acc, w) in acc.chunks_exact_mut(head_dim).zip(w.chunks_exact(len)) {
                for (&w, &at) in w.iter().zip(rows) {
                    for (a, x) in acc[full..].iter_mut().zip(&pool[at + full..at + head_dim]) {
                        *a += w * x.widen1();
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

//! The CPU body of `paged_attention`.
//!
//! Work is split over (query row, group of heads sharing a kv head) items with rayon. Within an
//! item every head runs the same fixed-order f32 computation it would run alone, so the item size
//! (chosen from the batch size and thread count) never changes a result:
//!
//! 1. `score[p] = scale * dot(q, k[p])` for `p` in `0..=pos`, in position order;
//! 2. `m = max(score)`, `w[p] = exp(score[p] - m)`, `sum = Σ w[p]` in position order;
//! 3. `acc = Σ w[p] * v[p]` in position order, then `out = acc / sum`.
//!
//! Keys and values are read one `head_dim` row at a time and widened to f32 once per item (one
//! row serves every head of the item), so the inner loops run on contiguous f32 slices.
//!
//! The f32 arithmetic ([`Math`]) has two bodies, picked once per call from the CPU's features: a
//! portable one and an AVX-512 one. Both do the same operations in the same order (sixteen
//! interleaved partial sums per reduction folded in a fixed tree, separate multiplies and adds,
//! never a fused multiply-add, and our own [`exp`] polynomial rather than the C library's), so
//! they give the same bits.

use rayon::prelude::*;

use super::{Batch, Geometry};
use crate::elem::Elem;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;

/// Attention output `(num_tokens, num_heads, head_dim)` for packed `q` of the same shape.
///
/// `k_cache`, `v_cache`: `(num_blocks, block_size, num_kv_heads, head_dim)`. `batch` has been
/// validated against `geo` and `q`, which is what makes the indexing below in bounds.
pub(super) fn forward<T: Elem>(q: &[T], k_cache: &[T], v_cache: &[T], geo: &Geometry, batch: &Batch<'_>) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); q.len()];
    let heads = heads_per_item(q.len() / (geo.num_heads * geo.head_dim), geo);
    let items_per_token = geo.num_heads / heads;
    let cache = Cache { k: k_cache, v: v_cache, geo };
    out.par_chunks_mut(heads * geo.head_dim).enumerate().for_each_init(Scratch::default, |scratch, (item, out)| {
        let token = item / items_per_token;
        let head0 = item % items_per_token * heads;
        let row = query_row(batch, token, geo.block_size);
        // (heads, head_dim)
        let q = &q[(token * geo.num_heads + head0) * geo.head_dim..][..out.len()];
        let kv_head = head0 / (geo.num_heads / geo.num_kv_heads);
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = avx512::Avx512::detect() {
            return simd.attend(q, &row, kv_head, &cache, scratch, out);
        }
        attend(Portable, q, &row, kv_head, &cache, scratch, out);
    });
    out
}

/// How many heads of one kv group an item covers: the whole group (each key and value row is
/// then read once for all of them) unless that leaves too few items to keep every thread busy.
fn heads_per_item(num_tokens: usize, geo: &Geometry) -> usize {
    let group = geo.num_heads / geo.num_kv_heads;
    let wanted = 4 * rayon::current_num_threads();
    (1..=group)
        .rev()
        .filter(|d| group.is_multiple_of(*d))
        .find(|d| num_tokens * (geo.num_heads / d) >= wanted)
        .unwrap_or(1)
}

/// Where one query row reads its context.
pub(super) struct QueryRow<'a> {
    /// The sequence's blocks covering positions `0..len`, in order.
    blocks: &'a [u32],
    /// Number of positions attended: `pos + 1`.
    len: usize,
}

/// Finds the sequence owning packed row `token`, its position, and its block table.
fn query_row<'a>(batch: &Batch<'a>, token: usize, block_size: usize) -> QueryRow<'a> {
    let cu = batch.cu_seqlens_q;
    // The last sequence whose rows start at or before `token`; empty sequences before it share
    // its start and are skipped. INVARIANT: cu[0] == 0 <= token < cu[num_seqs] (checked).
    let s = cu.partition_point(|&c| c as usize <= token) - 1;
    let q_len = (cu[s + 1] - cu[s]) as usize;
    let pos = batch.seq_lens[s] as usize - q_len + (token - cu[s] as usize);
    let len = pos + 1;
    let table = &batch.block_tables[s * batch.max_blocks_per_seq..];
    QueryRow { blocks: &table[..len.div_ceil(block_size)], len }
}

/// One layer's key and value pools, `(num_blocks, block_size, num_kv_heads, head_dim)` each.
pub(super) struct Cache<'a, T> {
    k: &'a [T],
    v: &'a [T],
    geo: &'a Geometry,
}

impl<T: Elem> Cache<'_, T> {
    /// Where the `head_dim` row for `kv_head` at position `p` of `row`'s context starts in a pool.
    #[inline(always)]
    fn offset(&self, row: &QueryRow<'_>, kv_head: usize, p: usize) -> usize {
        let Geometry { num_kv_heads, head_dim, block_size, .. } = *self.geo;
        let slot = row.blocks[p / block_size] as usize * block_size + p % block_size;
        (slot * num_kv_heads + kv_head) * head_dim
    }

    /// The `head_dim` slice of `pool` (the key or value pool) for `kv_head` at position `p` of
    /// `row`'s context.
    #[inline(always)]
    fn at<'p>(&self, pool: &'p [T], row: &QueryRow<'_>, kv_head: usize, p: usize) -> &'p [T] {
        &pool[self.offset(row, kv_head, p)..][..self.geo.head_dim]
    }
}

/// Per-thread buffers, reused across items so the hot loop never allocates.
#[derive(Default)]
pub(super) struct Scratch {
    /// `(heads, head_dim)`: the item's query rows in f32.
    q: Vec<f32>,
    /// `(head_dim,)`: the current key or value row in f32.
    kv: Vec<f32>,
    /// `(heads, len)`: scores, then softmax weights.
    scores: Vec<f32>,
    /// `(len, head_dim)`: the context's value rows widened to f32 (other element types).
    vals: Vec<f32>,
    /// `(len,)`: where each position's value row starts in the pool (or in `vals`).
    rows: Vec<usize>,
    /// `(heads, head_dim)`: weighted sum of values.
    acc: Vec<f32>,
    /// `(heads,)`: softmax denominators.
    sums: Vec<f32>,
}

/// Attention for `q` (`(heads, head_dim)`, heads sharing `kv_head`) over `row`'s context.
#[inline(always)]
fn attend<T: Elem, M: Math>(
    math: M,
    q: &[T],
    row: &QueryRow<'_>,
    kv_head: usize,
    cache: &Cache<'_, T>,
    scratch: &mut Scratch,
    out: &mut [T],
) {
    let (head_dim, len) = (cache.geo.head_dim, row.len);
    let heads = q.len() / head_dim;
    let Scratch { q: qf, kv, scores, vals, rows, acc, sums } = scratch;
    qf.resize(q.len(), 0.0);
    kv.resize(head_dim, 0.0);
    scores.resize(heads * len, 0.0);
    let qf: &[f32] = T::widen(q, qf);

    // 1. Scores: read in place from an f32 pool, else one key row widened at a time. (Plain
    // loops, no closures: a closure would be compiled apart from the AVX-512 build.)
    let scale = cache.geo.scale;
    if let Some(pool) = T::as_f32(cache.k) {
        rows.clear();
        rows.extend((0..len).map(|p| cache.offset(row, kv_head, p)));
        math.scores(scores, qf, pool, rows, head_dim, scale);
    } else {
        for p in 0..len {
            let k = T::widen(cache.at(cache.k, row, kv_head, p), kv);
            for h in 0..heads {
                scores[h * len + p] = scale * math.dot(&qf[h * head_dim..][..head_dim], k);
            }
        }
    }

    // 2. Max-subtracted softmax numerators and their sums, in position order.
    sums.clear();
    for w in scores.chunks_exact_mut(len) {
        sums.push(math.softmax_numerators(w));
    }

    // 3. Weighted values, in position order: read in place from an f32 pool, else widened into
    // one run first. `rows[p]` is where position `p`'s value row starts.
    rows.clear();
    let pool: &[f32] = match T::as_f32(cache.v) {
        Some(pool) => {
            rows.extend((0..len).map(|p| cache.offset(row, kv_head, p)));
            pool
        }
        None => {
            vals.clear();
            for p in 0..len {
                vals.extend_from_slice(T::widen(cache.at(cache.v, row, kv_head, p), kv));
            }
            rows.extend((0..len).map(|p| p * head_dim));
            vals
        }
    };
    acc.clear();
    acc.resize(q.len(), 0.0);
    math.weighted_sum(acc, scores, pool, rows, head_dim);
    for h in 0..heads {
        math.div(&mut acc[h * head_dim..][..head_dim], sums[h]);
    }
    T::narrow(acc, out);
}

/// The f32 operations of [`attend`]. Every implementation gives the same bits as [`Portable`].
trait Math: Copy {
    /// `Σ a[i] * b[i]`: sixteen partial sums (lane `i % 16` of each full chunk of 16, in index
    /// order, each product rounded then added), folded `l[i] += l[i + 8]`, then `l[i] += l[i + 4]`,
    /// then `(l0 + l2) + (l1 + l3)`; plus the products past the last full chunk, summed in order.
    fn dot(self, a: &[f32], b: &[f32]) -> f32;
    /// `out[h][p] = scale * dot(q[h], pool[rows[p]..][..head_dim])` for every head `h` and
    /// position `p < rows.len()` (`out`: `(heads, len)`; `q`: `(heads, head_dim)`).
    fn scores(self, out: &mut [f32], q: &[f32], pool: &[f32], rows: &[usize], head_dim: usize, scale: f32);
    /// `acc[h][d] += w[h][p] * pool[rows[p] + d]` for each position `p < len` in order, for every
    /// head `h` (`acc`: `(heads, head_dim)`; `w`: `(heads, len)`; `rows`: `(len,)`, each row
    /// `head_dim` long inside `pool`).
    fn weighted_sum(self, acc: &mut [f32], w: &[f32], pool: &[f32], rows: &[usize], head_dim: usize);
    /// `w[p] = exp(w[p] - max(w))` in place; returns `Σ w[p]`, summed as `dot` sums.
    fn softmax_numerators(self, w: &mut [f32]) -> f32;
    /// `acc[i] /= d`.
    fn div(self, acc: &mut [f32], d: f32);
}

/// The definition, in plain Rust.
#[derive(Clone, Copy)]
struct Portable;

impl Portable {
    /// Folds sixteen partial sums as [`Math::dot`] describes.
    #[inline(always)]
    fn fold(mut lanes: [f32; 16]) -> f32 {
        for i in 0..8 {
            lanes[i] += lanes[i + 8];
        }
        for i in 0..4 {
            lanes[i] += lanes[i + 4];
        }
        (lanes[0] + lanes[2]) + (lanes[1] + lanes[3])
    }
}

impl Math for Portable {
    #[inline(always)]
    fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        let mut lanes = [0.0f32; 16];
        let (a16, b16) = (a.chunks_exact(16), b.chunks_exact(16));
        let mut tail = 0.0f32;
        for (x, y) in a16.remainder().iter().zip(b16.remainder()) {
            tail += x * y;
        }
        for (x, y) in a16.zip(b16) {
            for i in 0..16 {
                lanes[i] += x[i] * y[i];
            }
        }
        Self::fold(lanes) + tail
    }

    #[inline(always)]
    fn scores(self, out: &mut [f32], q: &[f32], pool: &[f32], rows: &[usize], head_dim: usize, scale: f32) {
        for (out, q) in out.chunks_exact_mut(rows.len()).zip(q.chunks_exact(head_dim)) {
            for (o, &at) in out.iter_mut().zip(rows) {
                *o = scale * self.dot(q, &pool[at..at + head_dim]);
            }
        }
    }

    #[inline(always)]
    fn weighted_sum(self, acc: &mut [f32], w: &[f32], pool: &[f32], rows: &[usize], head_dim: usize) {
        for (acc, w) in acc.chunks_exact_mut(head_dim).zip(w.chunks_exact(rows.len())) {
            for (&w, &at) in w.iter().zip(rows) {
                for (a, x) in acc.iter_mut().zip(&pool[at..at + head_dim]) {
                    *a += w * x;
                }
            }
        }
    }

    #[inline(always)]
    fn softmax_numerators(self, w: &mut [f32]) -> f32 {
        let m = w.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut lanes = [0.0f32; 16];
        let mut chunks = w.chunks_exact_mut(16);
        for c in &mut chunks {
            for i in 0..16 {
                c[i] = exp(c[i] - m);
                lanes[i] += c[i];
            }
        }
        let mut tail = 0.0f32;
        for s in chunks.into_remainder() {
            *s = exp(*s - m);
            tail += *s;
        }
        Self::fold(lanes) + tail
    }

    #[inline(always)]
    fn div(self, acc: &mut [f32], d: f32) {
        acc.iter_mut().for_each(|a| *a /= d);
    }
}

/// `e^x` for `x <= 0` (softmax numerators), within a few ulp; inputs below -87.3 (where the
/// result would leave the normal range) give `e^-87.3`, about 1e-38, negligible in a sum.
///
/// Cody-Waite range reduction `x = n ln2 + r`, `|r| <= ln2 / 2`, and a degree-6 polynomial
/// for `e^r` (the Cephes `expf` coefficients), scaled by `2^n` through the exponent bits. Plain
/// f32 operations with no branches, so loops over it vectorise and give the same bits on every
/// instruction set.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 0.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = (p * r) * r + r + 1.0;
    // 2^n for n in -126..=0 (the clamp keeps it a normal number).
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn exp_is_accurate_on_softmax_inputs() {
        let mut worst = 0.0f64;
        let mut x = 0.0f32;
        while x > -87.0 {
            let want = f64::from(x).exp();
            worst = worst.max((f64::from(exp(x)) - want).abs() / want);
            x -= 0.001_3;
        }
        assert!(worst < 4.0 * f64::from(f32::EPSILON), "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_build_gives_the_baseline_bits() {
        let Some(simd) = avx512::Avx512::detect() else { return };
        let mut rng = StdRng::seed_from_u64(9);
        let geo = Geometry { num_heads: 6, num_kv_heads: 2, head_dim: 64, num_blocks: 8, block_size: 16, scale: 0.125 };
        let pool = |rng: &mut StdRng| (0..8 * 16 * 2 * 64).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>();
        let (k, v) = (pool(&mut rng), pool(&mut rng));
        let cache = Cache { k: &k, v: &v, geo: &geo };
        let q: Vec<f32> = (0..3 * 64).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let blocks = [5u32, 2, 7, 0, 3];
        for len in [1usize, 15, 16, 17, 33, 77] {
            let row = QueryRow { blocks: &blocks[..len.div_ceil(16)], len };
            let (mut a, mut b) = (vec![0.0f32; q.len()], vec![0.0f32; q.len()]);
            attend(Portable, &q, &row, 1, &cache, &mut Scratch::default(), &mut a);
            simd.attend(&q, &row, 1, &cache, &mut Scratch::default(), &mut b);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "len {len}");
        }
    }
}

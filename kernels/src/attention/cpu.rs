//! The CPU body of `paged_attention`.
//!
//! Work is split over items with rayon: a query row's heads, all of them when the batch has rows
//! enough to keep every thread busy, else one kv group's (the heads sharing a kv head) or part of
//! one. Within an item every head runs the same fixed-order f32 computation it would run alone, so
//! the item size (chosen from the batch size and thread count) never changes a result:
//!
//! 1. `score[p] = scale * dot(q, k[p])` for `p` in `0..=pos`, in position order;
//! 2. `m = max(score)`, `w[p] = exp(score[p] - m)`, `sum = Σ w[p]` in position order;
//! 3. `acc = Σ w[p] * v[p]` in position order, then `out = acc / sum`.
//!
//! Keys and values are read in place from the pools, one `head_dim` row at a time, and widened to
//! f32 in registers (exactly: an f16 or bf16 cache gives the f32 computation on its values); one
//! row serves every head of its kv group in the item, and the AVX-512 body loads each key chunk
//! once for up to three heads and each value row once for up to four.
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
pub(super) fn forward<T: Elem, C: Elem>(
    q: &[T],
    k_cache: &[C],
    v_cache: &[C],
    geo: &Geometry,
    batch: &Batch<'_>,
) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); q.len()];
    let heads = heads_per_item(q.len() / (geo.num_heads * geo.head_dim), geo);
    let items_per_token = geo.num_heads / heads;
    let cache = Cache { k: k_cache, v: v_cache, geo };
    let group = geo.num_heads / geo.num_kv_heads;
    #[cfg(target_arch = "x86_64")]
    let simd = avx512::Avx512::detect();
    out.par_chunks_mut(heads * geo.head_dim).enumerate().for_each_init(Scratch::default, |scratch, (item, out)| {
        let token = item / items_per_token;
        let row = query_row(batch, token, geo.block_size);
        // The item's heads, a kv group (or part of one) at a time: (heads, head_dim) each.
        let first = item % items_per_token * heads;
        for (i, out) in out.chunks_mut(heads.min(group) * geo.head_dim).enumerate() {
            let head0 = first + i * group;
            let q = &q[(token * geo.num_heads + head0) * geo.head_dim..][..out.len()];
            let kv_head = head0 / group;
            #[cfg(target_arch = "x86_64")]
            if let Some(simd) = simd {
                simd.attend(q, &row, kv_head, &cache, scratch, out);
                continue;
            }
            attend(Portable, q, &row, kv_head, &cache, scratch, out);
        }
    });
    out
}

/// How many heads an item covers: all of a token's (its key and value rows, which sit side by
/// side in the pools, are then read in order, once per kv group), else one kv group's (each row
/// read once for all of them), else a divisor of it: the most that still leaves enough items to
/// keep every thread busy.
fn heads_per_item(num_tokens: usize, geo: &Geometry) -> usize {
    let group = geo.num_heads / geo.num_kv_heads;
    let wanted = 4 * rayon::current_num_threads();
    if num_tokens >= wanted {
        return geo.num_heads;
    }
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
pub(super) struct Cache<'a, C> {
    k: &'a [C],
    v: &'a [C],
    geo: &'a Geometry,
}

impl<C: Elem> Cache<'_, C> {
    /// Appends to `rows` where the `head_dim` row for `kv_head` at each position of `row`'s context
    /// starts in a pool, in position order.
    #[inline(always)]
    fn offsets(&self, row: &QueryRow<'_>, kv_head: usize, rows: &mut Vec<usize>) {
        let Geometry { num_kv_heads, head_dim, block_size, .. } = *self.geo;
        let stride = num_kv_heads * head_dim;
        for (i, &block) in row.blocks.iter().enumerate() {
            let first = (block as usize * block_size * num_kv_heads + kv_head) * head_dim;
            let n = block_size.min(row.len - i * block_size);
            rows.extend((0..n).map(|j| first + j * stride));
        }
    }
}

/// Per-thread buffers, reused across items so the hot loop never allocates.
#[derive(Default)]
pub(super) struct Scratch {
    /// `(heads, head_dim)`: the item's query rows in f32.
    q: Vec<f32>,
    /// `(heads, len)`: scores, then softmax weights.
    scores: Vec<f32>,
    /// `(len,)`: where each position's key (or value) row starts in its pool.
    rows: Vec<usize>,
    /// `(heads, head_dim)`: weighted sum of values.
    acc: Vec<f32>,
    /// `(heads,)`: softmax denominators.
    sums: Vec<f32>,
}

/// Attention for `q` (`(heads, head_dim)`, heads sharing `kv_head`) over `row`'s context.
#[inline(always)]
fn attend<T: Elem, C: Elem, M: Math>(
    math: M,
    q: &[T],
    row: &QueryRow<'_>,
    kv_head: usize,
    cache: &Cache<'_, C>,
    scratch: &mut Scratch,
    out: &mut [T],
) {
    let (head_dim, len) = (cache.geo.head_dim, row.len);
    let heads = q.len() / head_dim;
    let Scratch { q: qf, scores, rows, acc, sums } = scratch;
    qf.resize(q.len(), 0.0);
    scores.resize(heads * len, 0.0);
    let qf: &[f32] = T::widen(q, qf);

    // 1. Scores, reading the key rows in place. (Plain loops, no closures: a closure would be
    // compiled apart from the AVX-512 build.)
    rows.clear();
    cache.offsets(row, kv_head, rows);
    math.scores(scores, qf, cache.k, rows, head_dim, cache.geo.scale);

    // 2. Max-subtracted softmax numerators and their sums, in position order.
    sums.clear();
    for w in scores.chunks_exact_mut(len) {
        sums.push(math.softmax_numerators(w));
    }

    // 3. Weighted values, in position order, reading the value rows in place (the same offsets).
    acc.clear();
    acc.resize(q.len(), 0.0);
    math.weighted_sum(acc, scores, cache.v, rows, head_dim);
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
    /// position `p < rows.len()` (`out`: `(heads, len)`; `q`: `(heads, head_dim)`), each pool
    /// element widened to f32.
    fn scores<C: Elem>(self, out: &mut [f32], q: &[f32], pool: &[C], rows: &[usize], head_dim: usize, scale: f32);
    /// `acc[h][d] += w[h][p] * pool[rows[p] + d]` for each position `p < len` in order, for every
    /// head `h` (`acc`: `(heads, head_dim)`; `w`: `(heads, len)`; `rows`: `(len,)`, each row
    /// `head_dim` long inside `pool`, each element widened to f32).
    fn weighted_sum<C: Elem>(self, acc: &mut [f32], w: &[f32], pool: &[C], rows: &[usize], head_dim: usize);
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
    fn scores<C: Elem>(self, out: &mut [f32], q: &[f32], pool: &[C], rows: &[usize], head_dim: usize, scale: f32) {
        let mut k = vec![0.0f32; head_dim];
        for (out, q) in out.chunks_exact_mut(rows.len()).zip(q.chunks_exact(head_dim)) {
            for (o, &at) in out.iter_mut().zip(rows) {
                k.iter_mut().zip(&pool[at..at + head_dim]).for_each(|(k, &c)| *k = c.widen1());
                *o = scale * self.dot(q, &k);
            }
        }
    }

    #[inline(always)]
    fn weighted_sum<C: Elem>(self, acc: &mut [f32], w: &[f32], pool: &[C], rows: &[usize], head_dim: usize) {
        for (acc, w) in acc.chunks_exact_mut(head_dim).zip(w.chunks_exact(rows.len())) {
            for (&w, &at) in w.iter().zip(rows) {
                for (a, x) in acc.iter_mut().zip(&pool[at..at + head_dim]) {
                    *a += w * x.widen1();
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
        fn both<C: Elem>(simd: avx512::Avx512, q: &[f32], row: &QueryRow<'_>, cache: &Cache<'_, C>) -> [Vec<u32>; 2] {
            let (mut a, mut b) = (vec![0.0f32; q.len()], vec![0.0f32; q.len()]);
            attend(Portable, q, row, 1, cache, &mut Scratch::default(), &mut a);
            simd.attend(q, row, 1, cache, &mut Scratch::default(), &mut b);
            [a, b].map(|v| v.iter().map(|x| x.to_bits()).collect())
        }
        // 64: every vector path (tiles of 2 and 3 heads over 8 positions, one head over 16, four
        // value chunks at a time); 80: five chunks (four, then one); 40: a tail past the chunks.
        for head_dim in [64usize, 80, 40] {
            let geo =
                Geometry { num_heads: 16, num_kv_heads: 2, head_dim, num_blocks: 8, block_size: 16, scale: 0.125 };
            let pool = |rng: &mut StdRng| {
                (0..8 * 16 * 2 * head_dim).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>()
            };
            let (k, v) = (pool(&mut rng), pool(&mut rng));
            let half = |p: &[f32]| p.iter().map(|&x| half::f16::from_f32(x)).collect::<Vec<_>>();
            let (k16, v16) = (half(&k), half(&v));
            let brain = |p: &[f32]| p.iter().map(|&x| half::bf16::from_f32(x)).collect::<Vec<_>>();
            let (kb, vb) = (brain(&k), brain(&v));
            let blocks = [5u32, 2, 7, 0, 3];
            // Up to eight heads of a kv group in one item (1, 2, 3, then 2 + 2, 3 + 2, 3 + 3, ...).
            for heads in 1..=8 {
                let q: Vec<f32> = (0..heads * head_dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                for len in [1usize, 7, 8, 15, 16, 17, 33, 77] {
                    let row = QueryRow { blocks: &blocks[..len.div_ceil(16)], len };
                    let what = format!("head_dim {head_dim}, {heads} heads, len {len}");
                    let [a, b] = both(simd, &q, &row, &Cache { k: &k, v: &v, geo: &geo });
                    assert_eq!(a, b, "f32 cache, {what}");
                    let [a, b] = both(simd, &q, &row, &Cache { k: &k16, v: &v16, geo: &geo });
                    assert_eq!(a, b, "f16 cache, {what}");
                    let [a, b] = both(simd, &q, &row, &Cache { k: &kb, v: &vb, geo: &geo });
                    assert_eq!(a, b, "bf16 cache, {what}");
                }
            }
        }
    }
}

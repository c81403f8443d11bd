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

use rayon::prelude::*;

use super::{Batch, Geometry};
use crate::elem::Elem;

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
        attend(q, &row, kv_head, &cache, scratch, out);
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
struct QueryRow<'a> {
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
struct Cache<'a, T> {
    k: &'a [T],
    v: &'a [T],
    geo: &'a Geometry,
}

impl<T: Elem> Cache<'_, T> {
    /// Calls `f(p, row)` for positions `p` in `0..row.len` in order, with `row` the `head_dim`
    /// slice of `pool` (the key or value pool) for `kv_head` at position `p`.
    #[inline(always)]
    fn for_each_pos(&self, pool: &[T], row: &QueryRow<'_>, kv_head: usize, mut f: impl FnMut(usize, &[T])) {
        let Geometry { num_kv_heads, head_dim, block_size, .. } = *self.geo;
        let slot_stride = num_kv_heads * head_dim;
        for (b, &block) in row.blocks.iter().enumerate() {
            let first = b * block_size;
            let n = block_size.min(row.len - first);
            // (n, num_kv_heads, head_dim) for this block's filled slots
            let base = block as usize * block_size * slot_stride;
            let block_rows = &pool[base..base + n * slot_stride];
            for (off, slot) in block_rows.chunks_exact(slot_stride).enumerate() {
                f(first + off, &slot[kv_head * head_dim..][..head_dim]);
            }
        }
    }
}

/// Per-thread buffers, reused across items so the hot loop never allocates.
#[derive(Default)]
struct Scratch {
    /// `(heads, head_dim)`: the item's query rows in f32.
    q: Vec<f32>,
    /// `(head_dim,)`: the current key or value row in f32.
    kv: Vec<f32>,
    /// `(heads, len)`: scores, then softmax weights.
    scores: Vec<f32>,
    /// `(heads, head_dim)`: weighted sum of values.
    acc: Vec<f32>,
    /// `(heads,)`: softmax denominators.
    sums: Vec<f32>,
}

/// Attention for `q` (`(heads, head_dim)`, heads sharing `kv_head`) over `row`'s context.
fn attend<T: Elem>(
    q: &[T],
    row: &QueryRow<'_>,
    kv_head: usize,
    cache: &Cache<'_, T>,
    scratch: &mut Scratch,
    out: &mut [T],
) {
    let (head_dim, len) = (cache.geo.head_dim, row.len);
    let heads = q.len() / head_dim;
    let Scratch { q: qf, kv, scores, acc, sums } = scratch;
    qf.resize(q.len(), 0.0);
    kv.resize(head_dim, 0.0);
    scores.resize(heads * len, 0.0);
    let qf: &[f32] = T::widen(q, qf);

    // 1. Scores, in position order.
    let scale = cache.geo.scale;
    cache.for_each_pos(cache.k, row, kv_head, |p, k| {
        let k = T::widen(k, kv);
        for (h, q) in qf.chunks_exact(head_dim).enumerate() {
            scores[h * len + p] = scale * dot(q, k);
        }
    });

    // 2. Max-subtracted softmax numerators and their sums, in position order.
    sums.clear();
    for w in scores.chunks_exact_mut(len) {
        let m = w.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut sum = 0.0f32;
        for s in w.iter_mut() {
            *s = (*s - m).exp();
            sum += *s;
        }
        sums.push(sum);
    }

    // 3. Weighted values, in position order.
    acc.clear();
    acc.resize(q.len(), 0.0);
    cache.for_each_pos(cache.v, row, kv_head, |p, v| {
        let v = T::widen(v, kv);
        for (h, acc) in acc.chunks_exact_mut(head_dim).enumerate() {
            axpy(acc, scores[h * len + p], v);
        }
    });
    for (acc, &sum) in acc.chunks_exact_mut(head_dim).zip(sums.iter()) {
        acc.iter_mut().for_each(|a| *a /= sum);
    }
    T::narrow(acc, out);
}

/// `Σ a[i] * b[i]` with eight interleaved partial sums (one per `i % 8`, each in index order),
/// combined in a fixed tree. Written as array operations so the compiler vectorises it.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a8.zip(b8) {
        lanes = std::array::from_fn(|i| lanes[i] + x[i] * y[i]);
    }
    let half: [f32; 4] = std::array::from_fn(|i| lanes[i] + lanes[i + 4]);
    ((half[0] + half[2]) + (half[1] + half[3])) + tail
}

/// `acc += w * v`.
#[inline(always)]
fn axpy(acc: &mut [f32], w: f32, v: &[f32]) {
    for (a, x) in acc.iter_mut().zip(v) {
        *a += w * x;
    }
}

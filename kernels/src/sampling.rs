//! `top_candidates`: what a sampler needs from a row of logits, without the row.
//!
//! A sampled row of a vocabulary of 128k f32 logits is 512 KB; copying every row of a large batch
//! back to the host each step costs more than the step. Almost all of a row's probability sits in
//! its few most likely tokens, so this op hands back, per row, the `k` largest logits with their
//! ids (most likely first) and the two sums that make probabilities out of them: the host then
//! samples from the head of the distribution, and fetches the whole row only in the rare case the
//! head does not settle the choice (see the engine's `Sampler::sample_head`).

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};

use crate::storage::contiguous_slice;

#[cfg(feature = "cuda")]
mod cuda;

/// The most candidates a row may ask for (the CUDA kernel sorts them in shared memory).
pub const MAX_CANDIDATES: usize = 256;

/// The head of each row of `logits`.
///
/// - `logits`: `(rows, vocab)` f32; NaN counts as `-inf`.
/// - `inv_temps`: `(rows,)` f32, each row's `1 / temperature` (any finite value; 1 for a row that
///   only needs logprobs).
/// - `k`: candidates per row, in `1..=min(vocab, MAX_CANDIDATES)`.
///
/// Returns `(rows, 2 * k + 2)` f32. Row `r` holds:
/// - `[0, k)`: the `k` largest logits, descending, ties to the lower id, NaN as `-inf` (and `-0`
///   as `+0`, which it equals);
/// - `[k, 2k)`: their token ids, each the `u32` whose bits the f32 holds (`f32::to_bits`);
/// - `2k`: `Σ exp(l - max)` over the whole row, `max` being entry 0;
/// - `2k + 1`: `Σ exp((l - max) * inv_temps[r])` over the whole row.
///
/// Both sums are 0 when every logit is `-inf` or NaN, and NaN when one is `+inf`. The ids are exact and agree with a full sort
/// on every device; the sums are f32 reductions whose order differs between the CPU (sequential,
/// in f64) and CUDA (a tree), so they agree to rounding.
pub fn top_candidates(logits: &Tensor, inv_temps: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if logits.dtype() != DType::F32 || inv_temps.dtype() != DType::F32 {
        bail!(
            "top_candidates: `logits` and `inv_temps` must be f32, got {:?} and {:?}",
            logits.dtype(),
            inv_temps.dtype()
        )
    }
    if inv_temps.dims() != [rows] {
        bail!("top_candidates: `inv_temps` must be ({rows},), got {:?}", inv_temps.dims())
    }
    if !inv_temps.device().same_device(logits.device()) {
        bail!("top_candidates: `inv_temps` must be on the logits' device")
    }
    if k == 0 || k > vocab.min(MAX_CANDIDATES) {
        bail!("top_candidates: `k` must be in 1..={}, got {k}", vocab.min(MAX_CANDIDATES))
    }
    logits.contiguous()?.apply_op2_no_bwd(&inv_temps.contiguous()?, &TopCandidates { k })
}

/// Each row's greedy token: `logits` `(rows, vocab)` f32 → `(rows,)` u32, the lowest id holding
/// the row's largest value (NaN skipped, `-0` equal to `+0`), or 0 for a row with nothing above
/// `-inf`. Exact, and the same on every device: one launch on CUDA, where only the ids need copying
/// back.
pub fn argmax_rows(logits: &Tensor) -> candle_core::Result<Tensor> {
    let (_, vocab) = logits.dims2()?;
    if logits.dtype() != DType::F32 {
        bail!("argmax_rows: `logits` must be f32, got {:?}", logits.dtype())
    }
    if u32::try_from(vocab).is_err() {
        bail!("argmax_rows: a vocabulary of {vocab} does not fit u32 ids")
    }
    logits.contiguous()?.apply_op1_no_bwd(&ArgmaxRows)
}

struct ArgmaxRows;

/// The greedy token of one row (see [`argmax_rows`]).
fn argmax_row(row: &[f32]) -> u32 {
    let mut best = (f32::NEG_INFINITY, 0u32);
    for (i, &x) in row.iter().enumerate() {
        if x > best.0 {
            best = (x, i as u32);
        }
    }
    best.1
}

impl CustomOp1 for ArgmaxRows {
    fn name(&self) -> &'static str {
        "sluice-argmax-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, vocab) = l.shape().dims2()?;
        let x = contiguous_slice::<f32>(s, l, "logits")?;
        let ids: Vec<u32> = if vocab == 0 { vec![0; rows] } else { x.chunks_exact(vocab).map(argmax_row).collect() };
        Ok((CpuStorage::U32(ids), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::argmax_rows((s, l))
    }
}

/// Splits one output row of [`top_candidates`] into `(id, logit)` pairs and the two sums.
pub fn split_row(row: &[f32], k: usize) -> (Vec<(u32, f32)>, f32, f32) {
    let pairs = row[k..2 * k].iter().zip(&row[..k]).map(|(id, &v)| (id.to_bits(), v)).collect();
    (pairs, row[2 * k], row[2 * k + 1])
}

struct TopCandidates {
    k: usize,
}

impl CustomOp2 for TopCandidates {
    fn name(&self) -> &'static str {
        "top-candidates"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_l: &Layout,
        inv_temps: &CpuStorage,
        inv_temps_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, vocab) = logits_l.shape().dims2()?;
        let logits = contiguous_slice::<f32>(logits, logits_l, "logits")?;
        let inv_temps = contiguous_slice::<f32>(inv_temps, inv_temps_l, "inv_temps")?;
        let k = self.k;
        let mut out = vec![0f32; rows * (2 * k + 2)];
        for ((row, &inv_t), o) in logits.chunks_exact(vocab).zip(inv_temps).zip(out.chunks_exact_mut(2 * k + 2)) {
            head_of(row, inv_t, k, o);
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, 2 * k + 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        logits: &candle_core::CudaStorage,
        logits_l: &Layout,
        inv_temps: &candle_core::CudaStorage,
        inv_temps_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::top_candidates(self.k, (logits, logits_l), (inv_temps, inv_temps_l))
    }
}

/// NaN as `-inf`, `-0` as `+0` (equal values, so the order between them is by id).
fn sanitize(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else if x == 0.0 {
        0.0
    } else {
        x
    }
}

/// One row's output (see [`top_candidates`]) into `out` (`2 * k + 2` long).
fn head_of(row: &[f32], inv_t: f32, k: usize, out: &mut [f32]) {
    let by_value_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut all: Vec<(u32, f32)> = (0u32..).zip(row.iter().map(|&x| sanitize(x))).collect();
    if k < all.len() {
        all.select_nth_unstable_by(k - 1, by_value_desc);
        all.truncate(k);
    }
    all.sort_unstable_by(by_value_desc);
    for (i, &(id, v)) in all.iter().enumerate() {
        out[i] = v;
        out[k + i] = f32::from_bits(id);
    }
    let max = all[0].1;
    let (mut s1, mut st) = (0f64, 0f64);
    if max > f32::NEG_INFINITY {
        for &x in row {
            let d = f64::from(sanitize(x) - max);
            s1 += d.exp();
            st += (d * f64::from(inv_t)).exp();
        }
    }
    out[2 * k] = s1 as f32;
    out[2 * k + 1] = st as f32;
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Result, Tensor};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::{argmax_rows, split_row, top_candidates};
    use crate::test_util::test_device;

    /// Against a full sort's first entry, on rows of ties (bf16-like steps and `-0` beside `+0`),
    /// NaN, infinities, nothing above `-inf`, and a vocabulary not a multiple of the block.
    fn argmax_rows_is_the_first_of_a_full_sort(dev: &Device) -> Result<()> {
        let mut rng = StdRng::seed_from_u64(21);
        for vocab in [1usize, 7, 1024, 1025, 49_152 + 3] {
            let mut rows: Vec<Vec<f32>> = (0..6)
                .map(|r| {
                    (0..vocab)
                        .map(|_| match r {
                            0 => rng.random_range(-20.0f32..20.0),
                            1 => rng.random_range(0..5) as f32 * 0.5,
                            2 => {
                                if rng.random_bool(0.5) {
                                    -0.0
                                } else {
                                    0.0
                                }
                            }
                            _ => rng.random_range(-3.0f32..3.0),
                        })
                        .collect()
                })
                .collect();
            for i in (0..vocab).step_by(3) {
                rows[3][i] = f32::NAN;
            }
            rows[4].iter_mut().for_each(|x| *x = if rng.random_bool(0.5) { f32::NEG_INFINITY } else { f32::NAN });
            rows[5][vocab / 2] = f32::INFINITY;
            rows[5][vocab - 1] = f32::INFINITY;
            let logits = Tensor::from_vec(rows.concat(), (rows.len(), vocab), dev)?;
            let got = argmax_rows(&logits)?.to_vec1::<u32>()?;
            for (r, row) in rows.iter().enumerate() {
                let first = sorted(row)[0];
                let want = if first.1 > f32::NEG_INFINITY { first.0 } else { 0 };
                assert_eq!(got[r], want, "vocab {vocab}, row {r}");
            }
        }
        assert!(argmax_rows(&Tensor::zeros((2, 8), candle_core::DType::BF16, dev)?).is_err(), "bf16 logits");
        Ok(())
    }
    test_device!(argmax_rows_is_the_first_of_a_full_sort);

    /// The head a full sort gives: `(id, value)` descending, ties to the lower id, NaN as -inf.
    fn sorted(row: &[f32]) -> Vec<(u32, f32)> {
        let mut all: Vec<(u32, f32)> =
            (0u32..).zip(row.iter().map(|&x| if x.is_nan() { f32::NEG_INFINITY } else { x + 0.0 })).collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all
    }

    fn close(a: f32, b: f64, what: &str) {
        assert!((f64::from(a) - b).abs() <= 1e-4 * b.abs().max(1.0), "{what}: {a} vs {b}");
    }

    /// Random rows with heavy ties, NaN, infinities and a row of nothing: the ids and logits equal a
    /// full sort's head exactly, the sums match f64 sums.
    fn matches_a_full_sort(dev: &Device) -> Result<()> {
        let mut rng = StdRng::seed_from_u64(23);
        for (vocab, k) in [(1000, 1), (1000, 64), (50_000, 128), (300, 256), (7, 7), (5000, 200)] {
            let mut rows: Vec<Vec<f32>> = (0..5)
                .map(|r| {
                    (0..vocab)
                        .map(|_| match r {
                            // Few distinct values: ties across the cut.
                            0 => rng.random_range(0..6) as f32,
                            _ => rng.random_range(-20.0f32..20.0),
                        })
                        .collect()
                })
                .collect();
            rows[1][vocab / 2] = f32::NAN;
            rows[1][vocab / 3] = f32::INFINITY;
            rows[2][0] = f32::NEG_INFINITY;
            rows[3] = vec![f32::NEG_INFINITY; vocab];
            rows[3][vocab - 1] = f32::NAN;
            rows[4][vocab - 1] = 1e30;
            // -0 ties +0 (the lower id first), as the greedy argmax has it.
            rows[0][1] = -0.0;
            rows[0][0] = 0.0;
            let inv_temps: Vec<f32> = vec![1.0, 1.0 / 0.7, 2.0, 1.0, 1.0 / 1.3];
            let flat: Vec<f32> = rows.iter().flatten().copied().collect();
            let logits = Tensor::from_vec(flat, (rows.len(), vocab), dev)?;
            let out = top_candidates(&logits, &Tensor::new(inv_temps.as_slice(), dev)?, k)?.to_vec2::<f32>()?;
            for (r, (row, got)) in rows.iter().zip(&out).enumerate() {
                let (head, s1, st) = split_row(got, k);
                let want = sorted(row);
                assert_eq!(head, want[..k], "vocab {vocab} k {k} row {r}");
                let max = want[0].1;
                if max == f32::NEG_INFINITY {
                    assert_eq!((s1, st), (0.0, 0.0), "row {r}: nothing above -inf");
                    continue;
                }
                if max.is_infinite() {
                    continue; // +inf: the sums are NaN (inf - inf), as documented
                }
                let sum = |t: f64| -> f64 { want.iter().map(|&(_, v)| (f64::from(v - max) * t).exp()).sum() };
                close(s1, sum(1.0), &format!("vocab {vocab} row {r} sum"));
                close(st, sum(f64::from(inv_temps[r])), &format!("vocab {vocab} row {r} tempered sum"));
            }
        }
        Ok(())
    }
    test_device!(matches_a_full_sort);

    fn bad_arguments_are_errors(dev: &Device) -> Result<()> {
        let logits = Tensor::zeros((2, 10), candle_core::DType::F32, dev)?;
        let t = Tensor::ones(2, candle_core::DType::F32, dev)?;
        assert!(top_candidates(&logits, &t, 0).is_err());
        assert!(top_candidates(&logits, &t, 11).is_err());
        assert!(top_candidates(&logits, &Tensor::ones(3, candle_core::DType::F32, dev)?, 2).is_err());
        assert!(top_candidates(&logits.to_dtype(candle_core::DType::BF16)?, &t, 2).is_err());
        assert_eq!(top_candidates(&logits, &t, 10)?.dims(), [2, 22]);
        Ok(())
    }
    test_device!(bad_arguments_are_errors);
}

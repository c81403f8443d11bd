//! What a step hands back for its sampled rows ([`Readout`], [`StepLogits`]) and the device-side
//! pieces behind it: the greedy argmax on the device ([`device_argmax`]) and the start-up checks of
//! the `top_candidates` and `argmax_rows` kernels against their CPU bodies.

use candle_core::{Device, Tensor};
use sluice_kernels::sampling::{split_row, top_candidates, MAX_CANDIDATES};

use super::kernel_check::passes;
use crate::error::Result;
use crate::sampling::RowHead;

/// Tokens per row a [`Readout::Heads`] step reads back (at most the vocabulary).
pub const HEAD_SIZE: usize = 128;

/// What a step reads back of its sampled rows: on the host (every row copied, `vocab` floats each)
/// or from the device (a plain greedy row's argmax, another row's head: `HEAD_SIZE` tokens and
/// two sums, with the row itself fetched only when the head does not settle the choice).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum DeviceSampling {
    /// From the device off the CPU; on the host on the CPU, where reading the logits costs
    /// nothing and the host sampler is exact and vectorised.
    #[default]
    Auto,
    /// From the model's device, the CPU included (to test the GPU path on the CPU).
    Device,
    /// On the host: every sampled row is copied back and goes through the sampler.
    Host,
}

impl std::str::FromStr for DeviceSampling {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "device" => Ok(Self::Device),
            "host" => Ok(Self::Host),
            other => Err(format!("device sampling must be auto, device or host, got `{other}`")),
        }
    }
}

/// What a step hands back for its sampled rows.
#[derive(Clone, Debug, PartialEq)]
pub enum Readout {
    /// Every sampled row's logits, for the sampler.
    Logits,
    /// Only each row's argmax (ties to the lowest id, NaN as `-inf`, as the sampler's greedy
    /// choice), computed on the device.
    Argmax,
    /// Each row's head: its `k` most likely tokens and softmax sums, the tempered one with
    /// `inv_temps[i]` for the `i`-th sampled row (`sluice_kernels::sampling::top_candidates`).
    Heads {
        /// Tokens per row, in `1..=min(vocab, MAX_CANDIDATES)`.
        k: usize,
        /// `1 / temperature` per sampled row (1 for a greedy one).
        inv_temps: Vec<f32>,
    },
}

/// The outcome of one step: entry `i` belongs to the `i`-th sampling sequence of the batch.
#[derive(Debug, Clone)]
pub enum StepLogits {
    /// `[num_sampled, vocab]` f32 logits, on the host ([`Readout::Logits`]).
    Rows(Vec<Vec<f32>>),
    /// `[num_sampled]` chosen token ids ([`Readout::Argmax`]).
    Ids(Vec<u32>),
    /// Each row's head ([`Readout::Heads`]), and the `[num_sampled, vocab]` f32 logits where they
    /// are (valid until the next step), for a row the head does not settle.
    Heads {
        /// One per sampled row.
        heads: Vec<RowHead>,
        /// The rows, on the model's device.
        logits: Tensor,
    },
}

impl StepLogits {
    /// Rows, ids or heads held.
    pub fn len(&self) -> usize {
        match self {
            Self::Rows(rows) => rows.len(),
            Self::Ids(ids) => ids.len(),
            Self::Heads { heads, .. } => heads.len(),
        }
    }

    /// Whether no row was sampled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `t`, ready to be read back: on CUDA candle copies a tensor's whole storage to the host before
/// applying its layout, so a view (a few rows of a larger buffer) is first made compact there.
pub fn readable(t: &Tensor) -> Result<Tensor> {
    Ok(if t.device().is_cpu() { t.clone() } else { t.force_contiguous()? })
}

/// Whether `top_candidates` on `device` gives what its CPU body gives on rows of `vocab` logits
/// made to find its faults (random values; few distinct values, so ties cross the head's edge,
/// with `-0` among the zeros; NaN, `-inf` and one large value; nothing above `-inf`): the same ids
/// and logits, sums within 1e-3. Run once at start-up, so that a device whose kernel misbehaves
/// reads whole rows instead (and says so) rather than sampling wrongly.
pub(super) fn check_heads(device: &Device, vocab: usize) -> bool {
    use rand::{Rng, SeedableRng};
    let run = || -> Result<bool> {
        let k = HEAD_SIZE.min(vocab).min(MAX_CANDIDATES);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let mut rows: Vec<Vec<f32>> = vec![
            (0..vocab).map(|_| rng.random_range(-10.0f32..10.0)).collect(),
            (0..vocab).map(|i| if i % 7 == 0 { -0.0 } else { rng.random_range(0..4) as f32 }).collect(),
            (0..vocab).map(|_| rng.random_range(-3.0f32..3.0)).collect(),
            vec![f32::NEG_INFINITY; vocab],
        ];
        for i in (0..vocab).step_by(5) {
            rows[2][i] = if i % 2 == 0 { f32::NAN } else { f32::NEG_INFINITY };
        }
        rows[2][vocab / 2] = 1e4;
        rows[3][vocab - 1] = f32::NAN;
        let logits = Tensor::from_vec(rows.concat(), (rows.len(), vocab), &Device::Cpu)?;
        let inv_temps = Tensor::new(&[1.0f32, 0.5, 2.0, 1.3], &Device::Cpu)?;
        let want = top_candidates(&logits, &inv_temps, k)?.to_vec2::<f32>()?;
        let got = top_candidates(&logits.to_device(device)?, &inv_temps.to_device(device)?, k)?.to_vec2::<f32>()?;
        Ok(heads_agree(&want, &got, k))
    };
    let found = run().map(|agree| (!agree).then(|| "other ids, logits or sums".to_string()));
    passes(found, "top_candidates", "sampled rows are read whole")
}

/// Whether `argmax_rows` on `device` gives its CPU body's ids on rows of `vocab` logits made to
/// find its faults (random values; a few distinct values, so the largest is tied across many ids
/// and `-0` meets `+0`; NaN and `-inf` around one large value; nothing above `-inf`). Run once at
/// start-up, so that a device whose kernel misbehaves reads whole rows for greedy steps too (and
/// says so) rather than choosing wrong tokens.
pub(super) fn check_argmax(device: &Device, vocab: usize) -> bool {
    let found = argmax_agrees(device, vocab, device_argmax).map(|agree| (!agree).then(|| "other ids".to_string()));
    passes(found, "argmax_rows", "sampled rows are read whole")
}

/// [`check_argmax`]'s comparison, with `argmax` standing for `argmax_rows` on `device`.
fn argmax_agrees(device: &Device, vocab: usize, argmax: impl Fn(&Tensor) -> Result<Tensor>) -> Result<bool> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xa59);
    let mut rows: Vec<Vec<f32>> = vec![
        (0..vocab).map(|_| rng.random_range(-10.0f32..10.0)).collect(),
        (0..vocab).map(|i| if i % 3 == 0 { -0.0 } else { rng.random_range(-3..1) as f32 }).collect(),
        (0..vocab).map(|_| rng.random_range(-3.0f32..3.0)).collect(),
        vec![f32::NEG_INFINITY; vocab],
    ];
    for i in (0..vocab).step_by(5) {
        rows[2][i] = if i % 2 == 0 { f32::NAN } else { f32::NEG_INFINITY };
    }
    rows[2][vocab - 1] = 1e4;
    rows[3][vocab / 2] = f32::NAN;
    let logits = Tensor::from_vec(rows.concat(), (rows.len(), vocab), &Device::Cpu)?;
    let want = device_argmax(&logits)?.to_vec1::<u32>()?;
    let got = argmax(&logits.to_device(device)?)?.to_vec1::<u32>()?;
    Ok(want == got)
}

/// Whether two `top_candidates` outputs of `k` per row agree: the same rows, ids and logits, sums
/// within 1e-3 (relative above 1).
fn heads_agree(want: &[Vec<f32>], got: &[Vec<f32>], k: usize) -> bool {
    want.len() == got.len()
        && want.iter().zip(got).all(|(w, g)| {
            let ((w_top, w1, wt), (g_top, g1, gt)) = (split_row(w, k), split_row(g, k));
            let close = |a: f32, b: f32| (a - b).abs() <= 1e-3 * a.abs().max(1.0);
            w_top == g_top && close(w1, g1) && close(wt, gt)
        })
}

/// The argmax of each row of `[rows, vocab]` f32 logits by the sampler's greedy rule: the lowest
/// id holding the row's largest value, NaN counting as `-inf`, and 0 for a row with nothing above
/// `-inf` (`sluice_kernels::sampling::argmax_rows`: one launch where the logits live; only the ids
/// are copied back). candle's own `argmax` promises neither the lowest id on ties, which bf16
/// logits make common, nor a NaN rule.
pub fn device_argmax(logits: &Tensor) -> Result<Tensor> {
    Ok(sluice_kernels::sampling::argmax_rows(logits)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::{SampleContext, Sampler, SamplingParams};

    /// What the host sampler picks greedily from `row`.
    fn host_greedy(row: &[f32]) -> u32 {
        let params = SamplingParams::default();
        Sampler::new(&params, 0).sample(row, &params, &SampleContext::default()).token
    }

    #[test]
    fn the_heads_check_runs_and_rejects_a_wrong_head() -> Result<()> {
        // The check's rows (edge cases, vocabularies smaller than `HEAD_SIZE`) run through the op.
        for vocab in [1, 50, 3000] {
            assert!(check_heads(&Device::Cpu, vocab), "vocabulary of {vocab}");
            assert!(check_argmax(&Device::Cpu, vocab), "vocabulary of {vocab}");
            // An argmax that takes the last of tied ids, or lets a NaN win, is refused.
            let last_of_ties = |t: &Tensor| -> Result<Tensor> {
                let ids: Vec<u32> = t
                    .to_vec2::<f32>()?
                    .iter()
                    .map(|row| {
                        let best = row.iter().copied().filter(|x| !x.is_nan()).fold(f32::NEG_INFINITY, f32::max);
                        row.iter().rposition(|&x| x == best).unwrap_or(0) as u32
                    })
                    .collect();
                Ok(Tensor::new(ids, t.device())?)
            };
            assert!(vocab < 50 || !argmax_agrees(&Device::Cpu, vocab, last_of_ties).unwrap(), "vocabulary of {vocab}");
            let nan_wins = |t: &Tensor| -> Result<Tensor> {
                let ids: Vec<u32> = t
                    .to_vec2::<f32>()?
                    .iter()
                    .map(|row| row.iter().position(|x| x.is_nan()).unwrap_or(0) as u32)
                    .collect();
                Ok(Tensor::new(ids, t.device())?)
            };
            assert!(vocab < 50 || !argmax_agrees(&Device::Cpu, vocab, nan_wins).unwrap(), "vocabulary of {vocab}");
        }
        // What it compares: any wrong id, logit or sum fails it, rounding of the sums does not.
        let k = 4;
        let logits = Tensor::randn(0f32, 2f32, (3, 40), &Device::Cpu)?;
        let want = top_candidates(&logits, &Tensor::new(&[1.0f32, 0.5, 2.0], &Device::Cpu)?, k)?.to_vec2::<f32>()?;
        assert!(heads_agree(&want, &want, k));
        let nudged = |i: usize, f: &dyn Fn(f32) -> f32| {
            let mut got = want.clone();
            got[1][i] = f(got[1][i]);
            got
        };
        assert!(heads_agree(&want, &nudged(2 * k, &|s| s * (1.0 + 1e-5)), k), "sum rounding");
        assert!(!heads_agree(&want, &nudged(2 * k + 1, &|s| s * 1.01), k), "a tempered sum off by 1%");
        assert!(!heads_agree(&want, &nudged(0, &|v| v - 1e-3), k), "a logit");
        assert!(!heads_agree(&want, &nudged(k + 1, &|id| f32::from_bits(id.to_bits() + 1)), k), "an id");
        let mut swapped = want.clone();
        swapped[2].swap(k, k + 1);
        assert!(!heads_agree(&want, &swapped, k), "two ids swapped");
        assert!(!heads_agree(&want, &want[..2], k), "a row missing");
        Ok(())
    }

    #[test]
    fn device_argmax_matches_the_host_greedy_choice() -> Result<()> {
        let (nan, inf) = (f32::NAN, f32::INFINITY);
        let vocab = 300;
        let mut rows: Vec<Vec<f32>> = vec![
            vec![0.0; vocab],               // all tied: id 0
            vec![f32::NEG_INFINITY; vocab], // nothing above -inf: 0
            vec![nan; vocab],               // all NaN: 0
        ];
        let mut r = vec![1.0; vocab];
        r[7] = 5.0;
        r[250] = 5.0; // tie across chunks: the lower id
        r[3] = nan;
        rows.push(r);
        let mut r = vec![f32::NEG_INFINITY; vocab];
        r[0] = nan;
        r[9] = f32::NEG_INFINITY;
        rows.push(r); // NaN and -inf only: 0
        let mut r = vec![-1.0; vocab];
        r[299] = inf;
        r[100] = -0.0;
        rows.push(r);
        let mut r = vec![-2.0; vocab];
        r[42] = 0.0;
        r[41] = -0.0; // 0.0 == -0.0: the lower id
        rows.push(r);
        // Pseudo-random rows with a few exact ties near the top.
        let mut x = 0x2545_f491_u32;
        for k in 0..8 {
            let row: Vec<f32> = (0..vocab)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    ((x % 64) as f32) * 0.25 + k as f32
                })
                .collect();
            rows.push(row);
        }
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let logits = Tensor::from_vec(flat, (rows.len(), vocab), &Device::Cpu)?;
        let got = device_argmax(&logits)?.to_vec1::<u32>()?;
        let want: Vec<u32> = rows.iter().map(|r| host_greedy(r)).collect();
        assert_eq!(got, want);
        Ok(())
    }
}

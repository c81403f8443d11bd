//! Sampling from the head of a row: its most likely tokens, most likely first, and softmax sums
//! over the whole row (`sluice_kernels::sampling::top_candidates`), for rows whose logits stay on
//! the device.
//!
//! The stages are [`Sampler::sample`]'s (suppressed ids → temperature → top-k → top-p → min-p →
//! one uniform draw), run over the tokens in descending order of probability, and the draw walks
//! them in that order too. So the head settles the choice unless a stage's cut or the draw falls
//! past it. Then the whole row is fetched: a cut past the head sends the row through the host
//! sampler (no number was drawn yet); a draw past the head (only plain temperature sampling has no
//! cut to stop it) walks the head again and then the rest of the row in id order, with the same
//! uniform number, so nothing sorts the vocabulary (one draw per token either way). The result is
//! a function of the seed, the step and the logits, and is a draw from the same distribution as
//! [`Sampler::sample`]'s; it is not the same function of the seed, since that one walks in id
//! order from the start. Which path a row takes depends on its own parameters only (see
//! [`Sampler::samples_from_head`]), never on the rest of the batch.

use rand::Rng;

use super::{sanitize, token_logprob, SampleContext, Sampled, Sampler, SamplingParams, TokenLogprob};

/// A row's head, as `top_candidates` gives it.
#[derive(Clone, Debug, PartialEq)]
pub struct RowHead {
    /// The row's largest logits with their ids, descending, ties to the lower id, NaN as `-inf`.
    pub top: Vec<(u32, f32)>,
    /// `Σ exp(l - max)` over the whole row (`max` = `top[0]`).
    pub sum_exp: f32,
    /// `Σ exp((l - max) / T)` over the whole row, `T` the row's temperature.
    pub sum_exp_t: f32,
}

/// A head's walk that drew `u` and fell past the head's last token.
#[derive(Clone, Debug)]
pub(super) struct PendingDraw {
    u: f32,
    /// The head's ids, in the order the walk took them.
    head: Vec<u32>,
}

/// What the walk over a sorted row (or its head) decided.
enum Pick {
    Token(u32),
    /// Nothing can be chosen: [`Sampler::sample`] then takes the raw argmax.
    Masked,
    /// The head does not settle it.
    NeedRow,
}

impl Sampler {
    /// Whether a row with `params` may be sampled from a head of `head_len` tokens: no logit bias
    /// or penalties (they move tokens across the head's edge), `top_k` and `logprobs` within it.
    pub fn samples_from_head(params: &SamplingParams, head_len: usize) -> bool {
        !params.has_processing() && params.top_k <= head_len && params.logprobs.is_none_or(|n| n <= head_len)
    }

    /// Picks the next token from `head` (for a row that [`Sampler::samples_from_head`]), or `None`
    /// when the head does not settle it: then call [`Sampler::sample_row_after_head`] with the row.
    pub fn sample_head(&mut self, head: &RowHead, params: &SamplingParams, ctx: &SampleContext) -> Option<Sampled> {
        // A draw left by an earlier token whose row never came (a failed read) is not this one's.
        self.pending_draw = None;
        let token = match self.pick_sorted(&head.top, Some(head.sum_exp_t), params, ctx) {
            Pick::Token(t) => t,
            Pick::Masked => raw_argmax(&head.top),
            Pick::NeedRow => return None,
        };
        let logprob = params.logprobs.map(|n| {
            let max = head.top.first().map_or(f32::NEG_INFINITY, |c| c.1);
            let lse = max + head.sum_exp.ln();
            let logprob_of = |x: f32| {
                if x == f32::NEG_INFINITY || !lse.is_finite() {
                    f32::NEG_INFINITY
                } else {
                    x - lse
                }
            };
            let raw = head.top.iter().find(|c| c.0 == token).map_or(f32::NEG_INFINITY, |c| c.1);
            TokenLogprob {
                token,
                logprob: logprob_of(raw),
                top: head.top.iter().take(n).map(|&(id, v)| (id, logprob_of(v))).collect(),
            }
        });
        Some(Sampled { token, logprob })
    }

    /// The token of a row whose head did not settle it ([`Sampler::sample_head`] gave `None`), from
    /// the whole row (`logits`, one per vocabulary entry). If the head's walk had drawn its uniform
    /// number, the walk starts again with that number over the head and goes on over the rest of
    /// the row in id order (`walk_past_head`); if it stopped before drawing, the host sampler
    /// ([`Sampler::sample`]) takes the row. Neither sorts the vocabulary.
    pub fn sample_row_after_head(&mut self, logits: &[f32], params: &SamplingParams, ctx: &SampleContext) -> Sampled {
        let Some(pending) = self.pending_draw.take() else {
            return self.sample(logits, params, ctx);
        };
        let token = walk_past_head(logits, &pending, params.temperature, ctx.suppress)
            .unwrap_or_else(|| super::argmax_slice(logits));
        let logprob = params.logprobs.map(|n| token_logprob(logits, token, n));
        Sampled { token, logprob }
    }

    /// A new uniform number for this token's draw.
    fn draw(&mut self) -> f32 {
        self.rng.random::<f32>()
    }

    /// The stages over `sorted` (raw logits, descending, ties to the lower id), as
    /// `Sampler::sample_processed` runs them. `tail_total` is `Σ exp((l - max) / T)` over the whole
    /// row (`max` = `sorted[0]`) when `sorted` is only its head, `None` when it is the whole row.
    fn pick_sorted(
        &mut self,
        sorted: &[(u32, f32)],
        tail_total: Option<f32>,
        params: &SamplingParams,
        ctx: &SampleContext,
    ) -> Pick {
        let whole_row = tail_total.is_none();
        let raw_max = sorted.first().map_or(f32::NEG_INFINITY, |c| c.1);
        if raw_max == f32::NEG_INFINITY {
            return Pick::Masked;
        }
        let suppressed = |id: u32| ctx.suppress.contains(&id);
        let allowed: Vec<(u32, f32)> =
            sorted.iter().filter(|c| c.1 > f32::NEG_INFINITY && !suppressed(c.0)).copied().collect();
        // Every token past the head is below every allowed one in it.
        if params.is_greedy() {
            return match allowed.first() {
                Some(c) => Pick::Token(c.0),
                None if whole_row => Pick::Masked,
                None => Pick::NeedRow,
            };
        }
        let Some(&(_, top)) = allowed.first() else {
            return if whole_row { Pick::Masked } else { Pick::NeedRow };
        };
        // Whether `cands` holds every token still in play (else the rest lies past the head).
        let mut complete = whole_row;
        let mut cands = allowed;
        if params.top_k > 0 {
            if cands.len() >= params.top_k {
                cands.truncate(params.top_k);
                complete = true;
            } else if !complete {
                return Pick::NeedRow;
            }
        }
        // A suppressed id past the head holds mass the head cannot subtract.
        if !complete && ctx.suppress.iter().any(|id| !sorted.iter().any(|c| c.0 == *id)) {
            return Pick::NeedRow;
        }
        // Weights relative to the most likely allowed token (weight 1), as the host's; zero (an
        // underflow) and NaN weights (a `+inf` logit) drop out, as there.
        let inv_t = 1.0 / params.temperature;
        let weight = |v: f32, from: f32| ((v - from) * inv_t).exp();
        let mut cands: Vec<(u32, f32)> = cands.into_iter().map(|(id, v)| (id, weight(v, top))).collect();
        if !complete && cands.last().is_some_and(|c| c.1 == 0.0) {
            complete = true; // the tail is no heavier than the head's last weight: nothing
        }
        cands.retain(|c| c.1 > 0.0);
        if cands.is_empty() {
            // As the host: a draw is made, nothing is chosen.
            self.draw();
            return Pick::Masked;
        }
        let head_sum = |c: &[(u32, f32)]| c.iter().map(|c| c.1).sum::<f32>();
        let mut total = if complete {
            head_sum(&cands)
        } else {
            // The device's sum counts from the raw maximum and includes the head's suppressed
            // tokens. Their weight is taken off, unless they hold most of the sum: the difference
            // would then be mostly rounding, and the row decides.
            let all = tail_total.unwrap_or(f32::NAN);
            let dropped: f32 = sorted.iter().filter(|c| suppressed(c.0)).map(|c| weight(c.1, raw_max)).sum();
            let scale = weight(top, raw_max);
            if !all.is_finite() || dropped * 2.0 > all || scale <= 0.0 {
                return Pick::NeedRow;
            }
            (all - dropped) / scale
        };
        if params.top_p < 1.0 {
            let target = params.top_p * total;
            let mut acc = 0.0f32;
            match cands.iter().position(|c| {
                acc += c.1;
                acc >= target
            }) {
                Some(i) => {
                    cands.truncate(i + 1);
                    complete = true;
                    total = acc;
                }
                None if !complete => return Pick::NeedRow,
                None => {}
            }
        }
        if params.min_p > 0.0 {
            // `cands[0]` is the most likely allowed token, weight 1.
            let keep = cands.iter().take_while(|c| c.1 >= params.min_p).count();
            if keep == cands.len() && !complete {
                return Pick::NeedRow;
            }
            cands.truncate(keep.max(1));
            complete = true;
            total = head_sum(&cands);
        }
        let u = self.draw();
        let mut x = u * total;
        for &(id, w) in &cands {
            if x < w {
                return Pick::Token(id);
            }
            x -= w;
        }
        if complete {
            // Rounding can leave `x` a hair above the last weight.
            return cands.last().map_or(Pick::Masked, |c| Pick::Token(c.0));
        }
        // The draw lands past the head: the whole row continues the walk with the same number.
        // With no cut before the draw, this is plain temperature sampling (`walk_past_head`).
        self.pending_draw = Some(PendingDraw { u, head: sorted.iter().map(|c| c.0).collect() });
        Pick::NeedRow
    }
}

/// The walk of a draw that fell past its row's head (plain temperature sampling: no top-k, top-p
/// or min-p cut), over the whole row: weights `exp((l - top) / T)` of the tokens not suppressed
/// (`top` the largest such logit; zero and NaN weights drop out, as in the host sampler), `u` times
/// their sum walked over the head's tokens in the head's order, then over the others in id order.
/// Each token is taken with probability its weight over the sum, as with any fixed order; no sort.
/// `None` when nothing has a weight.
fn walk_past_head(logits: &[f32], pending: &PendingDraw, temperature: f32, suppress: &[u32]) -> Option<u32> {
    let allowed = |id: u32, v: f32| v > f32::NEG_INFINITY && !suppress.contains(&id);
    let top = (0u32..)
        .zip(logits)
        .map(|(id, &x)| (id, sanitize(x)))
        .filter(|&(id, v)| allowed(id, v))
        .fold(f32::NEG_INFINITY, |m, (_, v)| m.max(v));
    if top == f32::NEG_INFINITY {
        return None;
    }
    let inv_t = 1.0 / temperature;
    let weights: Vec<f32> = (0u32..)
        .zip(logits)
        .map(|(id, &x)| {
            let v = sanitize(x);
            let w = if allowed(id, v) { ((v - top) * inv_t).exp() } else { 0.0 };
            if w > 0.0 {
                w
            } else {
                0.0 // NaN (a `+inf` logit) too
            }
        })
        .collect();
    let total: f32 = weights.iter().sum();
    if !(total > 0.0 && total.is_finite()) {
        return None;
    }
    let mut x = pending.u * total;
    let mut last = None;
    let mut step = |id: u32, w: f32| {
        if w > 0.0 {
            if x < w {
                return true;
            }
            x -= w;
            last = Some(id);
        }
        false
    };
    for &id in &pending.head {
        if step(id, weights.get(id as usize).copied().unwrap_or(0.0)) {
            return Some(id);
        }
    }
    let mut in_head = pending.head.clone();
    in_head.sort_unstable();
    let mut skip = in_head.iter().peekable();
    for (id, &w) in (0u32..).zip(&weights) {
        while skip.next_if(|&&h| h < id).is_some() {}
        if skip.peek() != Some(&&id) && step(id, w) {
            return Some(id);
        }
    }
    // Rounding can leave `x` a hair above the last weight.
    last
}

/// The raw argmax of a sorted row or head: its first token, or 0 when nothing is above `-inf`
/// (the host sampler's rule).
fn raw_argmax(sorted: &[(u32, f32)]) -> u32 {
    match sorted.first() {
        Some(&(id, v)) if v > f32::NEG_INFINITY => id,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use std::cmp::Ordering;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// A logit as a head holds it: NaN as `-inf`, `-0` as `+0` (equal to it, so the two tie and the
    /// lower id comes first, as in the greedy argmax).
    fn head_value(x: f32) -> f32 {
        sanitize(x) + 0.0
    }

    /// Descending by logit, ties to the lower id.
    fn by_logit_desc(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
        b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
    }

    /// The head `top_candidates` would give for `row` (computed here in f64).
    fn head(row: &[f32], k: usize, temperature: f32) -> RowHead {
        let mut sorted: Vec<(u32, f32)> = (0u32..).zip(row.iter().map(|&x| head_value(x))).collect();
        sorted.sort_by(by_logit_desc);
        let max = sorted[0].1;
        let sum = |t: f64| sorted.iter().map(|c| (f64::from(c.1 - max) * t).exp()).sum::<f64>() as f32;
        RowHead { top: sorted[..k].to_vec(), sum_exp: sum(1.0), sum_exp_t: sum(1.0 / f64::from(temperature)) }
    }

    /// Head first, then the row when asked: what the engine does.
    fn sample(s: &mut Sampler, row: &[f32], k: usize, params: &SamplingParams, ctx: &SampleContext) -> (u32, bool) {
        match s.sample_head(&head(row, k, params.temperature.max(1e-3)), params, ctx) {
            Some(out) => (out.token, false),
            None => (s.sample_row_after_head(row, params, ctx).token, true),
        }
    }

    fn row(rng: &mut StdRng, vocab: usize, spread: f32) -> Vec<f32> {
        (0..vocab).map(|_| rng.random_range(-spread..spread)).collect()
    }

    /// The walk over the whole row sorted (what a head of the whole vocabulary settles).
    fn sorted_walk(s: &mut Sampler, row: &[f32], params: &SamplingParams, ctx: &SampleContext) -> u32 {
        let mut sorted: Vec<(u32, f32)> = (0u32..).zip(row.iter().map(|&x| head_value(x))).collect();
        sorted.sort_by(by_logit_desc);
        match s.pick_sorted(&sorted, None, params, ctx) {
            Pick::Token(t) => t,
            _ => raw_argmax(&sorted),
        }
    }

    /// Whenever a head settles the choice, it is the choice the walk over the whole sorted row
    /// makes with the same seed; and heads settle a good share of draws.
    #[test]
    fn a_head_settles_only_what_the_whole_row_would() {
        let mut rng = StdRng::seed_from_u64(3);
        let base = SamplingParams { temperature: 0.8, ..SamplingParams::default() };
        let greedy = SamplingParams { temperature: 0.0, ..base.clone() };
        let cases = [
            base.clone(),
            SamplingParams { top_k: 5, ..base.clone() },
            SamplingParams { top_p: 0.5, ..base.clone() },
            SamplingParams { top_p: 0.95, temperature: 1.5, ..base.clone() },
            SamplingParams { min_p: 0.2, ..base.clone() },
            SamplingParams { top_k: 40, top_p: 0.9, min_p: 0.05, ..base.clone() },
            SamplingParams { temperature: 0.05, top_p: 0.9, ..base.clone() },
            greedy.clone(),
        ];
        let (mut settled, mut asked) = (0, 0);
        for (c, params) in cases.iter().enumerate() {
            for trial in 0..60u64 {
                let spread = [1.0, 4.0, 12.0][trial as usize % 3];
                let logits = row(&mut rng, 500, spread);
                // Now and then the most likely token suppressed (EOS under `min_tokens`), with an
                // id that no small head holds.
                let best = sorted_walk(&mut Sampler::new(&greedy, 0), &logits, &greedy, &SampleContext::default());
                let suppress: Vec<u32> = if trial % 4 == 0 { vec![best, 7] } else { vec![] };
                let ctx = SampleContext { suppress: &suppress, ..SampleContext::default() };
                let seed = trial * 31 + c as u64;
                let want = sorted_walk(&mut Sampler::new(params, seed), &logits, params, &ctx);
                for k in [1, 8, 64, 500] {
                    let h = head(&logits, k, params.temperature.max(1e-3));
                    match Sampler::new(params, seed).sample_head(&h, params, &ctx) {
                        Some(got) => {
                            assert_eq!(got.token, want, "case {c} trial {trial} k {k}");
                            settled += 1;
                        }
                        None => assert!(k < 500, "case {c} trial {trial}: the whole row settles everything"),
                    }
                    asked += 1;
                }
            }
        }
        assert!(settled * 2 > asked && settled < asked, "{settled} of {asked} settled by the head");
    }

    /// The head path and the host sampler draw from one distribution: frequencies over many seeds
    /// agree within sampling noise, for each stage.
    #[test]
    fn the_head_path_samples_the_host_distribution() {
        let mut rng = StdRng::seed_from_u64(5);
        let logits = row(&mut rng, 50, 3.0);
        let base = SamplingParams { temperature: 0.9, ..SamplingParams::default() };
        let suppress = [logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32];
        // The most likely token (in every head) and the least likely (past every head) suppressed:
        // the head cannot subtract the latter's weight, so these rows go to the host sampler.
        let least = logits.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
        let both_ends = [suppress[0], least];
        // The most likely token suppressed and far ahead of the rest: weights must count from the
        // best allowed token, not the suppressed one (they would all underflow at T = 0.1).
        let mut dominant = logits.clone();
        dominant[suppress[0] as usize] += 40.0;
        for (params, suppress, logits) in [
            (base.clone(), &[][..], &logits),
            (SamplingParams { temperature: 3.0, ..base.clone() }, &both_ends[..], &logits),
            // Hot, with the most likely token suppressed: most draws fall past the head and the
            // walk over the row must skip that token (it is in the head).
            (SamplingParams { temperature: 3.0, ..base.clone() }, &suppress[..], &logits),
            (SamplingParams { top_k: 6, ..base.clone() }, &[][..], &logits),
            (SamplingParams { top_p: 0.7, ..base.clone() }, &suppress[..], &logits),
            (SamplingParams { min_p: 0.1, temperature: 1.4, ..base.clone() }, &[][..], &logits),
            (SamplingParams { temperature: 0.1, ..base.clone() }, &suppress[..], &dominant),
            (SamplingParams { temperature: 1.0, top_p: 0.9, ..base.clone() }, &suppress[..], &dominant),
        ] {
            let ctx = SampleContext { suppress, ..SampleContext::default() };
            let n = 20_000;
            let (mut host, mut ours) = (vec![0f64; 50], vec![0f64; 50]);
            for seed in 0..n {
                host[Sampler::new(&params, seed).sample(logits, &params, &ctx).token as usize] += 1.0;
                ours[sample(&mut Sampler::new(&params, seed + n), logits, 8, &params, &ctx).0 as usize] += 1.0;
            }
            for (id, (h, o)) in host.iter().zip(&ours).enumerate() {
                let p = h / n as f64;
                // Five standard deviations of the difference of two binomial frequencies.
                let tol = 5.0 * (2.0 * p.max(1.0 / n as f64) * (1.0 - p) / n as f64).sqrt();
                assert!((h - o).abs() / n as f64 <= tol, "{params:?} token {id}: host {h}, head {o}");
                if suppress.contains(&(id as u32)) {
                    assert_eq!(o, &0.0, "a suppressed id was drawn");
                }
            }
        }
    }

    /// A `+inf` logit: the host takes it (its weight is NaN, every other 0: nothing is drawable, so
    /// the raw argmax); so does the head, with and without `min_p`, without a panic.
    #[test]
    fn an_infinite_logit_is_the_raw_argmax() {
        let mut logits = vec![0.5f32; 300];
        logits[42] = f32::INFINITY;
        logits[7] = 2.0;
        for params in [
            SamplingParams { temperature: 0.7, ..SamplingParams::default() },
            SamplingParams { temperature: 0.7, min_p: 0.1, ..SamplingParams::default() },
            SamplingParams { temperature: 0.7, top_k: 3, top_p: 0.5, ..SamplingParams::default() },
        ] {
            let ctx = SampleContext::default();
            let want = Sampler::new(&params, 1).sample(&logits, &params, &ctx).token;
            assert_eq!(want, 42);
            for k in [4, 300] {
                assert_eq!(
                    sample(&mut Sampler::new(&params, 1), &logits, k, &params, &ctx).0,
                    want,
                    "{params:?} k {k}"
                );
            }
        }
    }

    #[test]
    fn greedy_logprobs_and_masked_rows() {
        let mut logits = vec![0.5f32; 300];
        logits[200] = 3.0;
        logits[201] = 3.0; // tie: the lower id
        logits[7] = f32::NAN;
        let params = SamplingParams { logprobs: Some(3), ..SamplingParams::default() };
        let ctx = SampleContext::default();
        let h = head(&logits, 16, 1.0);
        let got = Sampler::new(&params, 0).sample_head(&h, &params, &ctx).unwrap();
        let want = Sampler::new(&params, 0).sample(&logits, &params, &ctx);
        assert_eq!(got.token, want.token);
        let (g, w) = (got.logprob.unwrap(), want.logprob.unwrap());
        assert_eq!(g.top.iter().map(|c| c.0).collect::<Vec<_>>(), w.top.iter().map(|c| c.0).collect::<Vec<_>>());
        for (a, b) in g.top.iter().zip(&w.top).chain([(&(0, g.logprob), &(0, w.logprob))]) {
            assert!((a.1 - b.1).abs() < 1e-5, "{a:?} vs {b:?}");
        }
        // Greedy with the top two suppressed: the next one, still from the head.
        let suppress = [200, 201];
        let ctx = SampleContext { suppress: &suppress, ..SampleContext::default() };
        let got = Sampler::new(&params, 0).sample_head(&h, &params, &ctx).unwrap().token;
        assert_eq!(got, Sampler::new(&params, 0).sample(&logits, &params, &ctx).token);
        // -0 ties +0: the lower id, as the host's argmax.
        let ctx = SampleContext::default();
        let mut zeros = vec![-1.0f32; 20];
        (zeros[3], zeros[9]) = (-0.0, 0.0);
        let got = Sampler::new(&params, 0).sample_head(&head(&zeros, 4, 1.0), &params, &ctx).unwrap().token;
        assert_eq!((got, Sampler::new(&params, 0).sample(&zeros, &params, &ctx).token), (3, 3));
        // Nothing above -inf: token 0, as the host's rule.
        let none = vec![f32::NEG_INFINITY; 10];
        let sampled = SamplingParams { temperature: 1.0, ..SamplingParams::default() };
        assert_eq!(Sampler::new(&sampled, 0).sample_head(&head(&none, 4, 1.0), &sampled, &ctx).unwrap().token, 0);
        // Parameters the head cannot serve.
        assert!(Sampler::samples_from_head(&sampled, 4));
        assert!(!Sampler::samples_from_head(&SamplingParams { top_k: 5, ..sampled.clone() }, 4));
        assert!(!Sampler::samples_from_head(&SamplingParams { logit_bias: vec![(1, 2.0)], ..sampled.clone() }, 4));
        assert!(!Sampler::samples_from_head(&SamplingParams { presence_penalty: 0.5, ..sampled.clone() }, 4));
        assert!(!Sampler::samples_from_head(&SamplingParams { logprobs: Some(5), ..sampled }, 4));
    }
}

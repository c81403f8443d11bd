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
mod tests;

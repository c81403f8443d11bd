//! Sampling: [`SamplingParams`] (in `params.rs`) and the per-sequence [`Sampler`] that turns one
//! row of logits into the next token.
//!
//! The stages run in this order, each skipped when its parameter is neutral:
//! logit bias → suppressed ids → allowed ids (structured outputs) → repetition penalty → presence/frequency penalties →
//! (greedy: argmax) or temperature → top-k → top-p → min-p → one uniform draw.
//! Logprobs are always those of the raw model logits (vLLM's default), not the processed ones.
//!
//! The vocabulary is 32k-150k entries, so no stage sorts it: top-k is a selection, top-p a
//! weighted selection, and greedy decoding without penalties, bias or suppressed ids is two
//! vectorised passes that allocate nothing (logprobs, when asked for, add three passes and `n`
//! entries). NaN logits are treated as `-inf`.

mod head;
mod params;

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use head::RowHead;
pub use params::{SamplingParams, GREEDY_TEMPERATURE, MAX_LOGPROBS, MAX_STOP_STRINGS};

/// What the sampler needs to know about the sequence besides its logits.
#[derive(Clone, Copy, Debug, Default)]
pub struct SampleContext<'a> {
    /// The prompt's token ids (for the repetition penalty).
    pub prompt_tokens: &'a [u32],
    /// The tokens generated so far, oldest first; it only grows during a sequence's life.
    pub output_tokens: &'a [u32],
    /// Token ids that must not be chosen now (EOS and stop ids while the output is shorter than
    /// `min_tokens`). Ids outside the vocabulary are ignored.
    pub suppress: &'a [u32],
    /// With a structured output: the ids that may come next, as a bitmask (bit `t % 32` of word
    /// `t / 32`); ids past its end are not allowed. `None`: every id.
    pub allowed: Option<&'a [u32]>,
}

/// The lowest id set in an `allowed` bitmask.
fn first_allowed(allowed: &[u32]) -> Option<u32> {
    let (word, bits) = allowed.iter().enumerate().find(|(_, w)| **w != 0)?;
    Some(word as u32 * 32 + bits.trailing_zeros())
}

/// Whether `token` is set in an `allowed` bitmask.
fn is_allowed(allowed: &[u32], token: u32) -> bool {
    allowed.get(token as usize / 32).is_some_and(|w| w & (1 << (token % 32)) != 0)
}

/// The log-probability of a chosen token and of the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The chosen token.
    pub token: u32,
    /// Its log-softmax under the raw model logits (`-inf` if its logit was `-inf` or NaN).
    pub logprob: f32,
    /// The `n` most likely tokens under the raw logits with their logprobs, most likely first,
    /// ties to the lower id; shorter than `n` only when the vocabulary is.
    pub top: Vec<(u32, f32)>,
}

/// The outcome of one sampling step.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    /// The chosen token id. Should every token be masked, the raw argmax (0 for an all-NaN row),
    /// or with an `allowed` mask the lowest id it allows.
    pub token: u32,
    /// `Some` exactly when the params asked for logprobs.
    pub logprob: Option<TokenLogprob>,
}

/// Per-sequence sampling state: the random stream and the penalty bookkeeping.
///
/// One lives as long as its sequence, so a preempted and resumed sequence continues the same
/// random stream. The history is caught up from [`SampleContext::output_tokens`] at each step,
/// which costs O(tokens added since the last step), never O(output length).
#[derive(Clone, Debug)]
pub struct Sampler {
    rng: StdRng,
    /// Occurrences of each output token (presence/frequency penalties count output only).
    counts: HashMap<u32, u32>,
    /// Prompt ∪ output tokens for the repetition penalty; built on first use, since most
    /// requests never set it and a prompt can be long.
    seen: Option<HashSet<u32>>,
    /// How many of `output_tokens` are already in `counts` and `seen`.
    counted: usize,
    /// A walk over a row's head that drew its uniform number and fell past the head, for the walk
    /// over the whole row to continue (`head.rs`).
    pending_draw: Option<head::PendingDraw>,
}

impl Sampler {
    /// A sampler seeded with `params.seed`, or with `fallback_seed` when the request has none.
    pub fn new(params: &SamplingParams, fallback_seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(params.seed.unwrap_or(fallback_seed)),
            counts: HashMap::new(),
            seen: None,
            counted: 0,
            pending_draw: None,
        }
    }

    /// Picks the next token from one row of `logits` (one per vocabulary entry). Draws exactly
    /// one uniform number when not greedy, so the choice is a function of the seed, the step and
    /// the logits. `params` must be the (validated) params this sampler was made with.
    pub fn sample(&mut self, logits: &[f32], params: &SamplingParams, ctx: &SampleContext) -> Sampled {
        let token = if takes_raw_argmax(params, ctx) {
            argmax_slice(logits)
        } else {
            // Everything masked: the raw argmax, or under a grammar the first id it allows (the
            // output must stay inside the grammar whatever the logits).
            self.sample_processed(logits, params, ctx).unwrap_or_else(|| match ctx.allowed {
                Some(allowed) => first_allowed(allowed).unwrap_or_else(|| argmax_slice(logits)),
                None => argmax_slice(logits),
            })
        };
        let logprob = params.logprobs.map(|n| token_logprob(logits, token, n));
        Sampled { token, logprob }
    }

    /// Whether [`Sampler::sample`] would return the raw argmax of the logits and nothing else:
    /// greedy, with no bias, penalty, suppressed id or logprobs. Such a row's token may be taken
    /// where the logits are (on the GPU, with the same rule: lowest id on ties, NaN as `-inf`, 0
    /// when nothing is above `-inf`) and this sampler skipped, since that path neither draws a
    /// random number nor touches the penalty history.
    pub fn is_plain_argmax(params: &SamplingParams, ctx: &SampleContext) -> bool {
        takes_raw_argmax(params, ctx) && params.logprobs.is_none()
    }

    /// The full pipeline; `None` when every token is masked.
    fn sample_processed(&mut self, logits: &[f32], params: &SamplingParams, ctx: &SampleContext) -> Option<u32> {
        // (vocab): position == token id until the first filtering stage.
        let mut cands: Vec<(u32, f32)> = (0u32..).zip(logits.iter().map(|&x| sanitize(x))).collect();
        for &(id, bias) in &params.logit_bias {
            if let Some(c) = cands.get_mut(id as usize) {
                c.1 += bias;
            }
        }
        for &id in ctx.suppress {
            if let Some(c) = cands.get_mut(id as usize) {
                c.1 = f32::NEG_INFINITY;
            }
        }
        if let Some(allowed) = ctx.allowed {
            for c in cands.iter_mut().filter(|c| !is_allowed(allowed, c.0)) {
                c.1 = f32::NEG_INFINITY;
            }
        }
        if params.has_penalties() {
            self.catch_up(params, ctx);
            self.apply_penalties(&mut cands, params);
        }
        if params.is_greedy() {
            let best = argmax(cands.iter().map(|c| c.1));
            return (cands.get(best as usize)?.1 > f32::NEG_INFINITY).then_some(best);
        }
        let max = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return None;
        }
        // Top-k on the logits: the temperature does not change the order, and exp then runs on
        // k values instead of the vocabulary.
        if params.top_k > 0 && params.top_k < cands.len() {
            cands.select_nth_unstable_by(params.top_k - 1, by_weight_desc);
            cands.truncate(params.top_k);
        }
        // From here on `.1` is an unnormalised probability exp((l - max) / T) in [0, 1]; taking
        // the difference first keeps it from overflowing for small temperatures.
        let inv_t = 1.0 / params.temperature;
        for c in cands.iter_mut() {
            c.1 = ((c.1 - max) * inv_t).exp();
        }
        cands.retain(|c| c.1 > 0.0);
        if params.top_p < 1.0 {
            truncate_top_p(&mut cands, params.top_p);
        }
        if params.min_p > 0.0 {
            // The most likely token always survives top-k and top-p, and its weight is 1.
            cands.retain(|c| c.1 >= params.min_p);
        }
        let total: f32 = cands.iter().map(|c| c.1).sum();
        let mut u = self.rng.random::<f32>() * total;
        for &(id, w) in &cands {
            if u < w {
                return Some(id);
            }
            u -= w;
        }
        // Rounding can leave `u` a hair above the last weight.
        cands.last().map(|c| c.0)
    }

    /// Brings `counts` (and `seen`, once the repetition penalty needs it) up to date with the
    /// tokens generated since the last step.
    fn catch_up(&mut self, params: &SamplingParams, ctx: &SampleContext) {
        let out = ctx.output_tokens;
        if out.len() < self.counted {
            // The output shrank (it should not); rebuild rather than trust stale counts.
            self.counts.clear();
            self.seen = None;
            self.counted = 0;
        }
        if params.repetition_penalty != 1.0 && self.seen.is_none() {
            let old = &out[..self.counted];
            self.seen = Some(ctx.prompt_tokens.iter().chain(old).copied().collect());
        }
        for &t in &out[self.counted..] {
            *self.counts.entry(t).or_insert(0) += 1;
            if let Some(seen) = &mut self.seen {
                seen.insert(t);
            }
        }
        self.counted = out.len();
    }

    /// Repetition penalty over `seen`, then presence/frequency over `counts`, on a vocab-indexed
    /// `cands`. Each touches only the distinct tokens of the history.
    fn apply_penalties(&self, cands: &mut [(u32, f32)], params: &SamplingParams) {
        let r = params.repetition_penalty;
        if let Some(seen) = self.seen.as_ref().filter(|_| r != 1.0) {
            for &t in seen {
                if let Some(c) = cands.get_mut(t as usize) {
                    c.1 = if c.1 > 0.0 { c.1 / r } else { c.1 * r };
                }
            }
        }
        let (presence, frequency) = (params.presence_penalty, params.frequency_penalty);
        if presence != 0.0 || frequency != 0.0 {
            for (&t, &n) in &self.counts {
                if let Some(c) = cands.get_mut(t as usize) {
                    c.1 -= presence + frequency * n as f32;
                }
            }
        }
    }
}

/// Whether the token is the raw logits' argmax: greedy, no bias, penalty or suppressed id.
fn takes_raw_argmax(params: &SamplingParams, ctx: &SampleContext) -> bool {
    params.is_greedy() && !params.has_processing() && ctx.suppress.is_empty() && ctx.allowed.is_none()
}

/// NaN becomes `-inf` (never chosen); everything else is kept.
fn sanitize(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x
    }
}

/// Index of the largest value, NaN counting as `-inf`, ties to the lowest index; 0 when empty.
fn argmax(values: impl Iterator<Item = f32>) -> u32 {
    let (mut best, mut best_v) = (0u32, f32::NEG_INFINITY);
    for (i, v) in (0u32..).zip(values) {
        if v > best_v {
            (best, best_v) = (i, v);
        }
    }
    best
}

/// [`argmax`] of a slice, the same index, in two passes that vectorise (the running comparison
/// of `argmax` does not): the maximum with NaN skipped, then the first index holding it.
fn argmax_slice(values: &[f32]) -> u32 {
    const LANES: usize = 16;
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            // Not `f32::max`: a NaN compares false, so it never replaces the running maximum.
            *m = if v > *m { v } else { *m };
        }
    }
    let max = lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    if max == f32::NEG_INFINITY {
        // Nothing above -inf: `argmax` never moves off index 0.
        return 0;
    }
    // The first value equal to the maximum is the first that was strictly above everything before
    // it (0.0 and -0.0 compare equal here as they do there).
    let chunk = values.chunks(LANES * 16).position(|c| c.iter().fold(false, |hit, &v| hit | (v == max))).unwrap_or(0);
    let start = chunk * LANES * 16;
    values[start..].iter().position(|&v| v == max).map_or(0, |i| (start + i) as u32)
}

/// Descending by value (logit or weight), ties to the lower id: a total order, so selections are reproducible.
fn by_weight_desc(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Keeps the smallest set of most likely candidates whose weight reaches `p` of the total, in
/// no particular order. A weighted quickselect: each round halves the range in which the cut
/// lies, so the cost is O(candidates), however flat the distribution.
fn truncate_top_p(cands: &mut Vec<(u32, f32)>, p: f32) {
    let target = p * cands.iter().map(|c| c.1).sum::<f32>();
    // `cands[..lo]` are the `lo` most likely, weighing `acc` < target; `cands[lo..hi]` are the
    // next most likely; the smallest set reaching the target is `cands[..k]` for some k in lo+1..=hi.
    let (mut lo, mut hi, mut acc) = (0, cands.len(), 0.0f32);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        cands[lo..hi].select_nth_unstable_by(mid - lo, by_weight_desc);
        let upper: f32 = cands[lo..mid].iter().map(|c| c.1).sum();
        if acc + upper >= target {
            hi = mid;
        } else {
            (lo, acc) = (mid, acc + upper);
        }
    }
    cands.truncate(hi);
}

/// Log-softmax of the raw `logits` for `token` and the `n` most likely tokens, in three passes
/// and without allocating more than `n` entries.
fn token_logprob(logits: &[f32], token: u32, n: usize) -> TokenLogprob {
    let max = logits.iter().map(|&x| sanitize(x)).fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| f64::from((sanitize(x) - max).exp())).sum();
    let lse = max + sum.ln() as f32;
    let logprob_of = |x: f32| {
        if x == f32::NEG_INFINITY || !lse.is_finite() {
            f32::NEG_INFINITY
        } else {
            x - lse
        }
    };
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (id, v) in (0u32..).zip(logits.iter().map(|&x| sanitize(x))) {
        if n > 0 && (top.len() < n || top.last().is_some_and(|l| v > l.1)) {
            // Earlier ids sort first among equals, so the new one goes after them.
            let at = top.partition_point(|c| c.1 >= v);
            top.insert(at, (id, v));
            top.truncate(n);
        }
    }
    let raw = logits.get(token as usize).map_or(f32::NEG_INFINITY, |&x| sanitize(x));
    TokenLogprob { token, logprob: logprob_of(raw), top: top.into_iter().map(|(id, v)| (id, logprob_of(v))).collect() }
}

#[cfg(test)]
mod tests;

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
            assert_eq!(sample(&mut Sampler::new(&params, 1), &logits, k, &params, &ctx).0, want, "{params:?} k {k}");
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

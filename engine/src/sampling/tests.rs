use super::*;
use crate::ResponseFormat;

const NO_CTX: SampleContext<'static> = ctx(&[], &[], &[]);

const fn ctx<'a>(prompt: &'a [u32], output: &'a [u32], suppress: &'a [u32]) -> SampleContext<'a> {
    SampleContext { prompt_tokens: prompt, output_tokens: output, suppress, allowed: None }
}

/// Greedy defaults with `edit` applied.
fn greedy(edit: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams::default();
    edit(&mut p);
    p
}

/// Temperature 1 with `seed`, then `edit` applied.
fn random(seed: u64, edit: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    greedy(|p| {
        (p.temperature, p.seed) = (1.0, Some(seed));
        edit(p)
    })
}

fn once(logits: &[f32], params: &SamplingParams, ctx: &SampleContext) -> Sampled {
    Sampler::new(params, 0).sample(logits, params, ctx)
}

/// How often each token is drawn in `n` draws from one sampler.
fn histogram(logits: &[f32], params: &SamplingParams, n: usize) -> Vec<usize> {
    let mut s = Sampler::new(params, 0);
    let mut hist = vec![0; logits.len()];
    for _ in 0..n {
        hist[s.sample(logits, params, &NO_CTX).token as usize] += 1;
    }
    hist
}

#[test]
fn greedy_takes_the_argmax_and_the_lowest_id_on_ties() {
    assert_eq!(once(&[0.1, 3.0, -1.0, 2.9], &greedy(|_| ()), &NO_CTX).token, 1);
    assert_eq!(once(&[1.0, 5.0, 2.0, 5.0], &greedy(|_| ()), &NO_CTX).token, 1);
    let slow_path = greedy(|p| p.logit_bias = vec![(0, 0.0)]);
    assert_eq!(once(&[1.0, 5.0, 2.0, 5.0], &slow_path, &NO_CTX).token, 1);
}

#[test]
fn argmax_slice_equals_argmax_on_ties_infinities_and_nans() {
    let specials = [f32::NAN, f32::NEG_INFINITY, f32::INFINITY, 0.0, -0.0, 1.0, -1.0, f32::MAX, f32::MIN];
    let mut rng = StdRng::seed_from_u64(11);
    for case in 0..3000 {
        let len = [0, 1, 2, 15, 16, 17, 31, 255, 256, 257, 1000, 49152][case % 12];
        // Few distinct values make ties likely; some rows are mostly or wholly special values.
        let distinct = 1 + case % 7;
        let special_share = [0.0, 0.01, 0.5, 1.0][case / 12 % 4];
        let row: Vec<f32> = (0..len)
            .map(|_| {
                if rng.random::<f64>() < special_share {
                    specials[rng.random_range(0..specials.len())]
                } else {
                    rng.random_range(0..distinct) as f32 - 3.0
                }
            })
            .collect();
        assert_eq!(argmax_slice(&row), argmax(row.iter().copied()), "case {case}: {row:?}");
    }
    let edge: [&[f32]; 7] = [
        &[],
        &[f32::NAN; 40],
        &[f32::NEG_INFINITY; 40],
        &[-0.0, 0.0, -0.0],
        &[0.0, -0.0],
        &[f32::NEG_INFINITY, f32::NAN, -5.0, f32::NAN, -5.0],
        &[1.0, f32::INFINITY, 2.0, f32::INFINITY],
    ];
    for row in edge {
        assert_eq!(argmax_slice(row), argmax(row.iter().copied()), "{row:?}");
    }
    // A late maximum past the first block of 256, and one in the tail past the last full lane chunk.
    let mut row = vec![0.5f32; 49152 + 7];
    row[30000] = 2.0;
    row[40000] = 2.0;
    assert_eq!(argmax_slice(&row), 30000);
    row[49152 + 5] = 3.0;
    assert_eq!(argmax_slice(&row), 49152 + 5);
}

#[test]
fn greedy_with_logprobs_takes_the_same_token_as_without() {
    let mut rng = StdRng::seed_from_u64(12);
    for _ in 0..50 {
        let logits: Vec<f32> = (0..5000).map(|_| rng.random_range(0..40) as f32 * 0.25).collect();
        let plain = once(&logits, &greedy(|_| ()), &NO_CTX);
        let with_logprobs = once(&logits, &greedy(|p| p.logprobs = Some(2)), &NO_CTX);
        assert_eq!(plain.token, argmax(logits.iter().copied()));
        assert_eq!(with_logprobs.token, plain.token);
        assert_eq!(with_logprobs.logprob.unwrap().top[0].0, plain.token, "the top logprob is the argmax");
    }
}

#[test]
fn a_seed_fixes_the_sequence_of_draws() {
    let logits = [0.0f32; 8];
    let draws = |p: SamplingParams, fallback: u64| {
        let mut s = Sampler::new(&p, fallback);
        (0..50).map(|_| s.sample(&logits, &p, &NO_CTX).token).collect::<Vec<_>>()
    };
    assert_eq!(draws(random(7, |_| ()), 1), draws(random(7, |_| ()), 2));
    assert_ne!(draws(random(7, |_| ()), 1), draws(random(8, |_| ()), 1));
    // Without a seed, the fallback seed decides.
    let unseeded = || random(0, |p| p.seed = None);
    assert_eq!(draws(unseeded(), 5), draws(unseeded(), 5));
    assert_ne!(draws(unseeded(), 5), draws(unseeded(), 6));
}

#[test]
fn temperature_sampling_follows_the_softmax() {
    let logits = [1.0f32, 2.0, 0.5, 0.0];
    for t in [1.0f32, 0.5] {
        let n = 20_000;
        let hist = histogram(&logits, &random(42, |p| p.temperature = t), n);
        let w: Vec<f32> = logits.iter().map(|l| (l / t).exp()).collect();
        let total: f32 = w.iter().sum();
        for (count, w) in hist.iter().zip(&w) {
            let freq = *count as f32 / n as f32;
            assert!((freq - w / total).abs() < 0.02, "T={t}: {hist:?}");
        }
    }
}

#[test]
fn top_k_one_is_greedy() {
    let logits = [0.3f32, 2.0, 1.9, 2.0, -4.0];
    assert_eq!(histogram(&logits, &random(1, |p| p.top_k = 1), 100)[1], 100);
    let hist = histogram(&logits, &random(1, |p| p.top_k = 2), 1000);
    assert_eq!(hist[1] + hist[3], 1000);
}

#[test]
fn top_p_keeps_the_smallest_set_reaching_p() {
    let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
    let kept = |top_p: f32| {
        let hist = histogram(&logits, &random(3, |p| p.top_p = top_p), 2000);
        hist.iter().filter(|&&c| c > 0).count()
    };
    assert_eq!((kept(0.4), kept(0.75), kept(0.85), kept(1.0)), (1, 2, 3, 4));
    // 300 equal weights: half of the mass is the 150 lowest ids (ties go to the lower id).
    let mut cands: Vec<(u32, f32)> = (0..300).rev().map(|i| (i, 1.0)).collect();
    truncate_top_p(&mut cands, 0.5);
    let mut ids: Vec<u32> = cands.iter().map(|c| c.0).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..150).collect::<Vec<_>>());
}

#[test]
fn min_p_drops_tokens_far_below_the_top() {
    let logits: Vec<f32> = [0.6f32, 0.3, 0.1].iter().map(|p| p.ln()).collect();
    let hist = histogram(&logits, &random(4, |p| p.min_p = 0.2), 3000);
    assert_eq!(hist[2], 0);
    assert!(hist[0] > hist[1] && hist[1] > 0, "{hist:?}");
}

#[test]
fn repetition_penalty_covers_prompt_and_output() {
    let p = greedy(|p| p.repetition_penalty = 1.2);
    let pick = |logits: &[f32], prompt, output| once(logits, &p, &ctx(prompt, output, &[])).token;
    // Positive logits are divided (2.0 / 1.2 < 1.9), negative multiplied (-1.0 * 1.2 < -1.1).
    assert_eq!(pick(&[2.0, 1.9], &[0], &[]), 1);
    assert_eq!(pick(&[2.0, 1.9], &[], &[0]), 1);
    assert_eq!(pick(&[-1.0, -1.1], &[], &[0]), 1);
    assert_eq!(pick(&[2.0, 1.9], &[1], &[]), 0);
}

#[test]
fn presence_and_frequency_penalties_count_output_only_and_incrementally() {
    let logits = [2.0f32, 1.0];
    let freq = greedy(|p| p.frequency_penalty = 0.4);
    let (mut s, mut output) = (Sampler::new(&freq, 0), Vec::new());
    for _ in 0..4 {
        let t = s.sample(&logits, &freq, &ctx(&[0, 0, 0, 0], &output, &[])).token;
        output.push(t);
    }
    // 2.0 - 0.4 * 3 = 0.8 < 1.0: token 0 three times, then token 1.
    assert_eq!(output, [0, 0, 0, 1]);
    let presence = greedy(|p| p.presence_penalty = 1.5);
    assert_eq!(once(&logits, &presence, &ctx(&[0], &[], &[])).token, 0);
    assert_eq!(once(&logits, &presence, &ctx(&[], &[0], &[])).token, 1);
}

#[test]
fn logit_bias_forces_and_bans() {
    let logits = [5.0f32, 0.0, -3.0];
    let force = random(5, |p| p.logit_bias = vec![(2, 100.0)]);
    assert_eq!(histogram(&logits, &force, 200)[2], 200);
    let ban = greedy(|p| p.logit_bias = vec![(0, -100.0)]);
    assert_eq!(once(&logits, &ban, &NO_CTX).token, 1);
}

#[test]
fn suppressed_tokens_are_never_chosen() {
    let (logits, ctx) = ([0.0f32, 9.0, 8.5], ctx(&[], &[], &[1, 1000]));
    assert_eq!(once(&logits, &greedy(|_| ()), &ctx).token, 2);
    let p = random(6, |_| ());
    let mut s = Sampler::new(&p, 0);
    assert!((0..500).all(|_| s.sample(&logits, &p, &ctx).token != 1));
}

#[test]
fn logprobs_are_the_raw_log_softmax() {
    let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
    let lse = logits.iter().map(|l| l.exp()).sum::<f32>().ln();
    let logprob = |p: SamplingParams| once(&logits, &p, &NO_CTX).logprob;
    // The bias changes the choice but not the reported logprobs.
    let lp = logprob(greedy(|p| (p.logprobs, p.logit_bias) = (Some(3), vec![(4, 50.0)])));
    let lp = lp.unwrap();
    assert_eq!(lp.token, 4);
    assert!((lp.logprob - (-1.0 - lse)).abs() < 1e-5);
    assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 3, 2]);
    assert!((lp.top[0].1 - (3.0 - lse)).abs() < 1e-5 && lp.top[2].1 < lp.top[1].1);
    assert_eq!(logprob(greedy(|_| ())), None);
    let lp = logprob(greedy(|p| p.logprobs = Some(0))).unwrap();
    assert!(lp.top.is_empty() && lp.token == 1);
    let lp = logprob(greedy(|p| p.logprobs = Some(20))).unwrap();
    assert_eq!(lp.top.len(), logits.len());
}

#[test]
fn nan_logits_do_not_panic() {
    let (some_nan, all_nan) = ([f32::NAN, 1.0, f32::NAN, 0.5], [f32::NAN; 4]);
    let heavy = random(1, |p| {
        (p.temperature, p.top_k, p.top_p, p.min_p) = (0.8, 3, 0.9, 0.05);
        (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) = (1.3, 0.5, 0.5);
        (p.logit_bias, p.logprobs) = (vec![(0, 1.0)], Some(4));
    });
    let ctx = ctx(&[0, 2], &[1], &[3]);
    for p in [greedy(|_| ()), random(1, |_| ()), heavy] {
        let mut s = Sampler::new(&p, 0);
        for _ in 0..20 {
            assert_eq!(s.sample(&some_nan, &p, &ctx).token, 1);
        }
        assert!(s.sample(&all_nan, &p, &ctx).token < 4);
        assert!(s.sample(&[f32::INFINITY, 0.0], &p, &NO_CTX).token < 2);
    }
}

#[test]
fn plain_argmax_is_exactly_the_greedy_fast_path_without_logprobs() {
    let none = ctx(&[], &[], &[]);
    assert!(Sampler::is_plain_argmax(&greedy(|_| {}), &none));
    assert!(Sampler::is_plain_argmax(&greedy(|p| p.temperature = GREEDY_TEMPERATURE / 2.0), &none));
    // Stop conditions do not change the choice; they are applied after it.
    assert!(Sampler::is_plain_argmax(&greedy(|p| p.ignore_eos = true), &none));
    assert!(Sampler::is_plain_argmax(&greedy(|p| p.stop_token_ids = vec![3]), &none));
    type Edit = fn(&mut SamplingParams);
    let changes: [Edit; 6] = [
        |p| p.temperature = 0.7,
        |p| p.logprobs = Some(0),
        |p| p.logit_bias = vec![(1, 1.0)],
        |p| p.repetition_penalty = 1.1,
        |p| p.presence_penalty = 0.5,
        |p| p.frequency_penalty = -0.5,
    ];
    for edit in changes {
        assert!(!Sampler::is_plain_argmax(&greedy(edit), &none));
    }
    assert!(!Sampler::is_plain_argmax(&greedy(|_| {}), &ctx(&[], &[], &[2])), "min_tokens suppresses EOS");
}

#[test]
fn an_allowed_mask_keeps_every_choice_inside_it() {
    let json = |p: &mut SamplingParams| p.response_format = ResponseFormat::JsonObject;
    // Tokens 1, 3 and 40 allowed (word 0: bits 1 and 3; word 1: bit 8).
    let allowed = [0b1010, 1 << 8];
    let ctx = SampleContext { allowed: Some(&allowed), ..NO_CTX };
    let mut logits = vec![0.0f32; 48];
    logits[0] = 9.0; // the model's favourite, not allowed
    logits[40] = 2.0;
    assert_eq!(once(&logits, &greedy(json), &ctx).token, 40);
    let counts = {
        let params = random(5, json);
        let mut s = Sampler::new(&params, 0);
        let mut seen = [0usize; 48];
        for _ in 0..2000 {
            seen[s.sample(&logits, &params, &ctx).token as usize] += 1;
        }
        seen
    };
    assert_eq!(counts[1] + counts[3] + counts[40], 2000, "only allowed ids are drawn");
    assert!(counts[40] > counts[1] && counts[1] > 0);
    // Every allowed token at -inf: the lowest allowed id, never the raw argmax.
    for id in [1, 3, 40] {
        logits[id] = f32::NEG_INFINITY;
    }
    assert_eq!(once(&logits, &greedy(json), &ctx).token, 1);
    assert_eq!(once(&logits, &random(1, json), &ctx).token, 1);
    // Ids past the mask's end are not allowed.
    let short = [0u32];
    let ctx = SampleContext { allowed: Some(&short), ..NO_CTX };
    let logits = vec![1.0f32; 48];
    assert_eq!(once(&logits, &greedy(json), &ctx).token, 0, "nothing allowed: the raw argmax is all that is left");
}

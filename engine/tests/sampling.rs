//! Sampling and stopping through the whole engine on the real model.

mod common;

use sluice_engine::{Engine, FinishReason, Request, SamplingParams, StreamEvent};

fn sampled(engine: &Engine, seed: u64) -> Vec<u32> {
    let params =
        SamplingParams { temperature: 1.0, top_p: 0.95, seed: Some(seed), max_tokens: 24, ..Default::default() };
    engine.generate(Request::user("Tell me a story about a dragon.").with_params(params)).unwrap().token_ids
}

#[test]
fn seeded_sampling_is_reproducible_and_seed_dependent() {
    let engine = common::shared_engine();
    let a = sampled(engine, 7);
    let b = sampled(engine, 7);
    let c = sampled(engine, 8);
    assert_eq!(a, b, "same seed, same tokens");
    assert_ne!(a, c, "another seed gives another story");
}

#[test]
fn stop_string_ends_the_text_before_it() {
    let engine = common::shared_engine();
    let full = engine.generate(Request::user("What is the capital of France?").max_tokens(32)).unwrap();
    assert!(full.text.contains(" Paris"), "{:?}", full.text);
    let params = SamplingParams { stop: vec![" Paris".into()], max_tokens: 32, ..Default::default() };
    let stopped = engine.generate(Request::user("What is the capital of France?").with_params(params)).unwrap();
    let expected = &full.text[..full.text.find(" Paris").unwrap()];
    assert_eq!(stopped.text, expected);
    assert_eq!(stopped.finish.reason, FinishReason::Stop);
    assert_eq!(stopped.finish.stop_string.as_deref(), Some(" Paris"));
}

#[test]
fn ignore_eos_and_min_tokens_control_length() {
    let engine = common::shared_engine();
    let natural = engine.generate(Request::user("What is the capital of France?").max_tokens(64)).unwrap();
    assert_eq!(natural.finish.reason, FinishReason::Stop);
    let short = natural.token_ids.len();

    let params = SamplingParams { ignore_eos: true, max_tokens: short + 10, ..Default::default() };
    let long = engine.generate(Request::user("What is the capital of France?").with_params(params)).unwrap();
    assert_eq!(long.token_ids.len(), short + 10);
    assert_eq!(long.finish.reason, FinishReason::Length);

    let params = SamplingParams { min_tokens: short + 5, max_tokens: 64, ..Default::default() };
    let min = engine.generate(Request::user("What is the capital of France?").with_params(params)).unwrap();
    assert!(min.token_ids.len() >= short + 5, "{} < {}", min.token_ids.len(), short + 5);
    assert!(!engine.tokenizer().eos_token_ids().iter().any(|e| min.token_ids[..short + 4].contains(e)));
}

#[test]
fn logprobs_come_with_each_token() {
    let engine = common::shared_engine();
    let params = SamplingParams { logprobs: Some(3), max_tokens: 8, ..Default::default() };
    let out = engine.generate(Request::user("What is the capital of France?").with_params(params)).unwrap();
    assert_eq!(out.logprobs.len(), out.token_ids.len());
    for (lp, &id) in out.logprobs.iter().zip(&out.token_ids) {
        assert_eq!(lp.token, id);
        assert_eq!(lp.top.len(), 3);
        assert_eq!(lp.top[0].0, id, "greedy picks the most likely token");
        assert!(lp.logprob <= 0.0 && lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
    }
}

#[test]
fn streamed_text_never_splits_a_character_and_matches_the_tokens() {
    let engine = common::shared_engine();
    let params = SamplingParams { max_tokens: 40, ..Default::default() };
    let prompt = "Write the word 'café' and then the Japanese word for thank you, ありがとう, three times.";
    let stream = engine.submit(Request::user(prompt).with_params(params)).unwrap();
    let (mut text, mut ids) = (String::new(), Vec::new());
    for event in stream {
        match event {
            StreamEvent::Token(t) => {
                assert!(!t.text.contains('\u{FFFD}'), "a delta split a character: {:?}", t.text);
                text.push_str(&t.text);
                ids.push(t.token_id);
            }
            StreamEvent::Finished(_) => break,
            StreamEvent::Error(e) => panic!("{e}"),
        }
    }
    assert_eq!(text, engine.tokenizer().decode(&ids, true).unwrap());
    assert!(!text.is_ascii(), "the answer has multi-byte characters: {text:?}");
}

#[test]
fn bad_requests_are_refused_with_the_field_named() {
    let engine = common::shared_engine();
    let too_long = engine.submit(Request::user("hi").max_tokens(1_000_000)).unwrap_err().to_string();
    assert!(too_long.contains("`max_tokens`"), "{too_long}");
    let params = SamplingParams { top_p: 1.5, ..Default::default() };
    let bad = engine.submit(Request::user("hi").with_params(params)).unwrap_err().to_string();
    assert!(bad.contains("`top_p`"), "{bad}");
    let empty = engine.submit(Request::chat(vec![])).unwrap_err().to_string();
    assert!(empty.contains("`messages`"), "{empty}");
    let oov = engine.submit(Request::tokens(vec![1, 999_999])).unwrap_err().to_string();
    assert!(oov.contains("vocabulary"), "{oov}");
}

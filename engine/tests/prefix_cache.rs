//! Prefix caching on the real model: a request whose prompt starts with blocks another request
//! computed reuses their K/V, and gets exactly the tokens and logprobs it gets with nothing cached.

mod common;

use sluice_engine::{ChatMessage, Completion, Engine, Request, SamplingParams};

const MAX_TOKENS: usize = 24;

fn params() -> SamplingParams {
    SamplingParams { logprobs: Some(3), ..common::greedy(MAX_TOKENS) }
}

fn run(engine: &Engine, request: Request) -> Completion {
    engine.generate(request).expect("generation succeeds")
}

fn cold_engine() -> Engine {
    common::engine_with(|c| c.scheduler.prefix_caching = false)
}

/// Same tokens, same logprobs to the bit.
fn assert_same(cached: &Completion, cold: &Completion, what: &str) {
    assert_eq!(cached.token_ids, cold.token_ids, "{what}: tokens differ from the run without cache");
    assert_eq!(cached.logprobs, cold.logprobs, "{what}: logprobs differ from the run without cache");
    assert_eq!(cached.text, cold.text);
    assert_eq!(cached.finish.reason, cold.finish.reason);
}

#[test]
fn cached_prompts_give_the_tokens_and_logprobs_of_a_cold_run() {
    let cached_engine = common::engine_with(|_| {});
    let cold = cold_engine();
    let prompts = common::prompts();
    // One after another: each request finds the shared system prompt (and, the second time round,
    // its whole prompt) in the cache.
    for round in 0..2 {
        for p in &prompts[..6] {
            let request = || Request::user(p.as_str()).with_params(params());
            let hot = run(&cached_engine, request());
            let reference = run(&cold, request());
            assert_same(&hot, &reference, &format!("{p:?}, round {round}"));
            let usage = hot.finish.usage;
            assert_eq!(reference.finish.usage.cached_tokens, 0, "nothing is cached with caching off");
            assert!(usage.cached_tokens < usage.prompt_tokens, "the last prompt token always runs");
            if round == 1 {
                assert_eq!(usage.cached_tokens, (usage.prompt_tokens - 1) / 16 * 16, "{p:?}: whole prompt cached");
            } else if p != &prompts[0] {
                assert!(usage.cached_tokens >= 16, "{p:?}: the system prompt's first block is shared");
            }
        }
    }
    let stats = cached_engine.stats();
    assert!(stats.prefix_cache_hits > 0 && stats.prefix_cache_hits < stats.prefix_cache_queries, "{stats:?}");
    assert!(stats.kv_blocks_cached > 0);
    assert_eq!(cold.stats().prefix_cache_queries, 0);
    common::wait_for_empty_pool(&cached_engine);
}

#[test]
fn a_conversation_reuses_its_earlier_turns() {
    let cached_engine = common::engine_with(|_| {});
    let cold = cold_engine();
    let mut messages = vec![ChatMessage::new("user", "Name three colours of the rainbow.")];
    for turn in 0..3 {
        let hot = run(&cached_engine, Request::chat(messages.clone()).with_params(params()));
        let reference = run(&cold, Request::chat(messages.clone()).with_params(params()));
        assert_same(&hot, &reference, &format!("turn {turn}"));
        if turn > 0 {
            // Everything up to the last turn's answer was computed by the turn before.
            let usage = hot.finish.usage;
            assert!(usage.cached_tokens + 40 >= usage.prompt_tokens, "turn {turn}: {usage:?}");
        }
        messages.push(ChatMessage::new("assistant", hot.text.clone()));
        messages.push(ChatMessage::new("user", format!("And {} more?", turn + 1)));
    }
    common::wait_for_empty_pool(&cached_engine);
}

#[test]
fn seeded_sampling_and_batches_read_the_same_cached_blocks() {
    let cached_engine = common::engine_with(|_| {});
    let cold = cold_engine();
    let sampled = SamplingParams { temperature: 0.9, top_p: 0.95, seed: Some(11), ..params() };
    let prompt = "Write two sentences about rivers.";
    // Warm the cache, then run the same prompt four times at once: the four share its blocks.
    let first = run(&cached_engine, Request::user(prompt).with_params(sampled.clone()));
    let streams: Vec<_> =
        (0..4).map(|_| cached_engine.submit(Request::user(prompt).with_params(sampled.clone())).unwrap()).collect();
    let together: Vec<Completion> = streams.into_iter().map(|s| s.collect_blocking().unwrap()).collect();
    let reference = run(&cold, Request::user(prompt).with_params(sampled));
    assert_same(&first, &reference, "seeded, alone");
    for (i, c) in together.iter().enumerate() {
        assert_same(c, &reference, &format!("seeded, copy {i} of 4 sharing the cached prompt"));
        assert!(c.finish.usage.cached_tokens > 0);
    }
    common::wait_for_empty_pool(&cached_engine);
}

#[test]
fn a_small_pool_that_evicts_and_preempts_keeps_every_output() {
    // 16 blocks of 16 tokens for 16 chat prompts of ~40-60 tokens and 24 new tokens each, all at
    // once and twice over: cached blocks are shared, evicted when the pool runs short, and
    // sequences preempted and recomputed from what is still cached.
    let tight = common::engine_with(|c| {
        c.kv_cache_memory = Some(16 * 16 * 2 * 30 * 3 * 64 * 4);
        c.scheduler.max_batch_tokens = 48;
    });
    assert_eq!(tight.model_info().num_kv_blocks, 16);
    let cold = cold_engine();
    let prompts = common::prompts();
    let reference: Vec<Completion> =
        prompts.iter().map(|p| run(&cold, Request::user(p.as_str()).with_params(params()))).collect();
    for round in 0..2 {
        let streams: Vec<_> =
            prompts.iter().map(|p| tight.submit(Request::user(p.as_str()).with_params(params())).unwrap()).collect();
        let handles: Vec<_> =
            streams.into_iter().map(|s| std::thread::spawn(move || s.collect_blocking().unwrap())).collect();
        for ((p, h), r) in prompts.iter().zip(handles).zip(&reference) {
            assert_same(&h.join().unwrap(), r, &format!("{p:?}, round {round}, small pool"));
        }
    }
    let stats = tight.stats();
    assert!(stats.preemptions > 0, "the pool was meant to force preemption: {stats:?}");
    assert!(stats.prefix_cache_hits > 0, "{stats:?}");
    common::wait_for_empty_pool(&tight);
}

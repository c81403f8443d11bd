//! Batch invariance: a request's greedy tokens do not depend on what else runs with it, on how its
//! prompt is chunked, or on being preempted and recomputed.

mod common;

use sluice_engine::{Engine, Request, TokenStream};

const MAX_TOKENS: usize = 20;

fn submit_all(engine: &Engine, prompts: &[String]) -> Vec<TokenStream> {
    prompts
        .iter()
        .map(|p| engine.submit(Request::user(p.as_str()).with_params(common::greedy(MAX_TOKENS))).unwrap())
        .collect()
}

fn collect_all(streams: Vec<TokenStream>) -> Vec<Vec<u32>> {
    // Collect on separate threads so every stream is drained while the batch runs.
    let handles: Vec<_> =
        streams.into_iter().map(|s| std::thread::spawn(move || s.collect_blocking().unwrap().token_ids)).collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Each prompt's greedy tokens, generated alone (computed once per test binary).
fn alone() -> &'static [Vec<u32>] {
    static ALONE: std::sync::OnceLock<Vec<Vec<u32>>> = std::sync::OnceLock::new();
    ALONE.get_or_init(|| {
        let engine = common::shared_engine();
        common::prompts().iter().map(|p| common::tokens_alone(engine, p, MAX_TOKENS)).collect()
    })
}

#[test]
fn sixteen_prompts_together_equal_each_alone() {
    let prompts = common::prompts();
    let alone = alone();
    let engine = common::engine_with(|_| {});
    let together = collect_all(submit_all(&engine, &prompts));
    for ((p, a), t) in prompts.iter().zip(alone).zip(&together) {
        assert_eq!(a, t, "{p:?}: batched output differs from the output alone");
    }
    common::wait_for_empty_pool(&engine);
}

#[test]
fn chunked_prefill_and_preemption_keep_outputs_identical() {
    let prompts = common::prompts();
    let alone = alone();

    // A pool of 12 blocks of 16 tokens (192 tokens) for 16 sequences of ~40-60 tokens, and a
    // step budget of 24 tokens so prompts are prefilled in chunks.
    // Then again with decode steps padded to fixed batch sizes (the CUDA-graph path, eager on the
    // CPU), whose buffers must follow block tables that preemption empties and refills.
    for cuda_graphs in [false, true] {
        let tight = common::engine_with(|c| {
            c.kv_cache_memory = Some(12 * 16 * 2 * 30 * 3 * 64 * 4);
            c.scheduler.max_batch_tokens = 24;
            c.cuda_graphs = cuda_graphs;
        });
        assert_eq!(tight.model_info().num_kv_blocks, 12);
        let together = collect_all(submit_all(&tight, &prompts));
        let stats = tight.stats();
        assert!(stats.preemptions > 0, "the KV budget was meant to force preemption");
        assert_eq!(stats.decode_graphs.eager > 0, cuda_graphs, "{:?}", stats.decode_graphs);
        for ((p, a), t) in prompts.iter().zip(alone).zip(&together) {
            assert_eq!(a, t, "{p:?}: output changed under chunked prefill and preemption (graphs {cuda_graphs})");
        }
        common::wait_for_empty_pool(&tight);
        // The engine thread's time per step, in phases that fit inside their iterations.
        // (A step's times are published once its iteration ends, a moment after its tokens.)
        let t = (0..500)
            .map(|_| {
                std::thread::sleep(std::time::Duration::from_millis(10));
                tight.stats().step_times
            })
            .find(|t| t.steps >= stats.steps)
            .expect("every step's times are published");
        assert!(t.model > std::time::Duration::ZERO, "{t:?}");
        assert!(t.total >= t.schedule + t.model + t.sample + t.emit, "{t:?}");
    }
}

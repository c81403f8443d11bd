//! Cancellation: dropping a `TokenStream` aborts its request wherever it is, and its blocks return.

mod common;

use std::time::{Duration, Instant};

use sluice_engine::{Request, StreamEvent};

#[test]
fn dropping_streams_while_waiting_prefilling_and_decoding_frees_every_block() {
    // A small step budget makes the long prompt take several steps to prefill.
    let engine = common::engine_with(|c| c.scheduler.max_batch_tokens = 32);
    let long_prompt = "Tell me everything you know about the history of the Roman Empire. ".repeat(12);

    // Decoding: read two tokens, then drop.
    let mut decoding = engine.submit(Request::user("Count from one to one hundred.").max_tokens(200)).unwrap();
    for _ in 0..2 {
        assert!(matches!(decoding.next(), Some(StreamEvent::Token(_))));
    }
    // Mid-prefill: the long prompt needs many 32-token steps; drop it once it holds blocks.
    let prefilling = engine.submit(Request::user(long_prompt.as_str()).max_tokens(50)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while engine.stats().kv_blocks_used < 6 {
        assert!(Instant::now() < deadline, "long prompt never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(prefilling);
    drop(decoding);
    common::wait_for_empty_pool(&engine);

    // Waiting: dropped right after submission, before the admission window lets it run.
    for _ in 0..8 {
        let s = engine.submit(Request::user(long_prompt.as_str()).max_tokens(50)).unwrap();
        drop(s);
    }
    common::wait_for_empty_pool(&engine);
    // The engine still works afterwards.
    let out = engine.generate(Request::user("What is the capital of France?").max_tokens(12)).unwrap();
    assert!(!out.token_ids.is_empty());
    assert_eq!(engine.stats().kv_blocks_used, 0);
}

#[test]
fn full_waiting_queue_refuses_new_submissions() {
    // A long admission window keeps submissions in the waiting queue.
    let engine = common::engine_with(|c| {
        c.scheduler.max_waiting = 2;
        c.scheduler.max_batch_size = 100;
        c.scheduler.batch_timeout = Duration::from_secs(600);
    });
    let a = engine.submit(Request::user("one").max_tokens(4)).unwrap();
    let b = engine.submit(Request::user("two").max_tokens(4)).unwrap();
    let refused = engine.submit(Request::user("three").max_tokens(4)).unwrap_err();
    assert!(matches!(refused, sluice_engine::EngineError::QueueFull(2)), "{refused:?}");
    // Aborting a waiting request makes room again.
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(10);
    let c = loop {
        match engine.submit(Request::user("three").max_tokens(4)) {
            Ok(c) => break c,
            Err(_) => assert!(Instant::now() < deadline, "the aborted request's place never came back"),
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    while engine.stats().waiting != 2 {
        assert!(Instant::now() < deadline, "expected two waiting requests: {:?}", engine.stats());
        std::thread::sleep(Duration::from_millis(5));
    }
    drop((b, c));
    common::wait_for_empty_pool(&engine);
}

//! `sluice-bench engine`: the workload run in-process through the engine crate, no HTTP.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_engine::{Engine, Request, SamplingParams, StreamEvent};

use crate::report::RequestResult;
use crate::workload::WorkItem;

/// Runs `items` through `engine` with `concurrency` requests in flight (closed loop), each with
/// `sampling` (its `max_tokens` set per item, EOS ignored). Returns each request's measurements and
/// the wall time.
pub fn run(
    engine: &Arc<Engine>,
    items: &[WorkItem],
    concurrency: usize,
    sampling: &SamplingParams,
) -> (Vec<RequestResult>, Duration) {
    let next = Arc::new(AtomicUsize::new(0));
    let items: Arc<Vec<WorkItem>> = Arc::new(items.to_vec());
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (engine, next, items, sampling) = (engine.clone(), next.clone(), items.clone(), sampling.clone());
            std::thread::spawn(move || {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    out.push(one(&engine, item, &sampling));
                }
                out
            })
        })
        .collect();
    let results = workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect();
    (results, started.elapsed())
}

/// One request, measured from submission.
fn one(engine: &Engine, item: &WorkItem, sampling: &SamplingParams) -> RequestResult {
    // EOS is ignored so every request makes `max_tokens` tokens, except under a JSON format,
    // where the grammar ends the request when its value is complete.
    let ignore_eos = !sampling.response_format.is_structured();
    let params = SamplingParams { max_tokens: item.max_tokens, ignore_eos, ..sampling.clone() };
    let sent = Instant::now();
    let mut r = RequestResult::default();
    let stream = match engine.submit(Request::user(item.prompt.as_str()).with_params(params)) {
        Ok(s) => s,
        Err(e) => {
            r.error = Some(e.to_string());
            return r;
        }
    };
    r.prompt_tokens = stream.prompt_tokens();
    let mut last = sent;
    for event in stream {
        match event {
            StreamEvent::Token(_) => {
                let now = Instant::now();
                if r.output_tokens == 0 {
                    r.ttft = now - sent;
                } else {
                    r.itl.push(now - last);
                }
                last = now;
                r.output_tokens += 1;
            }
            StreamEvent::Finished(_) => break,
            StreamEvent::Error(e) => {
                r.error = Some(e.to_string());
                break;
            }
        }
    }
    r.e2e = sent.elapsed();
    r
}

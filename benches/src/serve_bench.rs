//! `sluice-bench serve`: a workload sent over HTTP to an OpenAI-compatible server.
//!
//! Two load shapes, as in vLLM's `bench serve`:
//! - closed loop: `concurrency` workers, each sending its next request when the last one ends;
//! - open loop: requests sent on an arrival schedule (see [`crate::arrival`]), whatever is still
//!   running, with an optional cap on how many are in flight (later arrivals wait for a slot, and
//!   their timings start when they are sent).
//!
//! Every request ends as a result, even one that never got sent before the run's deadline: the
//! count of completed plus failed is always the number of requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::ProgressBar;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout_at, Instant};

use crate::client::Target;
use crate::report::RequestResult;
use crate::workload::WorkItem;

/// How requests are sent and for how long.
#[derive(Debug, Clone)]
pub struct Load {
    /// Closed loop: workers. Open loop: most requests in flight (0: no cap).
    pub concurrency: usize,
    /// Open-loop send times from the start of the run, one per request; `None` for a closed loop.
    pub arrivals: Option<Vec<Duration>>,
    /// Longest one request may take, retries included.
    pub request_timeout: Duration,
    /// Longest the whole run may take; requests still running then are failed.
    pub max_duration: Duration,
}

/// Sends every item to `target` as `load` says; returns each request's result, in item order,
/// and the wall time of the run. `progress` advances by one per finished request.
pub async fn run(
    target: Arc<Target>,
    items: Arc<Vec<WorkItem>>,
    load: &Load,
    progress: &ProgressBar,
) -> (Vec<RequestResult>, Duration) {
    let started = Instant::now();
    let run_deadline = started + load.max_duration;
    let ctx = Arc::new(Ctx { target, items, run_deadline, request_timeout: load.request_timeout });
    let mut tasks = JoinSet::new();
    match &load.arrivals {
        None => closed_loop(&ctx, load.concurrency.max(1), &mut tasks, progress),
        Some(arrivals) => open_loop(&ctx, arrivals, load.concurrency, &mut tasks, progress).await,
    }
    let mut results: Vec<Option<RequestResult>> = vec![None; ctx.items.len()];
    while let Some(joined) = tasks.join_next().await {
        // A task that panicked leaves its requests unset; they are reported as failed below.
        for (i, r) in joined.unwrap_or_default() {
            results[i] = Some(r);
        }
    }
    let wall = started.elapsed();
    let results = results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| RequestResult {
                error: Some("not sent: the run's --max-duration ran out first".into()),
                ..RequestResult::default()
            })
        })
        .collect();
    (results, wall)
}

/// What every request task shares.
struct Ctx {
    target: Arc<Target>,
    items: Arc<Vec<WorkItem>>,
    run_deadline: Instant,
    request_timeout: Duration,
}

impl Ctx {
    /// Sends item `i`, bounded by its own timeout and the run's deadline.
    async fn send(&self, i: usize) -> RequestResult {
        let own = Instant::now() + self.request_timeout;
        let (deadline, why) = if own < self.run_deadline {
            (own, format!("timed out after --timeout {:?}", self.request_timeout))
        } else {
            (self.run_deadline, "stopped: the run's --max-duration ran out".to_string())
        };
        self.target.send(&self.items[i], deadline, &why).await
    }
}

type Finished = Vec<(usize, RequestResult)>;

fn closed_loop(ctx: &Arc<Ctx>, workers: usize, tasks: &mut JoinSet<Finished>, progress: &ProgressBar) {
    let next = Arc::new(AtomicUsize::new(0));
    for _ in 0..workers {
        let (ctx, next, progress) = (ctx.clone(), next.clone(), progress.clone());
        tasks.spawn(async move {
            let mut done = Vec::new();
            while Instant::now() < ctx.run_deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= ctx.items.len() {
                    break;
                }
                done.push((i, ctx.send(i).await));
                progress.inc(1);
            }
            done
        });
    }
}

async fn open_loop(
    ctx: &Arc<Ctx>,
    arrivals: &[Duration],
    cap: usize,
    tasks: &mut JoinSet<Finished>,
    progress: &ProgressBar,
) {
    let slots = Arc::new(Semaphore::new(if cap == 0 { Semaphore::MAX_PERMITS } else { cap }));
    let start = Instant::now();
    for (i, &at) in arrivals.iter().enumerate().take(ctx.items.len()) {
        let send_at = start + at;
        if send_at >= ctx.run_deadline {
            break;
        }
        sleep_until(send_at).await;
        let (ctx, slots, progress) = (ctx.clone(), slots.clone(), progress.clone());
        tasks.spawn(async move {
            let result = match timeout_at(ctx.run_deadline, slots.acquire_owned()).await {
                Ok(Ok(_slot)) => ctx.send(i).await,
                _ => RequestResult {
                    error: Some("not sent: no free slot under --max-concurrency before --max-duration ran out".into()),
                    ..RequestResult::default()
                },
            };
            progress.inc(1);
            vec![(i, result)]
        });
    }
}

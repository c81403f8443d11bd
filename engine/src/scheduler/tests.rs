//! Scheduler tests, driven with synthetic time and fake sampled tokens (no model).

use super::*;

mod prefix_cache;

const BS: usize = 4; // block size

fn config() -> SchedulerConfig {
    SchedulerConfig {
        max_batch_size: 4,
        batch_timeout: Duration::from_millis(100),
        max_batch_tokens: 64,
        max_num_seqs: 16,
        max_waiting: 8,
        prefix_caching: false,
    }
}

struct Sim {
    s: Scheduler,
    t0: Instant,
    next_id: RequestId,
}

impl Sim {
    fn new(config: SchedulerConfig, num_blocks: usize) -> Self {
        Self { s: Scheduler::new(config, num_blocks, BS), t0: Instant::now(), next_id: 0 }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    /// Adds a request with a prompt of `len` tokens arriving at `ms`.
    fn add(&mut self, len: usize, max_tokens: usize, priority: i32, ms: u64) -> RequestId {
        self.add_prompt((0..len as u32).map(|t| 100 + t).collect(), max_tokens, priority, ms)
    }

    /// Adds a request with the prompt `prompt` arriving at `ms`.
    fn add_prompt(&mut self, prompt: Vec<u32>, max_tokens: usize, priority: i32, ms: u64) -> RequestId {
        let id = self.next_id;
        self.next_id += 1;
        self.s.add(Sequence::new(id, prompt, max_tokens, priority, self.at(ms), id)).unwrap();
        id
    }

    /// Steps until nothing is left, from `ms` on; returns every batch.
    fn run_to_end(&mut self, ms: u64) -> Vec<Batch> {
        let mut batches = Vec::new();
        while !self.s.is_idle() {
            batches.push(self.step(ms + batches.len() as u64));
            assert!(batches.len() < 500, "scheduler made no progress");
        }
        batches
    }

    /// One step: schedule, pretend the model ran, sample token 7 wherever asked; finishes sequences
    /// that reached their `max_output_tokens`.
    fn step(&mut self, ms: u64) -> Batch {
        let batch = self.s.schedule(self.at(ms));
        self.s.block_manager().check_invariants();
        let sampled: Vec<_> = batch.seqs.iter().filter(|s| s.sample).map(|s| (s.id, 7)).collect();
        self.s.update(&batch, &sampled);
        for (id, _) in sampled {
            let done = self.s.sequence(id).is_some_and(|q| q.num_output_tokens() >= q.max_output_tokens);
            if done {
                self.s.remove(id);
            }
        }
        batch
    }

    fn ids(batch: &Batch) -> Vec<RequestId> {
        batch.seqs.iter().map(|s| s.id).collect()
    }

    fn assert_pool_full(&self) {
        let bm = self.s.block_manager();
        assert_eq!(bm.num_free(), bm.num_blocks(), "every block back in the pool");
    }
}

#[test]
fn admission_waits_for_batch_size() {
    let mut sim = Sim::new(config(), 64);
    for _ in 0..3 {
        sim.add(5, 2, 0, 0);
    }
    let b = sim.step(10);
    assert!(b.is_empty());
    assert_eq!(b.wake_at, Some(sim.at(100)));
    sim.add(5, 2, 0, 20);
    let b = sim.step(20);
    assert_eq!(Sim::ids(&b), vec![0, 1, 2, 3]);
    assert_eq!(b.num_tokens, 20);
    assert!(b.seqs.iter().all(|s| s.sample && s.start == 0 && s.len == 5));
}

#[test]
fn admission_opens_after_timeout() {
    let mut sim = Sim::new(config(), 64);
    sim.add(5, 2, 0, 0);
    assert!(sim.step(99).is_empty());
    assert_eq!(Sim::ids(&sim.step(100)), vec![0]);
}

#[test]
fn new_requests_join_running_batch_at_next_step() {
    let mut sim = Sim::new(config(), 64);
    sim.add(5, 10, 0, 0);
    assert_eq!(Sim::ids(&sim.step(100)), vec![0]);
    sim.add(3, 10, 0, 101);
    // No window while something runs: the newcomer is admitted at once, after the decode.
    let b = sim.step(101);
    assert_eq!(Sim::ids(&b), vec![0, 1]);
    assert_eq!((b.seqs[0].start, b.seqs[0].len), (5, 1));
    assert_eq!((b.seqs[1].start, b.seqs[1].len), (0, 3));
}

#[test]
fn priority_then_arrival_order() {
    let mut cfg = config();
    cfg.max_num_seqs = 1;
    let mut sim = Sim::new(cfg, 64);
    let late_low = sim.add(2, 1, 5, 0);
    let urgent = sim.add(2, 1, -1, 1);
    let first = sim.add(2, 1, 0, 2);
    let second = sim.add(2, 1, 0, 3);
    let mut order = Vec::new();
    for ms in 200..204 {
        order.extend(Sim::ids(&sim.step(ms)));
    }
    assert_eq!(order, vec![urgent, first, second, late_low]);
    sim.assert_pool_full();
}

#[test]
fn token_budget_chunks_prompts_and_puts_decodes_first() {
    let mut cfg = config();
    cfg.max_batch_tokens = 8;
    let mut sim = Sim::new(cfg, 64);
    let a = sim.add(3, 10, 0, 0);
    assert_eq!(Sim::ids(&sim.step(100)), vec![a]);
    let b = sim.add(20, 2, 0, 100);
    // Step: a decodes (1 token), b gets the other 7 of the budget.
    let s = sim.step(101);
    assert_eq!(s.seqs[0], ScheduledSeq { id: a, start: 3, len: 1, sample: true });
    assert_eq!(s.seqs[1], ScheduledSeq { id: b, start: 0, len: 7, sample: false });
    let s = sim.step(102);
    assert_eq!(s.seqs[1], ScheduledSeq { id: b, start: 7, len: 7, sample: false });
    let s = sim.step(103);
    assert_eq!(s.seqs[1], ScheduledSeq { id: b, start: 14, len: 6, sample: true });
    assert_eq!(s.num_tokens, 7);
    assert_eq!(sim.s.sequence(b).map(|q| q.num_output_tokens()), Some(1));
}

#[test]
fn preemption_recomputes_and_resumes() {
    // 6 blocks of 4 tokens. Two sequences of 8 prompt tokens (2 blocks each) that grow to 20
    // tokens (5 blocks) cannot both fit: the later one is preempted, then finishes after.
    let mut sim = Sim::new(config(), 6);
    let a = sim.add(8, 12, 0, 0);
    let b = sim.add(8, 12, 0, 1);
    let mut preempted = Vec::new();
    let mut steps = 0;
    while !sim.s.is_idle() {
        let batch = sim.step(100 + steps);
        preempted.extend(batch.preempted.iter().copied());
        steps += 1;
        assert!(steps < 200, "scheduler made no progress");
    }
    assert_eq!(preempted.first(), Some(&b), "the later arrival is preempted first");
    assert!(!preempted.contains(&a));
    assert!(sim.s.counters().preemptions >= 1);
    sim.assert_pool_full();
}

#[test]
fn preempted_sequence_keeps_its_output_and_recomputes_all_tokens() {
    let mut sim = Sim::new(config(), 5);
    let a = sim.add(8, 10, 0, 0);
    let b = sim.add(8, 10, 1, 1); // lower priority
    sim.step(100);
    let mut steps = 0;
    let batch = loop {
        let batch = sim.step(101 + steps);
        steps += 1;
        if !batch.preempted.is_empty() {
            break batch;
        }
        assert!(steps < 50);
    };
    assert_eq!(batch.preempted, vec![b]);
    let seq = sim.s.sequence(b).unwrap();
    assert_eq!(seq.status, SequenceStatus::Waiting);
    assert_eq!(seq.num_computed_tokens, 0);
    assert!(seq.num_output_tokens() > 0);
    assert!(seq.block_table.is_empty());
    // a finishes, then b comes back and recomputes prompt + output in one go.
    let expected = seq.num_tokens();
    let resumed = loop {
        let batch = sim.step(200 + steps);
        steps += 1;
        if let Some(s) = batch.seqs.iter().find(|s| s.id == b) {
            break s.clone();
        }
        assert!(steps < 100);
    };
    assert!(sim.s.sequence(a).is_none(), "a finished first");
    assert_eq!((resumed.start, resumed.len, resumed.sample), (0, expected, true));
}

#[test]
fn abort_in_every_state_returns_all_blocks() {
    let mut cfg = config();
    cfg.max_batch_tokens = 8;
    let mut sim = Sim::new(cfg, 64);
    let decoding = sim.add(4, 50, 0, 0);
    let prefilling = sim.add(30, 50, 0, 0);
    sim.step(100); // decoding: prompt done; prefilling: 4 of 30
    sim.step(101);
    let waiting = sim.add(4, 50, 0, 101);
    let q = sim.s.sequence(prefilling).unwrap();
    assert!(q.num_computed_tokens > 0 && q.num_computed_tokens < 30, "mid-prefill");
    assert!(sim.s.sequence(decoding).unwrap().num_output_tokens() >= 2, "decoding");
    assert!(sim.s.block_manager().num_used() > 0);
    for id in [waiting, prefilling, decoding] {
        assert!(sim.s.remove(id).is_some());
        assert!(sim.s.remove(id).is_none(), "second abort is a no-op");
    }
    assert!(sim.s.is_idle());
    assert_eq!((sim.s.num_waiting(), sim.s.num_running()), (0, 0));
    sim.assert_pool_full();
}

#[test]
fn full_queue_and_oversized_requests_are_refused() {
    let mut sim = Sim::new(config(), 4);
    for _ in 0..8 {
        sim.add(2, 2, 0, 0);
    }
    let extra = Sequence::new(99, vec![1, 2], 2, 0, sim.at(0), 99);
    assert_eq!(sim.s.add(extra), Err(AddError::QueueFull));
    let huge = Sequence::new(100, vec![1; 10], 8, 0, sim.at(0), 100);
    assert_eq!(sim.s.can_add(&huge), Err(AddError::TooLong), "17 tokens need 5 blocks of 4 > 4");
}

#[test]
fn max_num_seqs_bounds_running() {
    let mut cfg = config();
    cfg.max_num_seqs = 2;
    let mut sim = Sim::new(cfg, 64);
    for _ in 0..4 {
        sim.add(2, 3, 0, 0);
    }
    let b = sim.step(0);
    assert_eq!(Sim::ids(&b), vec![0, 1]);
    assert_eq!(sim.s.num_running(), 2);
    assert_eq!(sim.s.num_waiting(), 2);
}

//! Scheduler tests, driven with synthetic time and fake sampled tokens (no model).

use super::*;

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

fn caching() -> SchedulerConfig {
    SchedulerConfig { max_batch_size: 1, prefix_caching: true, ..config() }
}

/// The tokens `base..base + len`.
fn run(base: u32, len: usize) -> Vec<u32> {
    (base..base + len as u32).collect()
}

/// Where sequence `id` was first scheduled: (start, len).
fn first_slot(batches: &[Batch], id: RequestId) -> (usize, usize) {
    let s = batches.iter().flat_map(|b| &b.seqs).find(|s| s.id == id).expect("scheduled");
    (s.start, s.len)
}

#[test]
fn prefix_cache_skips_the_whole_blocks_a_finished_request_computed() {
    let mut sim = Sim::new(caching(), 32);
    sim.add_prompt(run(1000, 10), 3, 0, 0);
    sim.run_to_end(0);
    sim.assert_pool_full();
    // Prompt 10 + 2 outputs computed: blocks 0-1 (tokens 0-7) are full; block 2 (8-11) is full of
    // prompt tokens 8-9 and outputs 7, 7.
    assert_eq!(sim.s.block_manager().num_cached(), 3);

    let again = sim.add_prompt(run(1000, 10), 2, 0, 100);
    let b = sim.run_to_end(100);
    assert_eq!(first_slot(&b, again), (8, 2), "two cached blocks, the rest computed");
    let c = sim.s.counters();
    assert_eq!((c.prefix_cache_queries, c.prefix_cache_hits), (20, 8), "10 tokens looked up twice, 8 found");

    // A prompt that shares only its first five tokens reuses one block.
    let mut other = run(1000, 5);
    other.extend(run(5000, 6));
    let partial = sim.add_prompt(other, 2, 0, 200);
    let b = sim.run_to_end(200);
    assert_eq!(first_slot(&b, partial), (4, 7));
    // The same prompt with other first tokens shares nothing: keys chain from the first block.
    let mut shifted = vec![1];
    shifted.extend(run(1000, 10));
    let none = sim.add_prompt(shifted, 2, 0, 300);
    let b = sim.run_to_end(300);
    assert_eq!(first_slot(&b, none), (0, 11));
    sim.assert_pool_full();
}

#[test]
fn prefix_cache_always_leaves_the_last_token_to_compute() {
    let mut sim = Sim::new(caching(), 32);
    sim.add_prompt(run(1000, 8), 2, 0, 0);
    sim.run_to_end(0);
    let again = sim.add_prompt(run(1000, 8), 2, 0, 100);
    let b = sim.run_to_end(100);
    // Both blocks are cached, but the prompt's last token must run to give the next token's
    // logits, so the second block is computed again.
    assert_eq!(first_slot(&b, again), (4, 4));
    assert!(b[0].seqs[0].sample);
    sim.assert_pool_full();
}

#[test]
fn prefix_cache_covers_generated_tokens_of_a_conversation() {
    let mut sim = Sim::new(caching(), 32);
    let first = sim.add_prompt(run(1000, 6), 6, 0, 0);
    let b = sim.run_to_end(0);
    assert_eq!(first_slot(&b, first), (0, 6));
    // The next turn's prompt is the first prompt, the five computed outputs (7s), then new tokens:
    // blocks 0-1 (prompt and outputs) are cached, so only the new turn runs.
    let mut next = run(1000, 6);
    next.extend([7; 6]);
    next.extend(run(2000, 5));
    let turn = sim.add_prompt(next, 2, 0, 100);
    let b = sim.run_to_end(100);
    assert_eq!(first_slot(&b, turn), (8, 9));
    sim.assert_pool_full();
}

#[test]
fn prefix_cache_shares_blocks_between_running_sequences() {
    let mut sim = Sim::new(caching(), 32);
    let a = sim.add_prompt(run(1000, 9), 20, 0, 0);
    sim.step(0);
    let b = sim.add_prompt(run(1000, 9), 20, 0, 1);
    let batch = sim.step(1);
    assert_eq!(first_slot(&[batch], b), (8, 1));
    let (ta, tb) = (sim.s.sequence(a).unwrap().block_table.clone(), sim.s.sequence(b).unwrap().block_table.clone());
    assert_eq!(ta.blocks()[..2], tb.blocks()[..2], "both hold the cached prompt blocks");
    assert_ne!(ta.blocks()[2], tb.blocks()[2], "each writes its own partial block");
    assert_eq!(sim.s.block_manager().ref_count(ta.blocks()[0]), 2);
    sim.run_to_end(2);
    sim.assert_pool_full();
}

#[test]
fn prefix_cache_twins_arriving_together_compute_their_prefix_once() {
    let mut cfg = caching();
    cfg.max_batch_size = 2;
    let mut sim = Sim::new(cfg.clone(), 32);
    let a = sim.add_prompt(run(1000, 9), 2, 0, 0);
    let b = sim.add_prompt(run(1000, 9), 2, 0, 0);
    let first = sim.step(0);
    assert_eq!(Sim::ids(&first), vec![a], "b waits for the blocks a is computing");
    let second = sim.step(1);
    assert_eq!(first_slot(&[second], b), (8, 1), "then finds them cached");
    sim.run_to_end(2);
    let c = sim.s.counters();
    assert_eq!((c.prefix_cache_queries, c.prefix_cache_hits), (18, 8));
    sim.assert_pool_full();

    // Without prefix caching both compute everything at once.
    cfg.prefix_caching = false;
    let mut sim = Sim::new(cfg, 32);
    let a = sim.add_prompt(run(1000, 9), 2, 0, 0);
    let b = sim.add_prompt(run(1000, 9), 2, 0, 0);
    let batches = sim.run_to_end(0);
    assert_eq!((first_slot(&batches, a), first_slot(&batches, b)), ((0, 9), (0, 9)));
    sim.assert_pool_full();
}

#[test]
fn prefix_cache_waits_for_a_shared_prefix_prefilled_in_chunks() {
    // A 30-token prompt at 8 tokens a step takes four steps; a second prompt sharing its first
    // 24 tokens (six blocks) waits until those are computed, then computes only its own end. A
    // third request with nothing shared, behind it in the queue, waits with it (strict order).
    let mut cfg = caching();
    cfg.max_batch_size = 3;
    cfg.max_batch_tokens = 8;
    let mut sim = Sim::new(cfg, 64);
    let a = sim.add_prompt(run(1000, 30), 2, 0, 0);
    let mut shared = run(1000, 24);
    shared.extend(run(5000, 5));
    let b = sim.add_prompt(shared, 2, 0, 0);
    let c = sim.add_prompt(run(9000, 6), 2, 0, 0);
    let batches = sim.run_to_end(0);
    let step_of = |id| batches.iter().position(|x| x.seqs.iter().any(|s| s.id == id)).unwrap();
    assert_eq!(first_slot(&batches, b).0, 24, "six blocks found cached");
    assert!(step_of(b) >= 3, "b is admitted once a has computed 24 tokens (step {})", step_of(b));
    assert!(step_of(c) >= step_of(b), "c does not overtake b");
    assert_eq!(first_slot(&batches, a), (0, 8));
    sim.assert_pool_full();
}

#[test]
fn prefix_cache_gives_way_when_the_pool_needs_blocks() {
    // 6 blocks of 4. The cached prompt's 2 blocks are free, so a request needing all 6 gets them
    // (the cache forgets them) and the cached prompt is computed again afterwards.
    let mut sim = Sim::new(caching(), 6);
    sim.add_prompt(run(1000, 9), 1, 0, 0);
    sim.run_to_end(0);
    assert_eq!(sim.s.block_manager().num_cached(), 2);
    let big = sim.add_prompt(run(3000, 22), 2, 0, 100);
    let b = sim.run_to_end(100);
    assert_eq!(first_slot(&b, big), (0, 22));
    let again = sim.add_prompt(run(1000, 9), 1, 0, 200);
    assert_eq!(first_slot(&sim.run_to_end(200), again), (0, 9), "evicted, computed again");
    sim.assert_pool_full();
}

#[test]
fn prefix_cache_readmits_a_preempted_sequence_from_its_cached_blocks() {
    let mut cfg = caching();
    cfg.max_batch_size = 2;
    let mut sim = Sim::new(cfg, 7);
    let a = sim.add_prompt(run(1000, 8), 12, 0, 0);
    let b = sim.add_prompt(run(2000, 8), 12, 1, 0);
    let mut preempted = false;
    let mut resumed = None;
    for step in 0..200 {
        let batch = sim.step(step);
        if batch.preempted.contains(&b) {
            preempted = true;
        } else if preempted && resumed.is_none() {
            resumed = batch.seqs.iter().find(|s| s.id == b).cloned();
        }
        if sim.s.is_idle() {
            break;
        }
    }
    assert!(preempted, "b was preempted");
    let resumed = resumed.expect("b came back");
    assert!(resumed.start >= 8, "its prompt blocks were still cached: start {}", resumed.start);
    assert!(sim.s.sequence(a).is_none() && sim.s.is_idle());
    sim.assert_pool_full();
}

/// What a cache slot holds in the randomized test below: the tokens up to and including the one
/// whose K/V was written there (its whole prefix: the K/V of a token depends on all of them).
type Written = Vec<u32>;

#[test]
fn prefix_cache_under_random_load_reads_only_what_was_written_for_the_same_prefix() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    for seed in 0..6u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut cfg = caching();
        cfg.max_batch_tokens = 24;
        cfg.max_waiting = 64;
        // 20 blocks of 4: too few for everyone, so blocks are evicted and sequences preempted.
        let mut s = Scheduler::new(cfg, 20, BS);
        let t0 = Instant::now();
        let mut slots: HashMap<u32, Written> = HashMap::new();
        let (mut next_id, mut finished) = (0u64, 0);
        // Prompts are one of three shared openings plus a short random tail, over a small
        // alphabet, so prefixes (and generated tokens) collide often.
        let openings: Vec<Vec<u32>> = (0..3).map(|o| (0..9).map(|t| 1 + (o * 7 + t) % 5).collect()).collect();
        for step in 0..400u64 {
            if rng.random_bool(0.4) && s.num_waiting() < 32 {
                let mut prompt = openings[rng.random_range(0..3)].clone();
                prompt.truncate(rng.random_range(1..=9));
                prompt.extend((0..rng.random_range(0..6)).map(|_| rng.random_range(1..4)));
                let max_tokens = rng.random_range(1..40);
                let priority = rng.random_range(0..2);
                s.add(Sequence::new(next_id, prompt, max_tokens, priority, t0, next_id)).unwrap();
                next_id += 1;
            }
            if rng.random_bool(0.05) {
                let ids = s.ids();
                if !ids.is_empty() {
                    s.remove(ids[rng.random_range(0..ids.len())]);
                }
            }
            let batch = s.schedule(t0 + Duration::from_millis(step * 10));
            s.block_manager().check_invariants();
            // Every position before a scheduled chunk must hold what its own prefix wrote.
            for sched in &batch.seqs {
                let seq = s.sequence(sched.id).unwrap();
                for pos in 0..sched.start {
                    let slot = seq.block_table.slot(pos, BS).expect("a computed position has a slot");
                    let want = &seq.token_ids[..=pos];
                    assert_eq!(
                        slots.get(&slot).map(Vec::as_slice),
                        Some(want),
                        "seed {seed}, step {step}: slot {slot}"
                    );
                }
            }
            for sched in &batch.seqs {
                let seq = s.sequence(sched.id).unwrap();
                for pos in sched.start..sched.start + sched.len {
                    let slot = seq.block_table.slot(pos, BS).expect("a scheduled position has a slot");
                    slots.insert(slot, seq.token_ids[..=pos].to_vec());
                }
            }
            let sampled: Vec<_> =
                batch.seqs.iter().filter(|q| q.sample).map(|q| (q.id, rng.random_range(1..4))).collect();
            s.update(&batch, &sampled);
            s.block_manager().check_invariants();
            for (id, _) in sampled {
                if s.sequence(id).is_some_and(|q| q.num_output_tokens() >= q.max_output_tokens) {
                    s.remove(id);
                    finished += 1;
                }
            }
        }
        let c = s.counters();
        assert!(
            c.prefix_cache_hits > 0 && c.preemptions > 0,
            "seed {seed}: the load was meant to hit and preempt: {c:?}"
        );
        assert!(finished > 20, "seed {seed}: {finished} finished");
        for id in s.ids() {
            s.remove(id);
        }
        s.block_manager().check_invariants();
        assert_eq!(s.block_manager().num_free(), 20);
    }
}

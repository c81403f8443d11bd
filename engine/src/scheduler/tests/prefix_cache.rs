//! Prefix caching in the scheduler: which blocks a request finds computed, and that it only ever
//! reads what was written for the same prefix.

use super::*;

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

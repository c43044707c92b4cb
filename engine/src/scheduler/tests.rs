use std::collections::HashMap;

use proptest::prelude::*;

use super::*;

fn config(num_blocks: usize, block_size: usize, max_num_seqs: usize, budget: usize) -> SchedulerConfig {
    SchedulerConfig { max_num_seqs, max_num_batched_tokens: budget, block_size, num_blocks, enable_prefix_caching: true }
}

/// Runs one step as the engine would: commit, then sample for sequences that reached
/// their end. Returns the ids that sampled.
fn run_step(s: &mut Scheduler, out: &SchedulerOutput, token: impl Fn(SeqId) -> u32) -> Vec<SeqId> {
    s.commit(out);
    let sampled: Vec<SeqId> = out.scheduled.iter().filter(|x| x.sample).map(|x| x.seq_id).collect();
    for &id in &sampled {
        s.append_token(id, token(id));
    }
    sampled
}

#[test]
fn chunked_prefill_shares_a_step_with_decodes() {
    let mut s = Scheduler::new(config(64, 4, 8, 10));
    s.add(Sequence::new(1, vec![1, 2, 3], 0));
    let out = s.schedule();
    assert_eq!(out.scheduled, vec![ScheduledSeq { seq_id: 1, start: 0, num_tokens: 3, sample: true }]);
    run_step(&mut s, &out, |_| 9);
    s.add(Sequence::new(2, (0..30).collect(), 1));
    let out = s.schedule();
    // The decode of 1 goes first, then 9 tokens of 2's prompt fill the budget of 10.
    assert_eq!(out.scheduled[0], ScheduledSeq { seq_id: 1, start: 3, num_tokens: 1, sample: true });
    assert_eq!(out.scheduled[1], ScheduledSeq { seq_id: 2, start: 0, num_tokens: 9, sample: false });
    assert_eq!(out.num_batched_tokens, 10);
    run_step(&mut s, &out, |_| 9);
    let out = s.schedule();
    assert_eq!(out.scheduled[1], ScheduledSeq { seq_id: 2, start: 9, num_tokens: 9, sample: false });
}

#[test]
fn prefix_hits_skip_computation_but_never_the_last_token() {
    let mut s = Scheduler::new(config(16, 4, 8, 64));
    let prompt: Vec<u32> = (0..8).collect();
    s.add(Sequence::new(1, prompt.clone(), 0));
    let out = s.schedule();
    run_step(&mut s, &out, |_| 100);
    s.remove(1);
    // Same 8-token prompt: only the first block may hit (the last token must be computed).
    s.add(Sequence::new(2, prompt.clone(), 1));
    let out = s.schedule();
    assert_eq!(out.started, vec![(2, 4)]);
    assert_eq!(out.scheduled[0].start, 4);
    // A longer prompt with the same first 8 tokens hits both blocks.
    let mut longer = prompt;
    longer.extend([50, 51]);
    s.add(Sequence::new(3, longer, 2));
    let out = s.schedule();
    assert!(out.started.contains(&(3, 8)), "{:?}", out.started);
    let st = s.stats();
    assert_eq!(st.prefix_hit_tokens, 12);
}

#[test]
fn preemption_frees_blocks_and_the_victim_is_recomputed_later() {
    // 4 blocks of 2 tokens; two sequences of 3-token prompts grow until they collide.
    let mut s = Scheduler::new(SchedulerConfig { enable_prefix_caching: false, ..config(4, 2, 4, 16) });
    s.add(Sequence::new(1, vec![1, 2, 3], 0));
    s.add(Sequence::new(2, vec![4, 5, 6], 1));
    let mut preempted = Vec::new();
    for _ in 0..6 {
        let out = s.schedule();
        preempted.extend(out.preempted.iter().copied());
        run_step(&mut s, &out, |_| 7);
    }
    assert_eq!(preempted.first(), Some(&2), "the newer sequence is preempted");
    assert!(s.seq(1).unwrap().output().len() > s.seq(2).unwrap().output().len());
    s.remove(1);
    let out = s.schedule();
    let again = out.scheduled.iter().find(|x| x.seq_id == 2).unwrap();
    assert_eq!(again.start, 0, "recomputed from scratch");
    assert_eq!(again.num_tokens, s.seq(2).unwrap().len());
}

#[test]
fn fork_shares_full_blocks_and_copies_the_partial_one() {
    let mut s = Scheduler::new(config(16, 4, 8, 64));
    s.add(Sequence::new(1, (0..6).collect(), 0));
    let out = s.schedule();
    s.commit(&out);
    s.fork(1, 2);
    let (p, c) = (s.seq(1).unwrap().block_table.clone(), s.seq(2).unwrap().block_table.clone());
    assert_eq!(p[0], c[0], "full block shared");
    assert_ne!(p[1], c[1], "partial block copied");
    assert_eq!(s.block_manager().ref_count(p[0]), 2);
    let out = s.schedule();
    assert_eq!(out.blocks_to_copy, vec![(p[1], c[1])]);
}

#[derive(Debug, Clone)]
struct Arrival {
    at_step: usize,
    prompt: Vec<u32>,
    max_tokens: usize,
    n: usize,
    abort_at: Option<usize>,
}

fn arrivals(max_len: usize) -> impl Strategy<Value = Vec<Arrival>> {
    let one = (0usize..40, 1usize..max_len, 1usize..12, 1usize..3, proptest::option::weighted(0.2, 0usize..60), 0u32..3)
        .prop_map(move |(at_step, plen, max_tokens, n, abort_at, family)| {
            let max_tokens = max_tokens.min(max_len - plen).max(1);
            let plen = plen.min(max_len - max_tokens).max(1);
            // Prompts of one family share a prefix so prefix hits happen.
            let prompt = (0..plen as u32).map(|i| if i < 6 { family * 100 + i } else { i * 7 + family }).collect();
            Arrival { at_step, prompt, max_tokens, n, abort_at: abort_at.map(|a| a + at_step) }
        });
    proptest::collection::vec(one, 1..24)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Random arrivals, aborts, forks and tiny KV pools: budgets hold every step, reference
    /// counts always equal the block tables holding each block, every request ends, and
    /// no block is left in use at the end.
    #[test]
    fn every_request_ends_within_budgets_and_nothing_leaks(
        num_blocks in 3usize..24,
        block_size in prop_oneof![Just(1usize), Just(2), Just(4)],
        max_num_seqs in 1usize..6,
        budget in 1usize..40,
        caching in any::<bool>(),
        reqs in arrivals(12),
    ) {
        let max_len = num_blocks * block_size;
        let reqs: Vec<Arrival> = reqs.into_iter().filter(|r| r.prompt.len() + r.max_tokens <= max_len).collect();
        let cfg = SchedulerConfig { max_num_seqs, max_num_batched_tokens: budget, block_size, num_blocks, enable_prefix_caching: caching };
        let mut s = Scheduler::new(cfg);
        let mut owner: HashMap<SeqId, usize> = HashMap::new();
        let mut forked: Vec<bool> = vec![false; reqs.len()];
        let mut ended = vec![false; reqs.len()];
        let mut next_id = 1000u64;
        for step in 0..5000usize {
            for (i, r) in reqs.iter().enumerate() {
                if r.at_step == step {
                    s.add(Sequence::new(i as u64, r.prompt.clone(), i as u64));
                    owner.insert(i as u64, i);
                }
                if r.abort_at == Some(step) && !ended[i] {
                    let ids: Vec<SeqId> = owner.iter().filter(|(_, &o)| o == i).map(|(&id, _)| id).collect();
                    for id in ids { s.remove(id); owner.remove(&id); }
                    ended[i] = r.at_step <= step;
                }
            }
            if step > 40 && !s.has_work() { break; }
            let out = s.schedule();
            prop_assert!(out.num_batched_tokens <= budget);
            prop_assert_eq!(out.num_batched_tokens, out.scheduled.iter().map(|x| x.num_tokens).sum::<usize>());
            for x in &out.scheduled {
                let seq = s.seq(x.seq_id).unwrap();
                prop_assert_eq!(x.start, seq.num_computed_tokens);
                prop_assert!(seq.block_table.len() * block_size >= x.start + x.num_tokens);
            }
            let sampled = run_step(&mut s, &out, |id| (id as u32 * 31 + step as u32) % 50);
            for id in sampled {
                let Some(&i) = owner.get(&id) else { continue };
                if !forked[i] && reqs[i].n > 1 {
                    forked[i] = true;
                    for _ in 1..reqs[i].n { s.fork(id, next_id); owner.insert(next_id, i); next_id += 1; }
                }
            }
            let done: Vec<SeqId> = owner.keys().copied().filter(|&id| {
                let seq = s.seq(id).unwrap();
                seq.output().len() >= reqs[owner[&id]].max_tokens
            }).collect();
            for id in done { s.remove(id); let i = owner.remove(&id).unwrap(); if !owner.values().any(|&o| o == i) { ended[i] = true; } }
            // Reference counts equal the number of block-table entries naming each block.
            let mut holders = vec![0u32; num_blocks];
            for id in s.seq_ids().collect::<Vec<_>>() {
                for &b in &s.seq(id).unwrap().block_table { holders[b as usize] += 1; }
            }
            for b in 0..num_blocks { prop_assert_eq!(s.block_manager().ref_count(b as u32), holders[b]); }
        }
        prop_assert!(!s.has_work(), "work left after 5000 steps: livelock or deadlock");
        for (i, r) in reqs.iter().enumerate() { prop_assert!(ended[i] || r.abort_at.is_some(), "request {} never ended", i); }
        prop_assert_eq!(s.block_manager().num_free(), num_blocks);
    }
}

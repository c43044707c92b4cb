//! The CPU engine against Hugging Face transformers (float32 references in fixtures/):
//! teacher-forced logits within 1e-4 and identical greedy continuations, and the same
//! greedy output whatever the batching (chunked prefill, prefix-cache hits, preemption).

mod common;

use common::*;
use dlengine_engine::config::EngineConfig;

const LOGIT_TOLERANCE: f32 = 1e-4;

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn teacher_forced_logits_match_transformers() {
    for name in MODELS {
        let mut core = core(name, EngineConfig::default());
        for (i, r) in greedy_refs(name).iter().enumerate() {
            let want = reference_logits(name, i);
            let got = core.score(&r.prompt_ids, r.prompt_ids.len()).unwrap();
            let diff = max_abs_diff(&got, &want);
            assert!(diff <= LOGIT_TOLERANCE, "{name} prompt {i}: max |logit diff| {diff:e}");
        }
    }
}

#[test]
fn chunked_prefill_logits_equal_one_shot_logits() {
    for name in MODELS {
        let mut core = core(name, EngineConfig { block_size: 4, ..EngineConfig::default() });
        let prompt = &greedy_refs(name)[4].prompt_ids;
        let want = reference_logits(name, 4);
        for chunk in [1, 3, 16, 33] {
            let got = core.score(prompt, chunk).unwrap();
            let diff = max_abs_diff(&got, &want);
            assert!(diff <= LOGIT_TOLERANCE, "{name} chunk {chunk}: max |logit diff| {diff:e}");
        }
    }
}

fn all_greedy(name: &str, config: EngineConfig) -> Vec<Vec<u32>> {
    let mut core = core(name, config);
    let requests = greedy_refs(name).into_iter().map(|r| (r.prompt_ids, greedy(32))).collect();
    run_to_end(&mut core, requests).into_iter().map(|mut choices| choices.remove(0)).collect()
}

#[test]
fn greedy_continuations_match_transformers() {
    for name in MODELS {
        let got = all_greedy(name, EngineConfig::default());
        for (i, r) in greedy_refs(name).iter().enumerate() {
            assert_eq!(got[i], r.generated_ids, "{name} prompt {i}");
        }
    }
}

#[test]
fn batching_never_changes_greedy_output() {
    let configs = [
        ("chunked prefill mixed with decodes", EngineConfig { max_num_batched_tokens: 7, block_size: 4, ..Default::default() }),
        ("one sequence at a time", EngineConfig { max_num_seqs: 1, ..Default::default() }),
        ("no prefix caching", EngineConfig { enable_prefix_caching: false, ..Default::default() }),
        // 40 blocks of 4 tokens hold about two of the five sequences: preemption happens.
        ("tiny KV pool", EngineConfig { num_kv_blocks: Some(40), block_size: 4, max_model_len: Some(160), ..Default::default() }),
    ];
    for name in ["qwen3-tiny", "llama-tiny"] {
        let want: Vec<Vec<u32>> = greedy_refs(name).into_iter().map(|r| r.generated_ids).collect();
        for (label, config) in configs.clone() {
            let mut core = core(name, config);
            let requests = greedy_refs(name).into_iter().map(|r| (r.prompt_ids, greedy(32))).collect();
            let got: Vec<Vec<u32>> = run_to_end(&mut core, requests).into_iter().map(|mut c| c.remove(0)).collect();
            assert_eq!(got, want, "{name}: {label}");
            if label == "tiny KV pool" {
                assert!(core.stats().preemptions > 0, "{name}: the tiny pool should force preemption");
            }
            assert_eq!(core.stats().kv_blocks_used, 0, "{name}: {label}: blocks leaked");
        }
    }
}

#[test]
fn prefix_cache_hits_do_not_change_output() {
    let name = "qwen3-tiny";
    let r = &greedy_refs(name)[4];
    let mut core = core(name, EngineConfig { block_size: 4, ..EngineConfig::default() });
    let first = run_to_end(&mut core, vec![(r.prompt_ids.clone(), greedy(32))]);
    let hits_before = core.stats().prefix_cache_hit_tokens;
    let second = run_to_end(&mut core, vec![(r.prompt_ids.clone(), greedy(32))]);
    assert!(core.stats().prefix_cache_hit_tokens > hits_before, "the second run should hit the prefix cache");
    assert_eq!(first, second);
    assert_eq!(first[0][0], r.generated_ids);
}

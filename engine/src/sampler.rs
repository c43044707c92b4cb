//! Turning logits into tokens: penalties, temperature, top-k, top-p, min-p, seeded draws,
//! log-probabilities. This is the host implementation; backends may run the same
//! function on the device (they must draw with [`uniform`] so seeds mean the same thing).

use std::collections::HashMap;

/// How to sample one token from one row of logits.
#[derive(Debug, Clone)]
pub struct SamplingRow<'a> {
    /// Which row of the logits tensor this sample reads (several samples of an `n > 1`
    /// request read the same row).
    pub logit_row: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    /// The request's seed stream and the index of the token being drawn: the draw depends
    /// on nothing else, so batching and preemption never change a seeded result.
    pub seed: u64,
    pub step: u64,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub repetition_penalty: f32,
    pub prompt_tokens: &'a [u32],
    pub output_tokens: &'a [u32],
    /// Tokens that may not be drawn now (EOS and stop tokens before `min_tokens`).
    pub banned_tokens: &'a [u32],
    pub num_logprobs: Option<usize>,
}

impl SamplingRow<'_> {
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
    pub fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub token: u32,
    /// Log-probability of `token` under the model's raw distribution (when asked for).
    pub logprob: f32,
    /// Most likely tokens under the raw distribution, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// SplitMix64: a tiny, well-mixed 64-bit hash used as a counter-based generator.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The uniform draw in [0, 1) for token `step` of seed stream `seed`.
pub fn uniform(seed: u64, step: u64) -> f64 {
    let bits = splitmix64(seed ^ splitmix64(step.wrapping_add(0x5EED)));
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Derives the seed stream of sample `index` of a request from the request's seed.
pub fn child_seed(seed: u64, index: u32) -> u64 {
    if index == 0 {
        seed
    } else {
        splitmix64(seed ^ (index as u64).wrapping_mul(0xA24B_AED4_963E_E407))
    }
}

/// log-softmax over a row, in f64 for a stable sum.
fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    logits.iter().map(|&l| (l as f64 - log_z) as f32).collect()
}

/// The k best (id, value) pairs, best first; ties broken by the lower id.
fn top_entries(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    let better = |a: &u32, b: &u32| {
        values[*b as usize].partial_cmp(&values[*a as usize]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(b))
    };
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, better);
        idx.truncate(k);
    }
    idx.sort_by(better);
    idx.into_iter().map(|i| (i, values[i as usize])).collect()
}

fn apply_penalties(logits: &mut [f32], row: &SamplingRow<'_>) {
    if row.repetition_penalty != 1.0 {
        let mut seen = vec![false; logits.len()];
        for &t in row.prompt_tokens.iter().chain(row.output_tokens) {
            let Some(slot) = seen.get_mut(t as usize) else { continue };
            if !*slot {
                *slot = true;
                let l = &mut logits[t as usize];
                *l = if *l > 0.0 { *l / row.repetition_penalty } else { *l * row.repetition_penalty };
            }
        }
    }
    if row.presence_penalty != 0.0 || row.frequency_penalty != 0.0 {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in row.output_tokens {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= row.presence_penalty + row.frequency_penalty * c as f32;
            }
        }
    }
}

fn argmax(values: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws from the processed distribution: temperature, then top-k, top-p and min-p
/// filters, then inverse-CDF sampling with the row's counter-based uniform.
fn draw(logits: &[f32], row: &SamplingRow<'_>) -> u32 {
    let inv_t = 1.0 / row.temperature;
    let k = if row.top_k == 0 { logits.len() } else { row.top_k.min(logits.len()) };
    // Candidates best first (exact order matters for reproducibility).
    let mut cand = top_entries(logits, k);
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|&(_, l)| (((l - max) * inv_t) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    let mut keep = probs.len();
    if row.top_p < 1.0 {
        let mut cum = 0.0;
        for (i, p) in probs.iter().enumerate() {
            cum += p / total;
            if cum >= row.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
    }
    if row.min_p > 0.0 {
        let threshold = probs[0] * row.min_p as f64;
        keep = keep.min(probs.iter().take_while(|&&p| p >= threshold).count().max(1));
    }
    cand.truncate(keep);
    probs.truncate(keep);
    let kept_total: f64 = probs.iter().sum();
    let target = uniform(row.seed, row.step) * kept_total;
    let mut cum = 0.0;
    for (i, p) in probs.iter().enumerate() {
        cum += p;
        if target < cum {
            return cand[i].0;
        }
    }
    cand[keep - 1].0
}

/// Samples one token from a row of raw logits.
pub fn sample_row(raw: &[f32], row: &SamplingRow<'_>) -> SampledToken {
    let mut logits = raw.to_vec();
    for &t in row.banned_tokens {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
    if row.has_penalties() {
        apply_penalties(&mut logits, row);
    }
    let token = if row.is_greedy() { argmax(&logits) } else { draw(&logits, row) };
    let (logprob, top) = match row.num_logprobs {
        Some(k) => {
            let lp = log_softmax(raw);
            (lp[token as usize], top_entries(&lp, k))
        }
        None => (0.0, Vec::new()),
    };
    SampledToken { token, logprob, top }
}

/// Samples every row on the host; `logits` is [num_rows, vocab] row-major.
pub fn sample_host(logits: &[f32], vocab: usize, rows: &[SamplingRow<'_>]) -> Vec<SampledToken> {
    rows.iter().map(|r| sample_row(&logits[r.logit_row * vocab..(r.logit_row + 1) * vocab], r)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(temperature: f32, seed: u64, step: u64) -> SamplingRow<'static> {
        SamplingRow {
            logit_row: 0,
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed,
            step,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            prompt_tokens: &[],
            output_tokens: &[],
            banned_tokens: &[],
            num_logprobs: None,
        }
    }

    const LOGITS: [f32; 6] = [0.5, 2.0, 1.9, -1.0, 0.0, 1.0];

    #[test]
    fn greedy_picks_argmax_and_top_k_one_equals_greedy() {
        assert_eq!(sample_row(&LOGITS, &row(0.0, 1, 0)).token, 1);
        for seed in 0..50 {
            let r = SamplingRow { top_k: 1, ..row(1.0, seed, seed) };
            assert_eq!(sample_row(&LOGITS, &r).token, 1);
        }
    }

    #[test]
    fn same_seed_same_draws_different_seed_differs() {
        let a: Vec<u32> = (0..64).map(|s| sample_row(&LOGITS, &row(1.0, 7, s)).token).collect();
        let b: Vec<u32> = (0..64).map(|s| sample_row(&LOGITS, &row(1.0, 7, s)).token).collect();
        let c: Vec<u32> = (0..64).map(|s| sample_row(&LOGITS, &row(1.0, 8, s)).token).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn draws_follow_the_distribution() {
        // With temperature 1 token 1 and 2 are nearly equally likely and dominate.
        let mut counts = [0usize; 6];
        for s in 0..20_000 {
            counts[sample_row(&LOGITS, &row(1.0, 3, s)).token as usize] += 1;
        }
        let lp = log_softmax(&LOGITS);
        for (t, &c) in counts.iter().enumerate() {
            let expected = lp[t].exp() as f64 * 20_000.0;
            assert!((c as f64 - expected).abs() < 5.0 * expected.sqrt() + 5.0, "token {t}: {c} vs {expected}");
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        for s in 0..500 {
            let r = SamplingRow { top_p: 0.5, ..row(1.0, 11, s) };
            assert!([1, 2].contains(&sample_row(&LOGITS, &r).token));
            let r = SamplingRow { min_p: 0.8, ..row(1.0, 11, s) };
            assert!([1, 2].contains(&sample_row(&LOGITS, &r).token));
            let r = SamplingRow { top_k: 3, ..row(1.0, 11, s) };
            assert!([1, 2, 5].contains(&sample_row(&LOGITS, &r).token));
        }
    }

    #[test]
    fn banned_tokens_and_penalties_change_the_choice() {
        let r = SamplingRow { banned_tokens: &[1], ..row(0.0, 0, 0) };
        assert_eq!(sample_row(&LOGITS, &r).token, 2);
        let r = SamplingRow { output_tokens: &[1], presence_penalty: 0.5, ..row(0.0, 0, 0) };
        assert_eq!(sample_row(&LOGITS, &r).token, 2);
        let r = SamplingRow { prompt_tokens: &[1], repetition_penalty: 1.2, ..row(0.0, 0, 0) };
        assert_eq!(sample_row(&LOGITS, &r).token, 2);
    }

    #[test]
    fn logprobs_are_raw_and_sorted() {
        let r = SamplingRow { num_logprobs: Some(3), ..row(0.0, 0, 0) };
        let s = sample_row(&LOGITS, &r);
        let lp = log_softmax(&LOGITS);
        assert!((s.logprob - lp[1]).abs() < 1e-6);
        assert_eq!(s.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2, 5]);
        let total: f32 = lp.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
    }
}

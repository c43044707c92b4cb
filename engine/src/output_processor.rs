//! Turns the engine's raw per-token events into client-facing deltas: incremental
//! detokenization and stop strings, per choice. It runs on the caller's side of the
//! request stream, so the engine thread never spends time on text.

use std::sync::Arc;

use crate::detokenizer::IncrementalDetokenizer;
use crate::kv_transfer::KvHandoff;
use crate::request::{ChoiceDelta, FinishReason, StopReason, TokenLogprob};
use crate::sampling_params::SamplingParams;
use crate::stop_strings::StopStringMatcher;
use crate::tokenizer::Tokenizer;

/// Tokens of one choice produced by one engine step (or a few, when coalesced).
#[derive(Debug, Clone)]
pub struct TokenEvent {
    pub choice: u32,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<(FinishReason, Option<StopReason>)>,
    /// Set with `finish` when a prefill handed the prompt's KV off.
    pub handoff: Option<KvHandoff>,
}

struct ChoiceState {
    detokenizer: IncrementalDetokenizer,
    stops: StopStringMatcher,
    generated: usize,
    finished: bool,
}

pub struct OutputProcessor {
    tokenizer: Arc<Tokenizer>,
    min_tokens: usize,
    choices: Vec<ChoiceState>,
}

/// A processed delta, plus whether the engine must be told to stop this choice
/// (a stop string matched while the engine still thinks it is running).
pub struct Processed {
    pub delta: ChoiceDelta,
    pub stop_engine: bool,
}

impl OutputProcessor {
    pub fn new(tokenizer: Arc<Tokenizer>, prompt: &[u32], params: &SamplingParams) -> Self {
        let choices = (0..params.n)
            .map(|_| ChoiceState {
                detokenizer: IncrementalDetokenizer::new(prompt, params.skip_special_tokens),
                stops: StopStringMatcher::new(params.stop.clone(), params.include_stop_str_in_output),
                generated: 0,
                finished: false,
            })
            .collect();
        Self { tokenizer, min_tokens: params.min_tokens, choices }
    }

    pub fn all_finished(&self) -> bool {
        self.choices.iter().all(|c| c.finished)
    }

    pub fn is_finished(&self, choice: u32) -> bool {
        self.choices.get(choice as usize).is_none_or(|c| c.finished)
    }

    /// Processes one event; None when the choice had already finished (late tokens after a
    /// stop string are dropped).
    pub fn process(&mut self, ev: TokenEvent) -> Option<Processed> {
        let tokenizer = &self.tokenizer;
        let state = self.choices.get_mut(ev.choice as usize)?;
        if state.finished {
            return None;
        }
        let mut text = String::new();
        let mut kept_tokens = Vec::with_capacity(ev.tokens.len());
        let mut stop_hit = None;
        for &token in &ev.tokens {
            state.generated += 1;
            kept_tokens.push(token);
            let piece = state.detokenizer.push(tokenizer, token);
            // Stop strings count only once min_tokens were generated.
            if state.generated > self.min_tokens && !state.stops.is_empty() {
                let out = state.stops.push(&piece);
                text.push_str(&out.text);
                if let Some(m) = out.matched {
                    stop_hit = Some(m);
                    break;
                }
            } else {
                text.push_str(&piece);
            }
        }
        let logprobs = ev.logprobs.into_iter().take(kept_tokens.len()).collect();
        let (finish_reason, stop_reason, stop_engine) = match (stop_hit, ev.finish) {
            (Some(s), finish) => (Some(FinishReason::Stop), Some(StopReason::Text(s)), finish.is_none()),
            (None, Some((reason, why))) => {
                text.push_str(&state.stops.flush());
                (Some(reason), why, false)
            }
            (None, None) => (None, None, false),
        };
        state.finished = finish_reason.is_some();
        Some(Processed {
            delta: ChoiceDelta {
                index: ev.choice,
                text,
                token_ids: kept_tokens,
                logprobs,
                finish_reason,
                stop_reason,
                kv_handoff: ev.handoff,
                kv_ready: None,
            },
            stop_engine,
        })
    }
}

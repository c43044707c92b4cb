//! Per-request sampling parameters and their validation.
//!
//! Field names follow the OpenAI API so a validation error can name the offending field
//! exactly as the client spelled it.

use serde::{Deserialize, Serialize};

/// Most samples one request may ask for.
pub const MAX_N: usize = 64;
/// Most top log-probabilities per token.
pub const MAX_LOGPROBS: usize = 20;
/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Independent samples of the same prompt (they share the prompt's KV blocks).
    pub n: usize,
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    pub min_p: f32,
    /// Same seed, same output; None draws a seed from the engine's generator.
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Hugging Face semantics: divides positive logits (multiplies negative ones) of every
    /// token already in the prompt or the output.
    pub repetition_penalty: f32,
    pub max_tokens: usize,
    /// EOS and stop tokens are masked until this many tokens were generated.
    pub min_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub include_stop_str_in_output: bool,
    pub ignore_eos: bool,
    /// Some(k): return the sampled token's log-probability and the k most likely tokens.
    pub logprobs: Option<usize>,
    pub skip_special_tokens: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            n: 1,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            max_tokens: 16,
            min_tokens: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            include_stop_str_in_output: false,
            ignore_eos: false,
            logprobs: None,
            skip_special_tokens: true,
        }
    }
}

/// A parameter the engine refuses, named as the client wrote it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{param}: {message}")]
pub struct InvalidParam {
    pub param: &'static str,
    pub message: String,
}

fn invalid(param: &'static str, message: impl Into<String>) -> InvalidParam {
    InvalidParam { param, message: message.into() }
}

fn check_range(param: &'static str, value: f32, lo: f32, hi: f32) -> Result<(), InvalidParam> {
    if value.is_finite() && value >= lo && value <= hi {
        Ok(())
    } else {
        Err(invalid(param, format!("must be between {lo} and {hi}, got {value}")))
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    pub fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0
    }

    pub fn validate(&self) -> Result<(), InvalidParam> {
        if self.n == 0 || self.n > MAX_N {
            return Err(invalid("n", format!("must be between 1 and {MAX_N}, got {}", self.n)));
        }
        check_range("temperature", self.temperature, 0.0, 2.0)?;
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(invalid("top_p", format!("must be in (0, 1], got {}", self.top_p)));
        }
        check_range("min_p", self.min_p, 0.0, 1.0)?;
        check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0 && self.repetition_penalty <= 10.0) {
            return Err(invalid("repetition_penalty", format!("must be in (0, 10], got {}", self.repetition_penalty)));
        }
        if self.max_tokens == 0 {
            return Err(invalid("max_tokens", "must be at least 1"));
        }
        if self.min_tokens > self.max_tokens {
            return Err(invalid(
                "min_tokens",
                format!("must not exceed max_tokens ({} > {})", self.min_tokens, self.max_tokens),
            ));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(invalid("stop", format!("at most {MAX_STOP_STRINGS} stop strings, got {}", self.stop.len())));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(invalid("stop", "stop strings must not be empty"));
        }
        if let Some(k) = self.logprobs {
            if k > MAX_LOGPROBS {
                return Err(invalid("logprobs", format!("must be between 0 and {MAX_LOGPROBS}, got {k}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        SamplingParams::default().validate().unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(&str, SamplingParams)> = vec![
            ("n", SamplingParams { n: 0, ..Default::default() }),
            ("n", SamplingParams { n: MAX_N + 1, ..Default::default() }),
            ("temperature", SamplingParams { temperature: -0.1, ..Default::default() }),
            ("temperature", SamplingParams { temperature: f32::NAN, ..Default::default() }),
            ("top_p", SamplingParams { top_p: 0.0, ..Default::default() }),
            ("min_p", SamplingParams { min_p: 1.5, ..Default::default() }),
            ("presence_penalty", SamplingParams { presence_penalty: 3.0, ..Default::default() }),
            ("repetition_penalty", SamplingParams { repetition_penalty: 0.0, ..Default::default() }),
            ("max_tokens", SamplingParams { max_tokens: 0, ..Default::default() }),
            ("min_tokens", SamplingParams { min_tokens: 20, max_tokens: 10, ..Default::default() }),
            ("stop", SamplingParams { stop: vec![String::new()], ..Default::default() }),
            ("logprobs", SamplingParams { logprobs: Some(21), ..Default::default() }),
        ];
        for (field, params) in cases {
            assert_eq!(params.validate().unwrap_err().param, field);
        }
    }
}

//! Engine log-probabilities in the wire shapes. Token texts come from the tokenizer, only
//! for requests that asked for log-probabilities.

use dlengine_engine::request::TokenLogprob;
use dlengine_engine::tokenizer::Tokenizer;
use serde_json::{Map, Value};

use crate::openai::logprobs::{ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob};

pub fn chat_logprobs(tokenizer: &Tokenizer, logprobs: &[TokenLogprob]) -> ChatLogprobs {
    let entry = |id: u32, logprob: f32| {
        let token = tokenizer.id_to_token_text(id);
        let bytes = Some(token.as_bytes().to_vec());
        (token, logprob, bytes)
    };
    let content = logprobs
        .iter()
        .map(|lp| {
            let (token, logprob, bytes) = entry(lp.token_id, lp.logprob);
            let top_logprobs = lp
                .top
                .iter()
                .map(|&(id, logprob)| {
                    let (token, logprob, bytes) = entry(id, logprob);
                    TopLogprob { token, logprob, bytes }
                })
                .collect();
            ChatTokenLogprob { token, logprob, bytes, top_logprobs }
        })
        .collect();
    ChatLogprobs { content }
}

/// `offset`: characters of the choice's text before these tokens; advanced past them.
pub fn completion_logprobs(tokenizer: &Tokenizer, logprobs: &[TokenLogprob], offset: &mut usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for lp in logprobs {
        let token = tokenizer.id_to_token_text(lp.token_id);
        out.text_offset.push(*offset);
        *offset += token.chars().count();
        out.tokens.push(token);
        out.token_logprobs.push(Some(lp.logprob));
        let top: Map<String, Value> =
            lp.top.iter().map(|&(id, logprob)| (tokenizer.id_to_token_text(id), Value::from(logprob))).collect();
        out.top_logprobs.push(Some(top));
    }
    out
}

//! Incremental detokenization: turns a growing list of token ids into text deltas.
//!
//! Decoding the whole output on every token is quadratic. Like other engines we decode a
//! short window: the tokens since `prefix_offset` (already emitted context, which fixes
//! spacing for SentencePiece-style decoders) and emit what the window adds past the text
//! of `prefix_offset..read_offset`. A window that ends inside a multi-byte character
//! decodes to U+FFFD; we wait for more tokens instead of emitting half a character.

use crate::tokenizer::Tokenizer;

/// Prompt tokens kept as left context for the first output tokens.
const CONTEXT_TOKENS: usize = 5;

#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDetokenizer {
    pub fn new(prompt_tail: &[u32], skip_special_tokens: bool) -> Self {
        let start = prompt_tail.len().saturating_sub(CONTEXT_TOKENS);
        let tokens = prompt_tail[start..].to_vec();
        let read_offset = tokens.len();
        Self { tokens, prefix_offset: 0, read_offset, skip_special_tokens }
    }

    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> String {
        self.tokens.push(token);
        let prefix = tokenizer.decode(&self.tokens[self.prefix_offset..self.read_offset], self.skip_special_tokens);
        let full = tokenizer.decode(&self.tokens[self.prefix_offset..], self.skip_special_tokens);
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') || !full.starts_with(prefix.as_str()) {
            // Either nothing new, or an incomplete character: wait. (A decoder that rewrites
            // earlier text is handled by waiting too; the window then catches up.)
            return String::new();
        }
        let delta = full[prefix.len()..].to_owned();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        // Keep the buffer short: everything before prefix_offset is never decoded again.
        if self.prefix_offset > 64 {
            self.tokens.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
        delta
    }
}

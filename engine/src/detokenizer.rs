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
/// Tokens we wait for a character to complete: a UTF-8 character is at most 4 bytes, so
/// a longer wait means the model emitted invalid bytes; emit them (as U+FFFD) and move
/// on rather than re-decode an ever-growing window.
const MAX_PENDING_TOKENS: usize = 6;

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
        let pending = self.tokens.len() - self.read_offset;
        let complete = full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(prefix.as_str());
        if !complete && pending < MAX_PENDING_TOKENS {
            // Nothing new, or an incomplete character: wait. (A decoder that rewrites
            // earlier text is handled by waiting too; the window then catches up.)
            return String::new();
        }
        let delta = if full.starts_with(prefix.as_str()) { full[prefix.len()..].to_owned() } else { full };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/qwen3-tiny");
        Tokenizer::from_dir(&dir).unwrap()
    }

    #[test]
    fn streamed_text_equals_one_decode_and_never_splits_a_character() {
        let tok = tokenizer();
        let text = "naïve café 你好，世界 🚀 done";
        let ids = tok.encode(text, false).unwrap();
        let mut d = IncrementalDetokenizer::new(&[], true);
        let mut out = String::new();
        for &id in &ids {
            let piece = d.push(&tok, id);
            assert!(!piece.contains('\u{FFFD}'), "a split character leaked: {piece:?}");
            out.push_str(&piece);
        }
        assert_eq!(out, text);
    }

    #[test]
    fn invalid_bytes_are_emitted_instead_of_waiting_forever() {
        let tok = tokenizer();
        // A lone UTF-8 continuation byte never completes a character.
        let bad = tok.encode("\u{80}", false).unwrap()[0];
        let mut d = IncrementalDetokenizer::new(&[], true);
        let emitted: String = (0..20).map(|_| d.push(&tok, bad)).collect();
        assert!(!emitted.is_empty(), "text must come out after a bounded wait");
        assert!(d.tokens.len() <= MAX_PENDING_TOKENS + 1 || d.read_offset > 0);
    }
}

//! `<think>…</think>` reasoning, returned as `reasoning_content` rather than content.

use super::tag_splitter::{Segment, TagSplitter};
use super::Piece;

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// Whether the rendered prompt leaves a `<think>` open, so that generation starts inside
/// the reasoning (Qwen3-style templates with thinking forced on).
pub fn prompt_opens_reasoning(prompt: &str) -> bool {
    match (prompt.rfind(OPEN), prompt.rfind(CLOSE)) {
        (Some(open), Some(close)) => open > close,
        (Some(_), None) => true,
        _ => false,
    }
}

/// Whether a chat template speaks the `<think>` convention at all.
pub fn template_uses_reasoning(template: &str) -> bool {
    template.contains(OPEN) && template.contains(CLOSE)
}

pub struct ReasoningParser {
    splitter: TagSplitter,
    segments: Vec<Segment>,
}

impl ReasoningParser {
    pub fn new(starts_inside: bool) -> Self {
        Self { splitter: TagSplitter::new(OPEN, CLOSE, starts_inside), segments: Vec::new() }
    }

    pub fn push(&mut self, text: &str, out: &mut Vec<Piece>) {
        self.splitter.push(text, &mut self.segments);
        self.drain(out);
    }

    pub fn finish(&mut self, out: &mut Vec<Piece>) {
        self.splitter.finish(&mut self.segments);
        self.drain(out);
    }

    fn drain(&mut self, out: &mut Vec<Piece>) {
        for segment in self.segments.drain(..) {
            match segment {
                Segment::Inside(text) => out.push(Piece::Reasoning(text)),
                Segment::Outside(text) => out.push(Piece::Content(text)),
                Segment::Opened | Segment::Closed => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_an_open_think_in_the_prompt() {
        assert!(prompt_opens_reasoning("<|im_start|>assistant\n<think>\n"));
        assert!(!prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        assert!(!prompt_opens_reasoning("<|im_start|>assistant\n"));
    }
}

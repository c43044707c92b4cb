//! Turning generated text into the parts of a chat message: reasoning, content and tool
//! calls. Works on text pieces as they stream; the non-streaming answer is the same parser
//! fed the whole text at once, so both agree by construction.

mod reasoning;
mod tag_splitter;
mod tool_calls;

pub use reasoning::{prompt_opens_reasoning, template_uses_reasoning};
#[cfg(test)]
pub use tool_calls::tool_parser_by_name;
pub use tool_calls::{detect_tool_parser, ToolParserKind};

use reasoning::ReasoningParser;

/// What a stretch of generated text turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Content(String),
    Reasoning(String),
    ToolCall { name: String, arguments: String },
}

/// One tool-call format's incremental parser.
pub trait ToolCallParser: Send {
    fn push(&mut self, text: &str, out: &mut Vec<Piece>);
    /// End of output: release or resolve whatever is held back.
    fn finish(&mut self, out: &mut Vec<Piece>);
}

/// The parsers one choice runs through: reasoning first, then tool calls on the content.
#[derive(Default)]
pub struct OutputParser {
    reasoning: Option<ReasoningParser>,
    tools: Option<Box<dyn ToolCallParser>>,
    scratch: Vec<Piece>,
}

impl OutputParser {
    /// `reasoning`: Some(starts inside `<think>`) when the model reasons; `tools`: the
    /// tool-call format when the request offers tools.
    pub fn new(reasoning: Option<bool>, tools: Option<&ToolParserKind>) -> Self {
        Self {
            reasoning: reasoning.map(ReasoningParser::new),
            tools: tools.map(ToolParserKind::parser),
            scratch: Vec::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        let mut out = Vec::new();
        match &mut self.reasoning {
            Some(reasoning) => reasoning.push(text, &mut self.scratch),
            None => self.scratch.push(Piece::Content(text.to_owned())),
        }
        self.route(&mut out);
        out
    }

    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        if let Some(reasoning) = &mut self.reasoning {
            reasoning.finish(&mut self.scratch);
        }
        self.route(&mut out);
        if let Some(tools) = &mut self.tools {
            tools.finish(&mut out);
        }
        merge_adjacent(out)
    }

    /// Content goes on to the tool-call parser; reasoning goes out as is.
    fn route(&mut self, out: &mut Vec<Piece>) {
        for piece in self.scratch.drain(..) {
            match (piece, &mut self.tools) {
                (Piece::Content(text), Some(tools)) => tools.push(&text, out),
                (piece, _) => out.push(piece),
            }
        }
        let merged = merge_adjacent(std::mem::take(out));
        *out = merged;
    }
}

fn merge_adjacent(pieces: Vec<Piece>) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::with_capacity(pieces.len());
    for piece in pieces {
        match (out.last_mut(), piece) {
            (_, Piece::Content(t) | Piece::Reasoning(t)) if t.is_empty() => {}
            (Some(Piece::Content(a)), Piece::Content(b)) => a.push_str(&b),
            (Some(Piece::Reasoning(a)), Piece::Reasoning(b)) => a.push_str(&b),
            (_, piece) => out.push(piece),
        }
    }
    out
}

/// A whole message's parts, for non-streaming answers and for tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedMessage {
    pub content: String,
    pub reasoning: String,
    pub tool_calls: Vec<(String, String)>,
}

impl ParsedMessage {
    pub fn add(&mut self, pieces: Vec<Piece>) {
        for piece in pieces {
            match piece {
                Piece::Content(t) => self.content.push_str(&t),
                Piece::Reasoning(t) => self.reasoning.push_str(&t),
                Piece::ToolCall { name, arguments } => self.tool_calls.push((name, arguments)),
            }
        }
    }
}

#[cfg(test)]
mod tests;

//! Tool-call formats and the parser registry. A format is a name, a way to recognise it in
//! a chat template, and a parser; adding one is adding an entry to [`TOOL_PARSERS`].

use serde_json::Value;

use super::tag_splitter::{Segment, TagSplitter};
use super::{Piece, ToolCallParser};

/// A tool-call output format.
pub struct ToolParserKind {
    pub name: &'static str,
    /// Whether a chat template's text shows this format.
    detect: fn(&str) -> bool,
    make: fn() -> Box<dyn ToolCallParser>,
}

impl ToolParserKind {
    pub fn parser(&self) -> Box<dyn ToolCallParser> {
        (self.make)()
    }
}

impl std::fmt::Debug for ToolParserKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

pub static TOOL_PARSERS: &[ToolParserKind] = &[ToolParserKind {
    // Hermes / Qwen: <tool_call>{"name": ..., "arguments": {...}}</tool_call>
    name: "hermes",
    detect: |template| template.contains("<tool_call>"),
    make: || Box::new(TaggedJsonParser::new("<tool_call>", "</tool_call>")),
}];

// Selection by name is for a `--tool-call-parser` flag (not in the CLI yet); tests use it now.
#[cfg(test)]
pub fn tool_parser_by_name(name: &str) -> Option<&'static ToolParserKind> {
    TOOL_PARSERS.iter().find(|k| k.name == name)
}

pub fn detect_tool_parser(template: &str) -> Option<&'static ToolParserKind> {
    TOOL_PARSERS.iter().find(|k| (k.detect)(template))
}

/// Tool calls as JSON objects between an open and a close tag.
///
/// Whitespace right before a call, and trailing whitespace once calls were made, is
/// formatting, not content: it is held back and dropped, so a reply made only of calls
/// has no content. The decisions depend on the text alone, never on how it was chunked.
pub struct TaggedJsonParser {
    open: &'static str,
    close: &'static str,
    splitter: TagSplitter,
    segments: Vec<Segment>,
    body: String,
    held_whitespace: String,
    whitespace_before_call: String,
    calls: usize,
}

impl TaggedJsonParser {
    pub fn new(open: &'static str, close: &'static str) -> Self {
        Self {
            open,
            close,
            splitter: TagSplitter::new(open, close, false),
            segments: Vec::new(),
            body: String::new(),
            held_whitespace: String::new(),
            whitespace_before_call: String::new(),
            calls: 0,
        }
    }

    fn drain(&mut self, out: &mut Vec<Piece>) {
        let segments = std::mem::take(&mut self.segments);
        for segment in segments {
            match segment {
                Segment::Outside(text) => self.content(&text, out),
                Segment::Opened => {
                    self.whitespace_before_call = std::mem::take(&mut self.held_whitespace);
                    self.body.clear();
                }
                Segment::Inside(text) => self.body.push_str(&text),
                Segment::Closed => self.end_call(true, out),
            }
        }
    }

    fn content(&mut self, text: &str, out: &mut Vec<Piece>) {
        let trimmed = text.trim_end();
        if trimmed.is_empty() {
            self.held_whitespace.push_str(text);
            return;
        }
        let mut piece = std::mem::take(&mut self.held_whitespace);
        piece.push_str(trimmed);
        out.push(Piece::Content(piece));
        self.held_whitespace.push_str(&text[trimmed.len()..]);
    }

    /// A call's text is complete (or the output ended inside one).
    fn end_call(&mut self, closed: bool, out: &mut Vec<Piece>) {
        let body = std::mem::take(&mut self.body);
        match parse_call(&body) {
            Some((name, arguments)) => {
                self.calls += 1;
                self.whitespace_before_call.clear();
                out.push(Piece::ToolCall { name, arguments });
            }
            None => {
                // Not a call after all: the model's text goes back as content, tags included.
                let mut raw = std::mem::take(&mut self.whitespace_before_call);
                raw.push_str(self.open);
                raw.push_str(&body);
                if closed {
                    raw.push_str(self.close);
                }
                self.content(&raw, out);
            }
        }
    }
}

impl ToolCallParser for TaggedJsonParser {
    fn push(&mut self, text: &str, out: &mut Vec<Piece>) {
        self.splitter.push(text, &mut self.segments);
        self.drain(out);
    }

    fn finish(&mut self, out: &mut Vec<Piece>) {
        self.splitter.finish(&mut self.segments);
        self.drain(out);
        if self.splitter.is_inside() {
            self.end_call(false, out);
        }
        let held = std::mem::take(&mut self.held_whitespace);
        if self.calls == 0 && !held.is_empty() {
            out.push(Piece::Content(held));
        }
    }
}

/// `{"name": "...", "arguments": {...}}` (some models say `parameters`) to name and
/// arguments as a JSON string.
fn parse_call(body: &str) -> Option<(String, String)> {
    let value: Value = serde_json::from_str(body.trim()).ok()?;
    let name = value.get("name")?.as_str()?.to_owned();
    let arguments = match value.get("arguments").or_else(|| value.get("parameters")) {
        None | Some(Value::Null) => "{}".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    Some((name, arguments))
}

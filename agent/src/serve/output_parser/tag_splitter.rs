//! Splits streamed text at an open/close tag pair (`<think>`/`</think>`, `<tool_call>`/...)
//! whatever the chunking: a chunk that ends in what could be the start of the awaited tag
//! is held back until the next chunk settles it.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Text outside the tags.
    Outside(String),
    /// Text between the tags.
    Inside(String),
    Opened,
    Closed,
}

#[derive(Debug)]
pub struct TagSplitter {
    open: &'static str,
    close: &'static str,
    inside: bool,
    held: String,
}

impl TagSplitter {
    pub fn new(open: &'static str, close: &'static str, start_inside: bool) -> Self {
        Self { open, close, inside: start_inside, held: String::new() }
    }

    pub fn is_inside(&self) -> bool {
        self.inside
    }

    pub fn push(&mut self, text: &str, out: &mut Vec<Segment>) {
        let mut buf = std::mem::take(&mut self.held);
        buf.push_str(text);
        let mut rest = buf.as_str();
        loop {
            let tag = if self.inside { self.close } else { self.open };
            match rest.find(tag) {
                Some(pos) => {
                    self.emit(&rest[..pos], out);
                    out.push(if self.inside { Segment::Closed } else { Segment::Opened });
                    self.inside = !self.inside;
                    rest = &rest[pos + tag.len()..];
                }
                None => {
                    let keep = partial_tag_suffix(rest, tag);
                    self.emit(&rest[..rest.len() - keep], out);
                    self.held = rest[rest.len() - keep..].to_owned();
                    return;
                }
            }
        }
    }

    /// End of output: whatever was held back is plain text after all.
    pub fn finish(&mut self, out: &mut Vec<Segment>) {
        let held = std::mem::take(&mut self.held);
        self.emit(&held, out);
    }

    fn emit(&self, text: &str, out: &mut Vec<Segment>) {
        if text.is_empty() {
            return;
        }
        out.push(if self.inside { Segment::Inside(text.to_owned()) } else { Segment::Outside(text.to_owned()) });
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `tag`.
fn partial_tag_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && tag.as_bytes().starts_with(&text.as_bytes()[text.len() - n..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(chunks: &[&str], start_inside: bool) -> Vec<Segment> {
        let mut s = TagSplitter::new("<t>", "</t>", start_inside);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn tags_split_across_chunks_are_found() {
        let out = split_all(&["a<", "t>b</", "t", ">c"], false);
        assert_eq!(
            out,
            vec![
                Segment::Outside("a".into()),
                Segment::Opened,
                Segment::Inside("b".into()),
                Segment::Closed,
                Segment::Outside("c".into())
            ]
        );
    }

    #[test]
    fn a_false_start_is_released() {
        assert_eq!(split_all(&["a<", "b"], false), vec![Segment::Outside("a".into()), Segment::Outside("<b".into())]);
        assert_eq!(split_all(&["a<"], false), vec![Segment::Outside("a".into()), Segment::Outside("<".into())]);
    }

    #[test]
    fn can_start_inside() {
        assert_eq!(split_all(&["r</t>c"], true), vec![Segment::Inside("r".into()), Segment::Closed, Segment::Outside("c".into())]);
    }

    #[test]
    fn partial_suffix_respects_char_boundaries() {
        assert_eq!(partial_tag_suffix("é<", "<t>"), 1);
        assert_eq!(partial_tag_suffix("é", "<t>"), 0);
        assert_eq!(partial_tag_suffix("x</", "</t>"), 2);
    }
}

//! Stop strings over streamed text.
//!
//! Text that could be the start of a stop string is held back until the next delta shows
//! whether it is, so a client never sees part of a stop string. Each delta searches only
//! the held-back text plus the new text, so the cost is linear in output length.

#[derive(Debug, Clone)]
pub struct StopStringMatcher {
    stops: Vec<String>,
    include_stop: bool,
    /// Text not yet released (a possible stop-string prefix).
    held: String,
}

/// What one delta produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutcome {
    /// Text safe to send now.
    pub text: String,
    /// The stop string that matched, if any; generation ends here.
    pub matched: Option<String>,
}

impl StopStringMatcher {
    pub fn new(stops: Vec<String>, include_stop: bool) -> Self {
        Self { stops, include_stop, held: String::new() }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome { text: delta.to_owned(), matched: None };
        }
        self.held.push_str(delta);
        if let Some((pos, stop)) = self.earliest_match() {
            let end = if self.include_stop { pos + stop.len() } else { pos };
            let text = self.held[..end].to_owned();
            self.held.clear();
            return StopOutcome { text, matched: Some(stop) };
        }
        let keep = self.longest_stop_prefix_suffix();
        let release = self.held.len() - keep;
        let text = self.held[..release].to_owned();
        self.held.drain(..release);
        StopOutcome { text, matched: None }
    }

    /// Releases held text when generation ends without a stop string.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    fn earliest_match(&self) -> Option<(usize, String)> {
        self.stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|p| (p, s.clone())))
            .min_by_key(|(p, s)| (*p, std::cmp::Reverse(s.len())))
    }

    /// Length in bytes of the longest suffix of `held` that begins some stop string.
    fn longest_stop_prefix_suffix(&self) -> usize {
        let mut best = 0;
        for (start, _) in self.held.char_indices() {
            let suffix = &self.held[start..];
            if self.stops.iter().any(|s| s.starts_with(suffix)) {
                best = best.max(suffix.len());
                break; // char_indices go left to right: the first hit is the longest
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], include: bool, deltas: &[&str]) -> (String, Option<String>) {
        let mut m = StopStringMatcher::new(stops.iter().map(|s| s.to_string()).collect(), include);
        let mut out = String::new();
        for d in deltas {
            let o = m.push(d);
            out.push_str(&o.text);
            if o.matched.is_some() {
                return (out, o.matched);
            }
        }
        out.push_str(&m.flush());
        (out, None)
    }

    #[test]
    fn cuts_exactly_before_the_stop_string_across_deltas() {
        assert_eq!(run(&["STOP"], false, &["hello S", "T", "OP and more"]), ("hello ".into(), Some("STOP".into())));
        assert_eq!(run(&["STOP"], true, &["hello ST", "OP!"]), ("hello STOP".into(), Some("STOP".into())));
    }

    #[test]
    fn held_prefix_is_released_when_it_is_not_a_stop() {
        assert_eq!(run(&["STOP"], false, &["a ST", "ART b"]), ("a START b".into(), None));
        assert_eq!(run(&["STOP"], false, &["ends with ST"]), ("ends with ST".into(), None));
    }

    #[test]
    fn earliest_of_several_stops_wins_and_unicode_is_safe() {
        assert_eq!(run(&["b", "a"], false, &["xxab"]), ("xx".into(), Some("a".into())));
        assert_eq!(run(&["é!"], false, &["caf", "é", "!x"]), ("caf".into(), Some("é!".into())));
        assert_eq!(run(&["日本"], false, &["こんにちは日", "本語"]), ("こんにちは".into(), Some("日本".into())));
    }

    #[test]
    fn nothing_is_held_without_stop_strings() {
        let mut m = StopStringMatcher::new(vec![], false);
        assert_eq!(m.push("abc").text, "abc");
    }
}

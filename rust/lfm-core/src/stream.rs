//! Incremental detokenisation: text deltas that never split a UTF-8 character and never
//! show text a stop string may still remove; their concatenation is the final text.

/// Turns the growing token list into text deltas.
#[derive(Debug, Default)]
pub struct TextDeltas {
    emitted: usize,
    /// Bytes kept back so that a stop string can still be cut off.
    holdback: usize,
}

impl TextDeltas {
    pub fn new(stop: &[String]) -> Self {
        TextDeltas { emitted: 0, holdback: stop.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0) }
    }

    /// The new text, given the decoded text of all tokens so far.
    pub fn push(&mut self, full: &str) -> Option<String> {
        // A trailing replacement character is an incomplete UTF-8 sequence: wait for more.
        let stable = full.trim_end_matches('\u{FFFD}');
        let mut end = stable.len().saturating_sub(self.holdback);
        while !stable.is_char_boundary(end) {
            end -= 1;
        }
        if end <= self.emitted || !full.is_char_boundary(self.emitted) {
            return None;
        }
        let delta = full[self.emitted..end].to_string();
        self.emitted = end;
        Some(delta)
    }

    /// What is left of the final text.
    pub fn finish(&mut self, final_text: &str) -> Option<String> {
        if final_text.len() <= self.emitted || !final_text.is_char_boundary(self.emitted) {
            return None;
        }
        let delta = final_text[self.emitted..].to_string();
        self.emitted = final_text.len();
        Some(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_incomplete_characters_and_stop_prefixes() {
        let mut d = TextDeltas::new(&["END".to_string()]);
        assert_eq!(d.push("ab"), None); // held back: could start "END"
        assert_eq!(d.push("abcd"), Some("ab".into()));
        assert_eq!(d.push("abcd\u{FFFD}"), None);
        assert_eq!(d.push("abcdé"), Some("cd".into()));
        assert_eq!(d.finish("abcdé"), Some("é".into()));
    }
}

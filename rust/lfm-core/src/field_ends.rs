//! How each top-level string of a JSON answer ended: closed by the model (it could have
//! written on) or by the grammar (only a closing quote was allowed, e.g. at `maxLength`).
//!
//! The tracker follows the committed token bytes with a small JSON lexer; at the token
//! whose bytes close a top-level member's string, it asks the step's mask whether any
//! allowed token shares the bytes up to the quote and then continues the string.

use crate::request::{Closer, FieldEnd};

#[derive(Debug, Default)]
pub struct FieldTracker {
    depth: usize,
    in_string: bool,
    escape: bool,
    /// At depth 1: the next string is a key (not a value).
    expect_key: bool,
    /// Raw bytes of the string being read (quotes included) when it is a top-level key or value.
    current: Option<Vec<u8>>,
    current_is_key: bool,
    key: Option<String>,
    pub ends: Vec<FieldEnd>,
}

impl FieldTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Follows `token` (the bytes of a committed token). `continues_string(prefix)` says
    /// whether the step's mask allowed a token starting with `prefix` and then continuing
    /// the string; it is asked only when `token` closes a top-level value string.
    pub fn observe(&mut self, token: &[u8], continues_string: impl Fn(&[u8]) -> bool) {
        for (i, &b) in token.iter().enumerate() {
            if self.in_string {
                if let Some(cur) = self.current.as_mut() {
                    cur.push(b);
                }
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_string = false;
                    self.close_string(&token[..i], &continues_string);
                }
                continue;
            }
            match b {
                b'"' => {
                    self.in_string = true;
                    if self.depth == 1 {
                        self.current = Some(vec![b'"']);
                        self.current_is_key = self.expect_key;
                    }
                }
                b'{' | b'[' => {
                    self.depth += 1;
                    if self.depth == 1 && b == b'{' {
                        self.expect_key = true;
                    }
                }
                b'}' | b']' => self.depth = self.depth.saturating_sub(1),
                b':' if self.depth == 1 => self.expect_key = false,
                b',' if self.depth == 1 => self.expect_key = true,
                _ => {}
            }
        }
    }

    fn close_string(&mut self, before_quote: &[u8], continues_string: &impl Fn(&[u8]) -> bool) {
        let Some(raw) = self.current.take() else { return };
        let Ok(text) = serde_json::from_slice::<String>(&raw) else { return };
        if self.current_is_key {
            self.key = Some(text);
        } else if let Some(key) = self.key.take() {
            let closed_by = if continues_string(before_quote) { Closer::Model } else { Closer::Grammar };
            self.ends.push(FieldEnd { key, text, closed_by });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_top_level_strings_only() {
        let mut t = FieldTracker::new();
        for tok in [&b"{\"description\":\"A c"[..], b"at\",\"tags\":[\"x\"],\"n\":{\"k\":\"v\"},\"s\":\"\\\"q", b"\"}"]
        {
            t.observe(tok, |prefix| prefix != b"\\\"q");
        }
        assert_eq!(
            t.ends,
            vec![
                FieldEnd { key: "description".into(), text: "A cat".into(), closed_by: Closer::Model },
                FieldEnd { key: "s".into(), text: "\"q".into(), closed_by: Closer::Model },
            ]
        );
        let mut t = FieldTracker::new();
        t.observe(b"{\"d\":\"abc\"}", |_| false);
        assert_eq!(t.ends[0].closed_by, Closer::Grammar);
    }
}

//! Cheap checks on a request, run before any image is decoded or template rendered.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::options::Limits;

/// Roles a request may use.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// What the checks learned about the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageStats {
    pub image_parts: usize,
}

fn rejected(field: impl Into<String>, value: impl ToString, limit: impl ToString, reason: impl Into<String>) -> Error {
    Error::rejected(field, value, limit, reason)
}

/// Checks the shape of HF chat messages, their sizes, and that no text carries a special
/// token string (which would let user text forge prompt structure).
pub fn check_messages(messages: &Value, limits: &Limits, specials: &[String]) -> Result<MessageStats> {
    let list = messages.as_array().ok_or_else(|| {
        rejected("messages", "not a list", "a list of messages", "messages must be a list of {role, content} objects")
    })?;
    if list.is_empty() {
        return Err(rejected("messages", 0, "at least 1", "messages is empty"));
    }
    if list.len() > limits.max_messages {
        return Err(rejected(
            "messages",
            list.len(),
            limits.max_messages,
            format!("{} messages, over max_messages={}", list.len(), limits.max_messages),
        ));
    }
    let (mut parts_total, mut text_bytes, mut image_parts) = (0usize, 0usize, 0usize);
    // How far a special token can reach into a text part from the parts before it.
    let reach = specials.iter().map(String::len).max().unwrap_or(1).saturating_sub(1);
    let special_in = |text: &str, where_: &str| match specials.iter().find(|s| text.contains(s.as_str())) {
        Some(s) => {
            Err(rejected(where_, s, "no special tokens", format!("{where_} contains the special token string {s:?}")))
        }
        None => Ok(()),
    };
    let mut check_text = |text: &str, where_: &str| -> Result<()> {
        text_bytes += text.len();
        if text_bytes > limits.max_text_bytes {
            return Err(rejected(
                "text",
                text_bytes,
                limits.max_text_bytes,
                format!("text totals over max_text_bytes={} bytes", limits.max_text_bytes),
            ));
        }
        special_in(text, where_)
    };
    for (i, m) in list.iter().enumerate() {
        let field = format!("messages[{i}]");
        let obj = m
            .as_object()
            .ok_or_else(|| rejected(&field, m, "an object", format!("{field} is not a {{role, content}} object")))?;
        let role = obj.get("role").and_then(Value::as_str).unwrap_or_default();
        if !ROLES.contains(&role) {
            return Err(rejected(
                format!("{field}.role"),
                format!("{role:?}"),
                ROLES.join(", "),
                format!("{field} has role {role:?}; allowed: {}", ROLES.join(", ")),
            ));
        }
        match obj.get("content") {
            // Only an assistant turn that calls tools may come without content.
            None | Some(Value::Null) if role == "assistant" && obj.contains_key("tool_calls") => parts_total += 1,
            None | Some(Value::Null) => {
                return Err(rejected(
                    format!("{field}.content"),
                    "missing",
                    "a string or a list of parts",
                    format!("{field} has no content"),
                ));
            }
            Some(Value::String(s)) => {
                parts_total += 1;
                check_text(s, &format!("{field}.content"))?;
            }
            Some(Value::Array(parts)) => {
                // The template writes adjacent text parts with nothing between them, so
                // "a<|im_" then "end|>" would make a special token no part holds alone. Each
                // part is checked with the joined text's last bytes before it (as many as
                // a special token has, less one): linear in the text, not quadratic.
                let mut seam = String::new();
                for (j, p) in parts.iter().enumerate() {
                    let pf = format!("{field}.content[{j}]");
                    parts_total += 1;
                    match p.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            let t = p.get("text").and_then(Value::as_str).ok_or_else(|| {
                                rejected(
                                    &pf,
                                    p,
                                    "a string `text`",
                                    format!("{pf} is a text part without a string `text`"),
                                )
                            })?;
                            check_text(t, &pf)?;
                            let window = format!("{seam}{}", head(t, reach));
                            special_in(&window, &format!("{field}.content"))?;
                            seam = if t.len() >= reach {
                                tail(t, reach).to_string()
                            } else {
                                tail(&window, reach).to_string()
                            };
                        }
                        Some("image") => {
                            seam.clear();
                            if role != "user" {
                                return Err(rejected(
                                    &pf,
                                    role,
                                    "user messages",
                                    format!("{pf}: images may only appear in user messages, not {role}"),
                                ));
                            }
                            image_parts += 1;
                        }
                        other => {
                            return Err(rejected(
                                &pf,
                                format!("{other:?}"),
                                "\"text\" or \"image\"",
                                format!("{pf} has type {other:?}; expected \"text\" or \"image\""),
                            ));
                        }
                    }
                }
            }
            Some(other) => {
                return Err(rejected(
                    format!("{field}.content"),
                    other,
                    "a string or a list of parts",
                    format!("{field}.content must be a string or a list of parts"),
                ));
            }
        }
        // Other fields the chat template may render (tool calls' names and arguments, a
        // tool message's name or id) may no more carry special tokens than the text.
        for (key, value) in obj.iter().filter(|(k, _)| !matches!(k.as_str(), "role" | "content")) {
            let mut pending = vec![value];
            while let Some(v) = pending.pop() {
                match v {
                    Value::String(text) => check_text(text, &format!("{field}.{key}"))?,
                    Value::Array(items) => pending.extend(items),
                    Value::Object(map) => {
                        // Keys too: the template may render an arguments object as JSON.
                        for k in map.keys() {
                            check_text(k, &format!("{field}.{key}"))?;
                        }
                        pending.extend(map.values());
                    }
                    _ => {}
                }
            }
        }
        if parts_total > limits.max_content_parts {
            return Err(rejected(
                "content parts",
                parts_total,
                limits.max_content_parts,
                format!("over max_content_parts={}", limits.max_content_parts),
            ));
        }
    }
    Ok(MessageStats { image_parts })
}

/// At most the first `n` bytes of `s`, cut at a character boundary.
fn head(s: &str, n: usize) -> &str {
    let mut end = n.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// At most the last `n` bytes of `s`, cut at a character boundary.
fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn special_tokens_split_across_text_parts_or_in_keys_are_refused() {
        let specials = vec!["<|im_end|>".to_string()];
        let text = |t: &str| json!({"type": "text", "text": t});
        let split = json!([{"role": "user", "content": [text("a<|im_"), text("end|>b")]}]);
        let err = check_messages(&split, &Limits::default(), &specials).unwrap_err();
        assert!(err.to_string().contains("messages[0].content contains"), "{err}");
        // Across three parts, the middle one shorter than the token; and after a long part.
        let three = json!([{"role": "user", "content": [text("x<|im"), text("_e"), text("nd|>")]}]);
        assert!(check_messages(&three, &Limits::default(), &specials).is_err());
        let long = json!([{"role": "user", "content": [text(&format!("{}é<|im_", "a".repeat(5000))), text("end|>")]}]);
        assert!(check_messages(&long, &Limits::default(), &specials).is_err());
        let fine = json!([{"role": "user", "content": [text("é<|im_"), text("x"), text("end|>")]}]);
        assert!(check_messages(&fine, &Limits::default(), &specials).is_ok());
        // An image between the parts keeps them apart.
        let apart = json!([{"role": "user", "content": [text("a<|im_"), {"type": "image"}, text("end|>b")]}]);
        assert!(check_messages(&apart, &Limits::default(), &specials).is_ok());
        let key = json!([{"role": "assistant", "content": null, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": {"<|im_end|>": 1}}}
        ]}]);
        let err = check_messages(&key, &Limits::default(), &specials).unwrap_err();
        assert!(err.to_string().contains("messages[0].tool_calls"), "{err}");
    }

    #[test]
    fn special_tokens_in_tool_calls_are_refused() {
        let specials = vec!["<|im_end|>".to_string()];
        let call = json!([{"role": "assistant", "content": null, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": {"x": "a<|im_end|>b"}}}
        ]}]);
        let err = check_messages(&call, &Limits::default(), &specials).unwrap_err();
        assert!(err.to_string().contains("messages[0].tool_calls"), "{err}");
        let fine = json!([{"role": "assistant", "content": null, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
        ]}]);
        check_messages(&fine, &Limits::default(), &specials).unwrap();
    }

    fn check(m: Value) -> Result<MessageStats> {
        check_messages(&m, &Limits::default(), &["<|im_start|>".to_string()])
    }

    #[test]
    fn counts_image_parts() {
        let m = json!([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}, {"type": "image"}]}]);
        assert_eq!(check(m).unwrap().image_parts, 2);
    }

    #[test]
    fn rejects_bad_shapes() {
        for m in [
            json!([]),
            json!([{"role": "robot", "content": "x"}]),
            json!([{"role": "user", "content": "a <|im_start|> b"}]),
            json!([{"role": "assistant", "content": [{"type": "image"}]}]),
            json!([{"role": "user", "content": [{"type": "video"}]}]),
            json!({"role": "user"}),
        ] {
            assert!(matches!(check(m.clone()), Err(Error::RequestRejected { .. })), "{m}");
        }
    }
}

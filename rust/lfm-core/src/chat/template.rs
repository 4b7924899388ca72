//! Renders the model's Jinja chat template as transformers' `apply_chat_template` does:
//! trim_blocks and lstrip_blocks on, Python string methods, transformers' `tojson`,
//! `raise_exception` and `strftime_now`, and `{% generation %}` tags accepted as no-ops.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind, UndefinedBehavior};

use crate::error::{Error, Result};

use super::pyjson::{DumpOptions, dumps};
use super::strftime::Civil;

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bytes", &self.source.len()).finish()
    }
}

fn template_err(e: minijinja::Error) -> Error {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    Error::rejected("messages", "", "", format!("chat template failed: {msg}"))
}

/// Turns transformers' `{% generation %}` / `{% endgeneration %}` markers (used for
/// assistant-token masks) into an always-true `if`, keeping their whitespace control.
pub fn neutralise_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else { break };
        let tag = &rest[start..start + len + 2];
        let inner = tag[2..tag.len() - 2].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        let (open, close) = (
            &tag[..2 + usize::from(tag[2..].starts_with(['-', '+']))],
            &tag[tag.len() - 2 - usize::from(tag[..tag.len() - 2].ends_with(['-', '+']))..],
        );
        match inner {
            "generation" => out.push_str(&format!("{open} if true {close}")),
            "endgeneration" => out.push_str(&format!("{open} endif {close}")),
            _ => out.push_str(tag),
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let mut opts = DumpOptions::default();
    let indent: Option<Value> = indent.or(kwargs.get::<Option<Value>>("indent")?);
    if let Some(ind) = indent.filter(|v| !v.is_none()) {
        opts.indent = Some(match ind.as_i64() {
            Some(n) => " ".repeat(n.max(0) as usize),
            None => ind.to_string(),
        });
    }
    if let Some(a) = kwargs.get::<Option<bool>>("ensure_ascii")? {
        opts.ensure_ascii = a;
    }
    if let Some(s) = kwargs.get::<Option<bool>>("sort_keys")? {
        opts.sort_keys = s;
    }
    if let Some(seps) = kwargs.get::<Option<Vec<String>>>("separators")?
        && let [item, key] = seps.as_slice()
    {
        opts.item_sep = item.clone();
        opts.key_sep = key.clone();
    }
    kwargs.assert_all_used()?;
    Ok(Value::from(dumps(value, &opts)?))
}

impl ChatTemplate {
    /// Compiles a template source (with or without generation tags).
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::Internal(format!("template syntax: {e}")))?;
        env.set_syntax(syntax);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| Civil::now().format(&fmt));
        env.add_template_owned(TEMPLATE_NAME, neutralise_generation_tags(source))
            .map_err(|e| Error::Internal(format!("chat template does not compile: {e}")))?;
        Ok(ChatTemplate { env, source: source.to_string() })
    }

    /// The source this template was built from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (a JSON array of HF chat messages, images as `{"type": "image"}`).
    pub fn render(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        bos_token: &str,
    ) -> Result<String> {
        let tmpl = self.env.get_template(TEMPLATE_NAME).map_err(template_err)?;
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            tools => tools.map(|t| Value::from(minijinja::value::Serde(t))),
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
        };
        tmpl.render(ctx).map_err(template_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_become_noops() {
        let src = "a{%- generation -%} b {%- endgeneration -%}c{% generation %}d{% endgeneration %}";
        let t = ChatTemplate::new(src).unwrap();
        assert_eq!(t.render(&serde_json::json!([]), None, false, "").unwrap(), "abcd");
    }

    #[test]
    fn python_methods_and_json() {
        let t = ChatTemplate::new(
            "{{ messages[0].content.split('x')[-1] | trim }}|{{ messages | tojson }}|{{ {'a': 1}.items() | list | length }}",
        )
        .unwrap();
        let m = serde_json::json!([{"role": "user", "content": "1x 2 "}]);
        assert_eq!(t.render(&m, None, false, "").unwrap(), r#"2|[{"role": "user", "content": "1x 2 "}]|1"#);
    }
}

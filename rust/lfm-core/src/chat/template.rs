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

/// Work one render may do, in minijinja fuel (about one instruction, or 64 bytes made):
/// the bundled template spends roughly 250 per message, so this is thousands of messages,
/// while a runaway template (`range(10**5)` loops nested) stops within a fraction of a
/// second with an error instead of running for hours.
const RENDER_FUEL: u64 = 2_000_000;

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
        env.set_fuel(Some(RENDER_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| Civil::now().format(&fmt));
        env.add_template_owned(TEMPLATE_NAME, neutralise_generation_tags(source))
            .map_err(|e| Error::option("template", e, "a Jinja template that compiles"))?;
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
        let render = move || {
            let ctx = minijinja::context! {
                messages => Value::from(minijinja::value::Serde(messages)),
                tools => tools.map(|t| Value::from(minijinja::value::Serde(t))),
                add_generation_prompt => add_generation_prompt,
                bos_token => bos_token,
            };
            tmpl.render(ctx).map_err(template_err)
        };
        // A template can nest a list in itself once per loop turn (`{% set ns.v = [ns.v] %}`),
        // and printing, concatenating or dropping such a value recurses once per level
        // (~450 bytes; 20 000 levels overflow an 8 MiB stack). Fuel bounds the depth (at
        // least 4 fuel a level); `deep_stack` holds what it allows. The values the template
        // made are dropped there too.
        crate::deep_stack::run("lfm-chat-template", render)
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

    /// A value nested once per loop turn, 20 000 deep: printing it overflowed the stack
    /// (a segfault), and `tojson` too. Now it prints, `tojson` refuses it, and each
    /// render's work is bounded by fuel.
    #[test]
    fn deep_values_and_long_loops_end_cleanly() {
        let nest = "{% set ns = namespace(v=1) %}{% for i in range(20000) %}{% set ns.v = [ns.v] %}{% endfor %}";
        let m = serde_json::json!([{"role": "user", "content": "hi"}]);
        let render = |tail: &str| ChatTemplate::new(&format!("{nest}{tail}")).unwrap().render(&m, None, true, "");
        assert_eq!(render("{{ ns.v }}").unwrap().len(), 2 * 20000 + 1);
        assert_eq!(render("{{ ('x' ~ ns.v) | length }} {{ ns.v | string | length }}").unwrap(), "40002 40001");
        let err = render("{{ ns.v | tojson }}").unwrap_err().to_string();
        assert!(err.contains("nested more than"), "{err}");
        let spin = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        let err = ChatTemplate::new(spin).unwrap().render(&m, None, true, "").unwrap_err().to_string();
        assert!(err.contains("fuel"), "{err}");
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

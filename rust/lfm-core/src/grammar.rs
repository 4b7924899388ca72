//! Grammars (JSON Schema, Lark, regex) compiled by llguidance into token masks.

use std::sync::{Arc, OnceLock};

use llguidance::api::{StopReason, TopLevelGrammar};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use toktrie_hf_tokenizers::ByteTokenizer;

use crate::error::{Error, Result, catch_panic};

/// What output must look like.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// A JSON Schema; output is one JSON value that validates.
    JsonSchema(serde_json::Value),
    /// A Lark grammar (llguidance's dialect).
    Lark(String),
    /// A regular expression the whole output must match.
    Regex(String),
}

impl Grammar {
    pub fn kind(&self) -> &'static str {
        match self {
            Grammar::JsonSchema(_) => "json_schema",
            Grammar::Lark(_) => "lark",
            Grammar::Regex(_) => "regex",
        }
    }

    /// llguidance's form. JSON is compact (no free whitespace, which small models can
    /// loop on) unless the schema sets its own `x-guidance` options.
    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonSchema(schema) => TopLevelGrammar::from_json_schema(llguidance_schema(schema)),
            Grammar::Lark(src) => TopLevelGrammar::from_lark(src.clone()),
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
        }
    }

    /// Compiles the grammar against a byte-level vocabulary: every problem llguidance finds
    /// (syntax, unsupported JSON Schema keywords, unknown formats) is reported here,
    /// before any model work.
    pub fn check(&self) -> Result<()> {
        static BYTES: OnceLock<std::result::Result<ParserFactory, String>> = OnceLock::new();
        let factory = BYTES
            .get_or_init(|| {
                let env = toktrie::ApproximateTokEnv::single_byte_env();
                let mut f = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                f.set_stderr_log_level(0);
                Ok(f)
            })
            .as_ref()
            .map_err(|e| Error::Internal(format!("grammar checker: {e}")))?;
        let mut c = Constraint::new(factory, self)?;
        // A grammar whose language is empty would stall at the first token.
        let admits_something = c.matcher.compute_mask().map(|m| m.num_set() > 0).unwrap_or(false)
            || c.matcher.is_accepting().unwrap_or(false);
        if !admits_something {
            return Err(grammar_err(format!("the {} grammar admits no output at all", self.kind())));
        }
        Ok(())
    }
}

/// The schema with llguidance options: compact JSON (free whitespace lets small models
/// loop), and `oneOf` compiled as `anyOf` when every `oneOf` is provably exclusive (so
/// the two accept the same documents); options the schema sets itself are kept.
fn llguidance_schema(schema: &Value) -> Value {
    let mut out = schema.clone();
    let exclusive = one_ofs_exclusive(schema, schema, 0);
    if let Some(obj) = out.as_object_mut() {
        let xg = obj.entry("x-guidance").or_insert_with(|| Value::Object(Default::default()));
        if let Some(x) = xg.as_object_mut() {
            x.entry("whitespace_flexible").or_insert(Value::Bool(false));
            if exclusive {
                x.entry("coerce_one_of").or_insert(Value::Bool(true));
            }
        }
    }
    out
}

/// Follows a local `$ref` (`#/...`) to its target.
fn resolve<'a>(root: &'a Value, mut v: &'a Value) -> &'a Value {
    for _ in 0..16 {
        let Some(r) = v.get("$ref").and_then(Value::as_str) else { return v };
        match r.strip_prefix('#').and_then(|p| root.pointer(p)) {
            Some(t) => v = t,
            None => return v,
        }
    }
    v
}

/// The one value a schema allows, if it is a `const` or a one-element `enum`.
fn single_value(v: &Value) -> Option<&Value> {
    v.get("const").or_else(|| v.get("enum").and_then(Value::as_array).filter(|a| a.len() == 1).and_then(|a| a.first()))
}

/// Whether no document can match two branches of this `oneOf`.
fn branches_exclusive(root: &Value, branches: &[Value]) -> bool {
    let bs: Vec<&Value> = branches.iter().map(|b| resolve(root, b)).collect();
    let distinct = |vals: Vec<Option<&Value>>| -> bool {
        let vals: Option<Vec<&Value>> = vals.into_iter().collect();
        vals.is_some_and(|v| (0..v.len()).all(|i| (i + 1..v.len()).all(|j| v[i] != v[j])))
    };
    // Constants.
    if distinct(bs.iter().map(|b| single_value(b)).collect()) {
        return true;
    }
    // Distinct primitive types (integer and number overlap).
    let types: Vec<Option<&str>> = bs
        .iter()
        .map(|b| b.get("type").and_then(Value::as_str).map(|t| if t == "integer" { "number" } else { t }))
        .collect();
    if let Some(ts) = types.iter().copied().collect::<Option<Vec<&str>>>()
        && (0..ts.len()).all(|i| (i + 1..ts.len()).all(|j| ts[i] != ts[j]))
    {
        return true;
    }
    // A required discriminator property with a distinct constant in every branch.
    let Some(first) = bs.first().and_then(|b| b.get("properties")).and_then(Value::as_object) else { return false };
    first.keys().any(|key| {
        bs.iter().all(|b| b.get("required").and_then(Value::as_array).is_some_and(|r| r.iter().any(|x| x == key)))
            && distinct(
                bs.iter()
                    .map(|b| {
                        b.get("properties").and_then(|p| p.get(key)).map(|p| resolve(root, p)).and_then(single_value)
                    })
                    .collect(),
            )
    })
}

fn one_ofs_exclusive(root: &Value, v: &Value, depth: usize) -> bool {
    if depth > 64 {
        return false;
    }
    match v {
        Value::Object(o) => {
            if let Some(Value::Array(branches)) = o.get("oneOf")
                && !branches_exclusive(root, branches)
            {
                return false;
            }
            o.values().all(|c| one_ofs_exclusive(root, c, depth + 1))
        }
        Value::Array(a) => a.iter().all(|c| one_ofs_exclusive(root, c, depth + 1)),
        _ => true,
    }
}

/// The parser factory of one tokenizer; built once per engine, shared by its requests.
pub struct GrammarCompiler {
    factory: ParserFactory,
}

impl GrammarCompiler {
    /// `n_vocab` is the width of the model's logits; `eos` ends generation.
    pub fn new(tokenizer: &tokenizers::Tokenizer, n_vocab: usize, eos: u32) -> Result<Arc<Self>> {
        catch_panic("grammar compiler", || {
            // Text a grammar forces (a regex literal, a schema's const) is tokenized as text:
            // left special, "<image>" would become the special token the grammar then
            // refuses, failing the request mid-generation.
            let mut text_only = tokenizer.clone();
            text_only.set_encode_special_tokens(true);
            let mut bt = ByteTokenizer::from_tokenizer(text_only)
                .map_err(|e| Error::Internal(format!("grammar tokenizer: {e}")))?;
            bt.set_eos_token(eos);
            let env = bt.into_tok_env(Some(n_vocab)).map_err(|e| Error::Internal(format!("grammar tokenizer: {e}")))?;
            let mut factory =
                ParserFactory::new_simple(&env).map_err(|e| Error::Internal(format!("grammar compiler: {e}")))?;
            factory.set_stderr_log_level(0);
            Ok(Arc::new(GrammarCompiler { factory }))
        })
    }

    pub fn constraint(&self, grammar: &Grammar) -> Result<Constraint> {
        Constraint::new(&self.factory, grammar)
    }
}

/// One request's grammar state: masks the logits and follows the chosen tokens.
pub struct Constraint {
    matcher: Matcher,
    trie: toktrie::TokEnv,
}

fn grammar_err(e: impl std::fmt::Display) -> Error {
    Error::Grammar { detail: e.to_string() }
}

impl Constraint {
    fn new(factory: &ParserFactory, grammar: &Grammar) -> Result<Constraint> {
        // llguidance's compiler recurses once per level of nesting (`deep_stack`).
        let parser = crate::deep_stack::run("lfm-grammar", || {
            catch_panic("grammar compile", || Ok(factory.create_parser(grammar.top_level())))
        })?;
        let matcher = Matcher::new(parser);
        if let Some(e) = matcher.get_error() {
            return Err(grammar_err(format!("{} grammar rejected: {e}", grammar.kind())));
        }
        Ok(Constraint { matcher, trie: factory.tok_env().clone() })
    }

    /// llguidance builds its lexer as the masks need it, so some grammars pass every
    /// up-front check and hit its limits only mid-generation (a regex like `a{1000000}`:
    /// "too many expressions"): the grammar's fault, so a `GrammarError`.
    fn step_err(&self, e: impl std::fmt::Display) -> Error {
        grammar_err(format!("the grammar could not be followed: {e}"))
    }

    /// True once the grammar is complete (no further token can be added).
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// True when the grammar ended by completing, not by an error.
    pub fn completed(&self) -> bool {
        matches!(
            self.matcher.stop_reason(),
            StopReason::NoExtension | StopReason::NoExtensionBias | StopReason::EndOfSentence
        )
    }

    /// Sets every logit the grammar forbids to -inf; returns the allowed-token mask.
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<toktrie::SimpleVob> {
        let mask = self.matcher.compute_mask().map_err(|e| self.step_err(e))?;
        for (i, v) in logits.iter_mut().enumerate() {
            if !mask.is_allowed(i as u32) {
                *v = f32::NEG_INFINITY;
            }
        }
        Ok(mask)
    }

    /// Advances the grammar over the chosen token.
    pub fn commit(&mut self, id: u32) -> Result<()> {
        self.matcher.consume_token(id).map_err(|e| self.step_err(e))
    }

    /// Bytes of token `id` as the grammar sees them.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.trie.tok_trie().token(id).to_vec()
    }

    pub fn tok_env(&self) -> &toktrie::TokEnv {
        &self.trie
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_grammars_are_reported() {
        assert!(Grammar::Regex("[0-9]+".into()).check().is_ok());
        assert!(matches!(Grammar::Regex("(".into()).check(), Err(Error::Grammar { .. })));
        assert!(matches!(Grammar::Lark("start: undefined_rule".into()).check(), Err(Error::Grammar { .. })));
        // A standard keyword llguidance cannot enforce is refused, not ignored.
        let unsupported = serde_json::json!({"type": "array", "uniqueItems": true});
        let e = Grammar::JsonSchema(unsupported).check().unwrap_err().to_string();
        assert!(e.contains("uniqueItems"), "{e}");
        assert!(Grammar::JsonSchema(serde_json::json!({"type": "integer"})).check().is_ok());
        let empty = serde_json::json!({"type": "integer", "minimum": 5, "maximum": 3});
        assert!(matches!(Grammar::JsonSchema(empty).check(), Err(Error::Grammar { .. })));
    }

    #[test]
    fn exclusive_one_of_compiles_overlapping_one_of_is_refused() {
        let tagged = serde_json::json!({"oneOf": [
            {"type": "object", "properties": {"kind": {"const": "a"}, "x": {"type": "integer"}}, "required": ["kind"]},
            {"$ref": "#/$defs/b"}
        ], "$defs": {"b": {"type": "object", "properties": {"kind": {"const": "b"}}, "required": ["kind"]}}});
        assert!(Grammar::JsonSchema(tagged).check().is_ok());
        assert!(
            Grammar::JsonSchema(serde_json::json!({"oneOf": [{"type": "string"}, {"type": "integer"}]}))
                .check()
                .is_ok()
        );
        let overlapping = serde_json::json!({"oneOf": [{"type": "integer"}, {"type": "number"}]});
        assert!(matches!(Grammar::JsonSchema(overlapping).check(), Err(Error::Grammar { .. })));
    }
}

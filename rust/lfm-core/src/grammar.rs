//! Grammars (JSON Schema, Lark, regex) compiled by llguidance into token masks.

use std::sync::{Arc, OnceLock};

use llguidance::api::{StopReason, TopLevelGrammar};
use llguidance::{Matcher, ParserFactory};
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
            Grammar::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if let Some(obj) = schema.as_object_mut() {
                    obj.entry("x-guidance").or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
                }
                TopLevelGrammar::from_json_schema(schema)
            }
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
        Constraint::new(factory, self).map(|_| ())
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
            let mut bt = ByteTokenizer::from_tokenizer(tokenizer.clone())
                .map_err(|e| Error::Internal(format!("grammar tokenizer: {e}")))?;
            bt.set_eos_token(eos);
            let env = bt.into_tok_env(Some(n_vocab)).map_err(|e| Error::Internal(format!("grammar tokenizer: {e}")))?;
            let mut factory = ParserFactory::new_simple(&env).map_err(|e| Error::Internal(format!("grammar compiler: {e}")))?;
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
        let parser = catch_panic("grammar compile", || Ok(factory.create_parser(grammar.top_level())))?;
        let matcher = Matcher::new(parser);
        if let Some(e) = matcher.get_error() {
            return Err(grammar_err(format!("{} grammar rejected: {e}", grammar.kind())));
        }
        Ok(Constraint { matcher, trie: factory.tok_env().clone() })
    }

    fn step_err(&self, e: impl std::fmt::Display) -> Error {
        Error::inference("grammar", e)
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
    }
}

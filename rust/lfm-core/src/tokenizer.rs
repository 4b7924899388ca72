//! The text tokenizer and the special tokens the engine depends on, read from the loaded
//! `tokenizer.json` (never hard-coded ids).

use std::path::Path;

use crate::error::{Error, Result};
use crate::options::MAX_TILES_CAP;
use crate::preproc::placeholder::{IMAGE_END, IMAGE_START, IMAGE_THUMBNAIL, IMAGE_TOKEN, tile_marker};

/// Ids of the tokens that structure prompts and end generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos_token: String,
    pub eos_token: String,
    pub eos: u32,
    pub image: u32,
    pub image_start: u32,
    pub image_end: u32,
    pub thumbnail: u32,
}

/// A `tokenizers` tokenizer plus what the engine needs to know about it.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub special: SpecialTokens,
    /// Every added token flagged special, as text (for the user-text denylist).
    pub special_strings: Vec<String>,
    /// Ids at or above this are not tokens (the model's logits may be wider).
    pub vocab_size: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer").field("special", &self.special).field("vocab_size", &self.vocab_size).finish()
    }
}

fn token_string(config: Option<&serde_json::Value>, key: &str, default: &str) -> String {
    match config.and_then(|c| c.get(key)) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|v| v.as_str()).unwrap_or(default).to_string(),
        _ => default.to_string(),
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` bytes; `config` is `tokenizer_config.json` when there is one
    /// (it names the bos/eos tokens).
    pub fn from_bytes(path: &Path, bytes: &[u8], config: Option<&serde_json::Value>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| Error::model_load(path, format!("not a valid tokenizer.json: {e}")))?;
        let id = |tok: &str| {
            inner.token_to_id(tok).ok_or_else(|| {
                Error::model_load(path, format!("the tokenizer has no `{tok}` token, which LFM2-VL prompts need"))
            })
        };
        let bos_token = token_string(config, "bos_token", "<|startoftext|>");
        let eos_token = token_string(config, "eos_token", "<|im_end|>");
        id(&bos_token)?;
        for r in 1..=MAX_TILES_CAP {
            for c in 1..=MAX_TILES_CAP {
                id(&tile_marker(r, c))?;
            }
        }
        let special = SpecialTokens {
            eos: id(&eos_token)?,
            image: id(IMAGE_TOKEN)?,
            image_start: id(IMAGE_START)?,
            image_end: id(IMAGE_END)?,
            thumbnail: id(IMAGE_THUMBNAIL)?,
            bos_token,
            eos_token,
        };
        // User text may not contain any special token of this tokenizer, nor the prompt
        // structure's own markers (even where a tokenizer does not flag them special).
        let mut special_strings: Vec<String> =
            inner.get_added_tokens_decoder().values().filter(|t| t.special).map(|t| t.content.clone()).collect();
        special_strings.extend(
            [
                IMAGE_TOKEN,
                IMAGE_START,
                IMAGE_END,
                IMAGE_THUMBNAIL,
                special.bos_token.as_str(),
                special.eos_token.as_str(),
                "<|im_start|>",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        for r in 1..=MAX_TILES_CAP {
            for c in 1..=MAX_TILES_CAP {
                special_strings.push(tile_marker(r, c));
            }
        }
        special_strings.retain(|s| !s.is_empty());
        special_strings.sort();
        special_strings.dedup();
        let vocab_size = inner.get_vocab_size(true);
        Ok(TextTokenizer { inner, special, special_strings, vocab_size })
    }

    pub fn from_file(path: &Path, config: Option<&serde_json::Value>) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(path, &bytes, config)
    }

    /// Ids of `text` with no special tokens added (the chat template writes them).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(|e| Error::Internal(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::Internal(format!("tokenizer: {e}")))
    }

    /// The underlying tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

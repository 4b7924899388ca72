//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the corpus replay test
//! (`tests/fuzz_corpus.rs`): each takes arbitrary bytes and must return without panicking,
//! hanging or allocating without bound, whatever the bytes.

use crate::options::ImageBudget;
use crate::preproc::decode::{DecodeLimits, decode, probe};
use crate::preproc::pixels::{Padding, preprocess_padded};
use crate::preproc::{placeholder_text, plan};

/// Small caps so a fuzzer can't make one input take seconds.
const LIMITS: DecodeLimits = DecodeLimits { max_side: 2048, max_decoded_bytes: 8 * 1024 * 1024 };

/// Header probe, decode, tile plan under both presets, pixels and placeholders.
pub fn decode_preprocess(data: &[u8]) {
    if probe(data, &LIMITS).is_err() {
        return;
    }
    let Ok(img) = decode(data, &LIMITS) else { return };
    for budget in [ImageBudget::quality(), ImageBudget::fast(), ImageBudget::single_tile(64)] {
        if let Ok(grid) = plan(img.width, img.height, &budget) {
            assert_eq!(placeholder_text(&grid).matches("<image>").count(), grid.num_image_tokens());
            if grid.num_entries() <= 4 {
                let pre = preprocess_padded(&img, &grid, Padding::Tight).expect("planned images preprocess");
                assert_eq!(pre.num_entries, grid.num_entries());
            }
        }
    }
}

/// The bundled chat template on arbitrary JSON messages and tools.
#[cfg(feature = "inference")]
pub fn chat_template(data: &[u8]) {
    use std::sync::OnceLock;
    static TEMPLATE: OnceLock<crate::chat::ChatTemplate> = OnceLock::new();
    let template = TEMPLATE.get_or_init(|| {
        crate::chat::ChatTemplate::new(crate::files::bundled::CHAT_TEMPLATE_JINJA).expect("bundled template compiles")
    });
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let (messages, tools) = match &value {
        serde_json::Value::Object(o) => (o.get("messages").cloned().unwrap_or_default(), o.get("tools").cloned()),
        other => (other.clone(), None),
    };
    let _ = template.render(&messages, tools.as_ref(), true, "<|startoftext|>");
    let limits = crate::options::Limits::default();
    let _ = crate::admission::check_messages(&messages, &limits, &["<|im_start|>".to_string()]);
}

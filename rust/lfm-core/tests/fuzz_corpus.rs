//! Replays the committed fuzz corpora and every crash input (`fuzz/corpus/<target>/`,
//! `fuzz/artifacts/<target>/`) through the fuzz entry points as ordinary tests.

use std::path::PathBuf;

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "artifacts"] {
        if let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) {
            files.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()));
        }
    }
    files.sort();
    files
}

#[test]
fn decode_preprocess_corpus() {
    let files = inputs("decode_preprocess");
    assert!(!files.is_empty(), "no committed corpus for decode_preprocess");
    for f in files {
        lfm_core::fuzzing::decode_preprocess(&std::fs::read(&f).unwrap());
    }
}

#[test]
fn chat_template_corpus() {
    let files = inputs("chat_template");
    assert!(!files.is_empty(), "no committed corpus for chat_template");
    for f in files {
        lfm_core::fuzzing::chat_template(&std::fs::read(&f).unwrap());
    }
}

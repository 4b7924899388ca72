//! Token ids equal Python `tokenizers` on the same tokenizer.json
//! (tests/fixtures/golden/tokenize.json), and decoding skips special tokens alike.

mod common;

use lfm_core::tokenizer::TextTokenizer;

#[test]
fn ids_and_text_match_python_tokenizers() {
    let golden = common::golden("tokenize.json");
    let path = common::fixtures().join("models/tiny16/tokenizer.json");
    let tok = TextTokenizer::from_file(&path, None).unwrap();
    for case in golden["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(&want).unwrap(), case["decoded_skip_special"].as_str().unwrap(), "{text:?}");
    }
}

#[test]
fn special_tokens_are_read_from_the_tokenizer() {
    let path = common::fixtures().join("models/tiny6/tokenizer.json");
    let tok = TextTokenizer::from_file(&path, None).unwrap();
    assert_eq!(
        (tok.special.eos, tok.special.image, tok.special.image_start, tok.special.image_end),
        (7, 396, 498, 499)
    );
    assert!(tok.special_strings.iter().any(|s| s == "<|im_start|>"));
    assert_eq!(tok.vocab_size, 896);
}

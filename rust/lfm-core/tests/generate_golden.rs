//! Greedy decoding on the tiny models equals transformers' `generate()` (goldens from
//! scripts/make_fixtures.py). Needs ONNX Runtime (ORT_DYLIB_PATH); skipped without it.

mod common;

use lfm_core::engine::Engine;
use lfm_core::files::ModelFiles;
use lfm_core::options::{EngineOptions, RequestOptions};
use lfm_core::preproc::RgbImage;
use lfm_core::request::{Cancel, ImageSource};

fn images(case: &serde_json::Value) -> Vec<ImageSource> {
    case["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let (w, h) = (i["width"].as_u64().unwrap() as u32, i["height"].as_u64().unwrap() as u32);
            ImageSource::Pixels(RgbImage::new(w, h, common::grad(w, h)).unwrap())
        })
        .collect()
}

fn check_model(name: &str) {
    check_model_against(name, name);
}

/// `name`'s graphs against the goldens of `golden_of` (the same weights).
fn check_model_against(name: &str, golden_of: &str) {
    if !common::ort_available() {
        return;
    }
    let golden = common::golden(&format!("generate_{golden_of}.json"));
    let dir = common::fixtures().join("models").join(name);
    let budgets = &golden["budgets"];
    for case in golden["cases"].as_array().unwrap() {
        let budget = serde_json::from_value(budgets[case["budget"].as_str().unwrap()].clone()).unwrap();
        let opts = EngineOptions { image_budget: budget, intra_threads: Some(1), ..Default::default() };
        let files = ModelFiles::from_dir(&dir, &opts.variant).unwrap();
        let engine = Engine::load(&files, opts).unwrap();
        let cname = case["name"].as_str().unwrap();
        let messages = &case["messages"];

        let ids = engine.encode_prompt(messages, images(case)).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        assert_eq!(ids, want, "{name}/{cname}: prompt ids");

        let logits = engine.next_token_logits(messages, images(case)).unwrap();
        let want: Vec<f32> = serde_json::from_value(case["first_logits"].clone()).unwrap();
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = logits.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert_eq!(logits.len(), want.len());
        assert!(diff <= 1e-4 * scale, "{name}/{cname}: first logits differ by {diff}");

        for (penalty, key) in [(1.0, "new_ids"), (1.05, "new_ids_rep_penalty_1_05"), (1.5, "new_ids_rep_penalty_1_5")] {
            let req = RequestOptions { max_new_tokens: 24, repetition_penalty: penalty, ..Default::default() };
            let g = engine.generate(messages, images(case), &req, None, &Cancel::new(), None).unwrap();
            let want: Vec<u32> = serde_json::from_value(case[key].clone()).unwrap();
            assert_eq!(g.token_ids, want, "{name}/{cname}: {key}");
        }
    }
}

#[test]
fn tiny16_matches_transformers() {
    check_model("tiny16");
}

#[test]
fn tiny6_matches_transformers() {
    check_model("tiny6");
}

#[test]
fn tiny16_gqa_matches_transformers() {
    // tiny16's weights, attention through GroupQueryAttention as in the official export.
    check_model_against("tiny16-gqa", "tiny16");
}

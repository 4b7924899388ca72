//! A request cancelled while its images are encoded or its prompt is prefilled stops
//! there (before the next image, before the next prompt chunk), with what it processed
//! so far, rather than after its whole prompt. Needs ONNX Runtime (ORT_DYLIB_PATH).

mod common;

use std::cell::Cell;

use lfm_core::engine::Engine;
use lfm_core::files::ModelFiles;
use lfm_core::options::{EngineOptions, RequestOptions};
use lfm_core::preproc::RgbImage;
use lfm_core::request::{Cancel, FinishReason, ImageSource};

fn engine() -> Engine {
    let dir = common::fixtures().join("models").join("tiny16-gqa");
    let opts = EngineOptions { intra_threads: Some(1), ..Default::default() };
    Engine::load(&ModelFiles::from_dir(&dir, &opts.variant).unwrap(), opts).unwrap()
}

#[test]
fn cancelled_before_its_images_are_encoded() {
    if !common::ort_available() {
        return;
    }
    let engine = engine();
    let messages =
        serde_json::json!([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]);
    let image = ImageSource::Pixels(RgbImage::new(640, 480, common::grad(640, 480)).unwrap());
    let cancel = Cancel::new();
    cancel.cancel();
    let g = engine.generate(&messages, vec![image], &RequestOptions::default(), None, &cancel, None).unwrap();
    assert_eq!(g.finish_reason, FinishReason::Cancelled);
    assert!(g.token_ids.is_empty() && g.text.is_empty());
    // The prompt was planned (its tokens counted) but no image reached the vision encoder.
    assert!(g.usage.image_tokens > 0 && g.usage.prompt_tokens > g.usage.image_tokens);
    assert_eq!(g.timings.vision_s, 0.0);
}

#[test]
fn a_long_prompt_stops_between_chunks() {
    if !common::ort_available() {
        return;
    }
    let engine = engine();
    let model = engine.model();
    // Three chunks of at most 512 positions.
    let ids: Vec<u32> = (0..1300u32).map(|i| (i * 7 + 1) % 1000).collect();
    let asked = Cell::new(0);
    let stop = || {
        asked.set(asked.get() + 1);
        asked.get() > 2
    };
    let mut cache = model.new_cache().unwrap();
    assert!(model.prefill_until(model.embed(&ids).unwrap(), &mut cache, &stop).unwrap().is_none());
    // Asked before the prompt and before chunks 2 and 3; stopped before the third.
    assert_eq!(asked.get(), 3);
    let mut cache = model.new_cache().unwrap();
    assert!(model.prefill_until(model.embed(&ids).unwrap(), &mut cache, &|| false).unwrap().is_some());
}

//! A request cancelled while its images are encoded or its prompt is prefilled stops
//! there (before the next image, before the next prompt chunk), with what it processed
//! so far, rather than after its whole prompt. Needs ONNX Runtime (ORT_DYLIB_PATH).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use lfm_core::engine::Engine;
use lfm_core::files::ModelFiles;
use lfm_core::options::{EngineOptions, RequestOptions};
use lfm_core::preproc::RgbImage;
use lfm_core::request::{Cancel, FinishReason, ImageSource};

fn engine() -> Engine {
    engine_of("tiny16-gqa")
}

fn engine_of(model: &str) -> Engine {
    let dir = common::fixtures().join("models").join(model);
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
    let asked = AtomicUsize::new(0);
    let stop = || asked.fetch_add(1, Ordering::Relaxed) + 1 > 2;
    let mut cache = model.new_cache().unwrap();
    assert!(model.prefill_until(model.embed(&ids).unwrap(), &mut cache, &stop).unwrap().is_none());
    // Asked before the prompt and before chunks 2 and 3; stopped before the third.
    assert_eq!(asked.load(Ordering::Relaxed), 3);
    let mut cache = model.new_cache().unwrap();
    assert!(model.prefill_until(model.embed(&ids).unwrap(), &mut cache, &|| false).unwrap().is_some());
}

#[test]
fn a_prompt_in_one_run_stops_within_the_run() {
    if !common::ort_available() {
        return;
    }
    // tiny16 places positions by the cache width, so its prompts go in one decoder run;
    // ONNX Runtime's terminate flag stops that run once the request is cancelled.
    let engine = engine_of("tiny16");
    let text = "word ".repeat(1500);
    let messages = serde_json::json!([{"role": "user", "content": text}]);
    let opts = RequestOptions { max_new_tokens: 2, ..Default::default() };
    let whole = Instant::now();
    engine.generate(&messages, vec![], &opts, None, &Cancel::new(), None).unwrap();
    let whole = whole.elapsed();
    let cancel = Cancel::new();
    let started = Instant::now();
    let g = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(whole / 10);
            cancel.cancel();
        });
        engine.generate(&messages, vec![], &opts, None, &cancel, None).unwrap()
    });
    assert_eq!(g.finish_reason, FinishReason::Cancelled);
    let took = started.elapsed();
    assert!(took < whole / 2, "cancelled after {took:?} of a {whole:?} request");
    // The engine runs the next request as before (the terminate flag was cleared).
    let short = serde_json::json!([{"role": "user", "content": "Hi"}]);
    let again = engine.generate(&short, vec![], &opts, None, &Cancel::new(), None).unwrap();
    assert_eq!(again.finish_reason, FinishReason::Length);
}

#[test]
fn a_panic_inside_a_stoppable_run_unwinds_instead_of_hanging() {
    if !common::ort_available() {
        return;
    }
    // The watcher thread must end when the work unwinds, or the scope joining it waits
    // forever (the scheduler's panic guard would never see the panic).
    let caught = std::panic::catch_unwind(|| lfm_core::runtime::graph::until::<()>(&|| false, || panic!("deliberate")));
    assert!(caught.is_err());
    // And the thread's runs are back on plain options: a later stoppable call works.
    assert_eq!(lfm_core::runtime::graph::until(&|| false, || Ok(Some(7))).unwrap(), Some(7));
}

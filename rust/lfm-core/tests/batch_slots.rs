//! Batched decoding through slots: sequences that join a batch with a free slot, and
//! slots reused after a longer sequence left, give the logits of the same sequences
//! decoded alone (tiny16-gqa: GroupQueryAttention updating the cache in place).

mod common;

use lfm_core::engine::Engine;
use lfm_core::files::ModelFiles;
use lfm_core::options::EngineOptions;
use lfm_core::runtime::{HybridCache, Model};

/// A prompt of `len` token ids, prefilled into a fresh cache (twice: one for the batch,
/// one to decode alone).
fn prefilled(model: &Model, len: usize, seed: u32) -> (HybridCache, HybridCache, Vec<f32>) {
    let vocab = model.spec.vocab as u32;
    let ids: Vec<u32> = (0..len as u32).map(|i| (i * 37 + seed * 101) % (vocab - 600) + 1).collect();
    let mut a = model.new_cache().unwrap();
    let mut b = model.new_cache().unwrap();
    let logits = model.prefill(model.embed(&ids).unwrap(), &mut a).unwrap();
    model.prefill(model.embed(&ids).unwrap(), &mut b).unwrap();
    (a, b, logits)
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().fold((0, f32::MIN), |m, (i, &x)| if x > m.1 { (i, x) } else { m }).0 as u32
}

/// One batched step against each row's own step: the relative logits difference.
fn step_and_compare(
    model: &Model,
    batch: &mut lfm_core::runtime::BatchCache,
    alone: &mut [HybridCache],
    last: &mut [Vec<f32>],
) {
    let next: Vec<u32> = last.iter().map(|l| argmax(l)).collect();
    let rows = model.decode_batch(model.embed(&next).unwrap(), batch).unwrap();
    for (r, row) in rows.iter().enumerate() {
        let own = model.decode(model.embed(&next[r..r + 1]).unwrap(), 1, &mut alone[r]).unwrap();
        let scale = own.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = own.iter().zip(row).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-4 * scale, "row {r}: logits differ by {diff}");
        last[r] = own;
    }
}

#[test]
fn joins_through_free_slots_and_reuses_them() {
    if !common::ort_available() {
        return;
    }
    let dir = common::fixtures().join("models").join("tiny16-gqa");
    let opts = EngineOptions { intra_threads: Some(1), ..Default::default() };
    let engine = Engine::load(&ModelFiles::from_dir(&dir, &opts.variant).unwrap(), opts).unwrap();
    let model = engine.model();
    assert!(model.spec.kv_in_place);

    let mut batch = model.batch_new();
    let mut alone = Vec::new();
    let mut last = Vec::new();
    // Three rows: slots 0..3 of 4 (capacity grows 1, 2, 4 by rebuilding).
    for (len, seed) in [(40, 1), (90, 2), (12, 3)] {
        let (a, b, l) = prefilled(model, len, seed);
        model.batch_join(&mut batch, a).unwrap();
        alone.push(b);
        last.push(l);
    }
    assert_eq!(batch.capacity(), 4);
    let width = batch.width();
    for _ in 0..3 {
        step_and_compare(model, &mut batch, &mut alone, &mut last);
    }
    // A fourth row joins the free slot: nothing is rebuilt.
    let (a, b, l) = prefilled(model, 25, 4);
    model.batch_join(&mut batch, a).unwrap();
    alone.push(b);
    last.push(l);
    assert_eq!((batch.capacity(), batch.width()), (4, width));
    step_and_compare(model, &mut batch, &mut alone, &mut last);
    // The longest row leaves; a short one takes its slot over the stale positions.
    model.batch_remove(&mut batch, &[1]).unwrap();
    alone.remove(1);
    last.remove(1);
    let (a, b, l) = prefilled(model, 7, 5);
    model.batch_join(&mut batch, a).unwrap();
    alone.push(b);
    last.push(l);
    assert_eq!((batch.capacity(), batch.width()), (4, width));
    for _ in 0..4 {
        step_and_compare(model, &mut batch, &mut alone, &mut last);
    }
    // Down to one row of four slots: the batch is rebuilt to fit.
    model.batch_remove(&mut batch, &[0, 1, 2]).unwrap();
    alone.drain(0..3);
    last.drain(0..3);
    assert_eq!(batch.capacity(), 1);
    step_and_compare(model, &mut batch, &mut alone, &mut last);
}

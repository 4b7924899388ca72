//! `Sampler::process` against transformers' logits processors
//! (tests/fixtures/golden/sampling.json, from scripts/make_sampling_goldens.py).
//!
//! Each case: the prompt goes to `Sampler::new`, the generated ids to `observe`, and the row
//! through `process`; the `-inf` positions must equal transformers' and the finite values must
//! agree within 1e-5 absolute or 1e-6 relative, whichever is looser.
//!
//! One case (`tie_order_dependent`, an all-equal row under top-p) has tied logits straddling
//! the top-p cut, where transformers' result depends on torch.sort's unspecified (unstable)
//! tie order. There lfm must keep exactly as many tokens as transformers, and match exactly
//! `expected_stable_sort` (the same processors with torch.sort(stable=True), ties in index
//! order, which is what lfm's stable sort does).

mod common;

use lfm_core::options::RequestOptions;
use lfm_core::sampling::Sampler;
use serde_json::Value;

/// A float32 value; the golden writes `-inf` as the string "-inf" (or null).
fn f(v: &Value) -> f32 {
    match v {
        Value::String(s) if s == "-inf" => f32::NEG_INFINITY,
        Value::Null => f32::NEG_INFINITY,
        Value::Number(n) => n.as_f64().unwrap() as f32,
        other => panic!("not a float: {other}"),
    }
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(f).collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn process_matches_transformers() {
    let golden = common::golden("sampling.json");
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let flagged = cases.iter().filter(|c| c.get("tie_order_dependent").is_some()).count();
    assert!(flagged <= 1, "{flagged} tie-order-dependent cases");
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let o = &case["options"];
        let opts = RequestOptions {
            temperature: o["temperature"].as_f64().unwrap() as f32,
            top_k: o["top_k"].as_u64().unwrap() as usize,
            top_p: o["top_p"].as_f64().unwrap() as f32,
            min_p: o["min_p"].as_f64().unwrap() as f32,
            repetition_penalty: o["repetition_penalty"].as_f64().unwrap() as f32,
            min_new_tokens: o["min_new_tokens"].as_u64().unwrap() as usize,
            ..Default::default()
        };
        opts.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(opts.is_greedy(), !case["do_sample"].as_bool().unwrap(), "{name}");
        let input_ids = ids(&case["input_ids"]);
        let prompt_len = case["prompt_len"].as_u64().unwrap() as usize;
        let eos = case["eos"].as_u64().unwrap() as u32;
        let mut row = floats(&case["logits"]);
        let tie_order_dependent = case.get("tie_order_dependent").and_then(Value::as_bool).unwrap_or(false);
        let mut expected = floats(&case["expected"]);
        if tie_order_dependent {
            let stable = floats(&case["expected_stable_sort"]);
            let n_inf = |v: &[f32]| v.iter().filter(|x| **x == f32::NEG_INFINITY).count();
            assert_eq!(n_inf(&stable), n_inf(&expected), "{name}");
            expected = stable;
        }
        assert_eq!(row.len(), expected.len(), "{name}");

        let mut sampler = Sampler::new(&opts, 0, eos, &input_ids[..prompt_len], row.len());
        for &id in &input_ids[prompt_len..] {
            sampler.observe(id);
        }
        sampler.process(&mut row, input_ids.len() - prompt_len);

        let got_inf: Vec<usize> = (0..row.len()).filter(|&i| row[i] == f32::NEG_INFINITY).collect();
        let want_inf: Vec<usize> = (0..row.len()).filter(|&i| expected[i] == f32::NEG_INFINITY).collect();
        if got_inf != want_inf {
            failures.push(format!("{name}: -inf at {got_inf:?}, transformers {want_inf:?}"));
            continue;
        }
        for (i, (&g, &w)) in row.iter().zip(&expected).enumerate() {
            if w == f32::NEG_INFINITY {
                continue;
            }
            let tol = 1e-5f32.max(1e-6 * w.abs());
            if !(g.is_finite() && (g - w).abs() <= tol) {
                failures.push(format!("{name}: id {i}: {g} vs transformers {w}"));
            }
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

//! The decoder's position-wise tail, run for the last position only.
//!
//! The engine uses only the last position's logits of a prompt. The exported decoder ends
//! in operators that compute each position from that position alone: the LM head (~18% of
//! the real model's decoder weights), the final norm, the last layer's feed-forward block
//! and, where that layer is a convolution, its output projection (~5% of the rest). At
//! load, a `Slice` of the last position goes in front of that tail, so a prompt's other
//! positions skip it. The caches come out of operators before the tail and do not change;
//! the last position's logits come from the same operators on the same values (a matrix
//! kernel may sum one row in another order than many:
//! `tests/test_generate.py::test_graph_rewrites_change_nothing` allows 1e-5 and measures 0
//! on the tiny models; the real-size decoder gave identical logits and caches for a
//! 1,800-position prompt).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::error::Result;

use super::graph_view::{View, message};
use super::onnx_proto::{
    GRAPH_INITIALIZER, GRAPH_NODE, GRAPH_OUTPUT, GRAPH_VALUE_INFO, ModelParts, NODE_INPUT, NODE_OUTPUT, int64_tensor,
    node, one_position_value_info, put_bytes, strings,
};

const CONTRIB: &str = "com.microsoft";
const SLICE_STARTS: &str = "lfm_slice_starts";
const SLICE_ENDS: &str = "lfm_slice_ends";
const SLICE_AXES: &str = "lfm_slice_axes";

/// The rewritten decoder (weights referenced in place from `path`) and how many of its
/// operators now see only the last position, or `None` when no matrix product by a
/// constant weight leads to `logits` through position-wise operators alone (the q8
/// exports' heads quantize their input with one scale for all positions, for example).
///
/// Assumes what the exported decoders have: the values entering the tail are
/// `[batch, positions, ...]`, like `logits`.
pub fn slice_to_last_position(path: &Path) -> Result<Option<(Vec<u8>, usize)>> {
    let Some(mut parts) = ModelParts::read(path)? else { return Ok(None) };
    let view = View::new(&parts);
    let constants = constants(&view);
    let Some(&head) = view.producer.get("logits") else { return Ok(None) };
    // Nothing inside the graph may read the full-length logits.
    if !position_wise(&view, head, &constants) || view.consumers.contains_key("logits") {
        return Ok(None);
    }
    let tail = tail_from(&view, head, &constants);

    // Worth a rewrite only with a weight product in the tail (an int8 head quantizes its
    // input with scales of every position, which stops the tail before the product).
    if !tail.iter().any(|&n| view.nodes[n].op.starts_with("MatMul")) {
        return Ok(None);
    }

    // The values entering the tail from outside it are sliced; the tail's own values renamed.
    let mut ordered: Vec<usize> = tail.iter().copied().collect();
    ordered.sort_unstable();
    let mut entering: Vec<&String> = Vec::new();
    for &n in &ordered {
        for i in &view.nodes[n].inputs {
            let inside = view.producer.get(i).is_some_and(|p| tail.contains(p));
            if !i.is_empty() && !inside && !constants.contains(i) && !entering.contains(&i) {
                entering.push(i);
            }
        }
    }
    let renamed = |v: &str| format!("{v}/lfm_last_position");
    let mut new_names: HashMap<&str, String> = entering.iter().map(|v| (v.as_str(), renamed(v))).collect();
    for &n in &ordered {
        for o in view.nodes[n].outputs.iter().filter(|o| o.as_str() != "logits") {
            new_names.insert(o, renamed(o));
        }
    }

    let slice_of = |v: &str| {
        let slice = node("Slice", &[v, SLICE_STARTS, SLICE_ENDS, SLICE_AXES], &[&new_names[v]], &renamed(v));
        let mut enc = Vec::new();
        put_bytes(&mut enc, GRAPH_NODE, &slice);
        (GRAPH_NODE, enc)
    };
    let tail_fields: HashSet<usize> = ordered.iter().map(|&n| view.nodes[n].field).collect();
    let node_at: HashMap<usize, usize> = view.nodes.iter().enumerate().map(|(i, n)| (n.field, i)).collect();
    let old = std::mem::take(&mut parts.graph);
    let mut graph_inputs_sliced = false;
    for (field, (number, enc)) in old.into_iter().enumerate() {
        // Slices of graph inputs go before the first node.
        if number == GRAPH_NODE && !graph_inputs_sliced {
            graph_inputs_sliced = true;
            for v in entering.iter().filter(|v| !view.producer.contains_key(v.as_str())) {
                parts.graph.push(slice_of(v));
            }
        }
        if tail_fields.contains(&field) {
            parts.graph.push((GRAPH_NODE, renamed_node(&enc, &new_names)));
            continue;
        }
        if number == GRAPH_VALUE_INFO
            && let Some(vi) = message(&enc)
            && strings(&vi, 1).first().is_some_and(|name| new_names.contains_key(name.as_str()))
        {
            continue; // a shape declared for a value that is now one position long
        }
        parts.graph.push((number, enc));
        // A value entering the tail is sliced right after the node that makes it.
        if let Some(&n) = node_at.get(&field) {
            for v in view.nodes[n].outputs.iter().filter(|v| entering.contains(v)) {
                parts.graph.push(slice_of(v));
            }
        }
    }
    for (name, v) in [(SLICE_STARTS, -1i64), (SLICE_ENDS, i64::MAX), (SLICE_AXES, 1)] {
        let mut e = Vec::new();
        put_bytes(&mut e, GRAPH_INITIALIZER, &int64_tensor(name, &[v]));
        parts.graph.push((GRAPH_INITIALIZER, e));
    }

    // Declare the new logits shape: one position.
    for (number, enc) in parts.graph.iter_mut() {
        if *number != GRAPH_OUTPUT {
            continue;
        }
        let Some(vi) = message(enc) else {
            continue;
        };
        if strings(&vi, 1).first().map(String::as_str) != Some("logits") {
            continue;
        }
        let Some(rewritten) = one_position_value_info(&vi) else { return Ok(None) };
        let mut e = Vec::new();
        put_bytes(&mut e, GRAPH_OUTPUT, &rewritten);
        *enc = e;
    }
    Ok(Some((parts.encode(), ordered.len())))
}

/// The position-wise operators that feed only `head`, directly or through each other,
/// `head` included: grown backwards, a producer joins when everything reading its outputs
/// is already in the tail (otherwise the full-length value is needed elsewhere).
fn tail_from(view: &View, head: usize, constants: &HashSet<String>) -> HashSet<usize> {
    let mut tail = HashSet::from([head]);
    loop {
        let joining: Vec<usize> = tail
            .iter()
            .flat_map(|&n| &view.nodes[n].inputs)
            .filter_map(|i| view.producer.get(i).copied())
            .filter(|p| !tail.contains(p) && position_wise(view, *p, constants))
            .filter(|&p| {
                view.nodes[p].outputs.iter().all(|o| {
                    !view.graph_outputs.contains(o)
                        && view.consumers.get(o).is_none_or(|c| c.iter().all(|r| tail.contains(r)))
                })
            })
            .collect();
        if joining.is_empty() {
            return tail;
        }
        tail.extend(joining);
    }
}

/// Values known without running the graph: initializers, `Constant` outputs, and outputs
/// of operators whose inputs are all constant (the exporter's `Identity` of a weight).
fn constants(view: &View) -> HashSet<String> {
    // An initializer that is also a graph input is a default the caller may override.
    let mut known: HashSet<String> =
        view.initializers.keys().filter(|k| !view.input_types.contains_key(*k)).cloned().collect();
    loop {
        let before = known.len();
        for n in &view.nodes {
            let from_constants = n.is("Constant")
                || (!n.inputs.is_empty() && n.inputs.iter().all(|i| i.is_empty() || known.contains(i)));
            if from_constants {
                known.extend(n.outputs.iter().cloned());
            }
        }
        if known.len() == before {
            return known;
        }
    }
}

/// True when node `n` computes each position of its output from the same position of its
/// non-constant inputs alone.
fn position_wise(view: &View, n: usize, constants: &HashSet<String>) -> bool {
    let node = &view.nodes[n];
    let constant = |k: usize| node.inputs.get(k).is_some_and(|i| constants.contains(i));
    let last_axis = |axes: Option<Vec<i64>>| axes.as_deref() == Some(&[-1]);
    match (node.domain.as_str(), node.op.as_str()) {
        (
            "",
            "Cast" | "Identity" | "Sigmoid" | "Sqrt" | "Neg" | "Reciprocal" | "Tanh" | "Erf" | "Relu" | "Exp" | "Abs"
            | "Softplus" | "Add" | "Sub" | "Mul" | "Div" | "Pow",
        ) => true,
        (CONTRIB, "QuickGelu" | "FastGelu" | "Gelu" | "BiasGelu") => (1..node.inputs.len()).all(constant),
        // A product by a constant weight: each row of the input gives one row of the output.
        ("", "MatMul") => constant(1),
        (CONTRIB, "MatMulNBits") => (1..node.inputs.len()).all(constant),
        ("", "ReduceMean") => match node.inputs.get(1) {
            Some(axes) => last_axis(view.consts.get(axes).map(|v| v.iter().map(|&x| x as i64).collect())),
            None => last_axis(node.ints_attr("axes")),
        },
        ("", "LayerNormalization" | "SimplifiedLayerNormalization") => {
            matches!(node.int_attr("axis"), None | Some(-1)) && (1..node.inputs.len()).all(constant)
        }
        _ => false,
    }
}

/// Graph node field `enc` with its inputs and outputs renamed by `names`.
fn renamed_node(enc: &[u8], names: &HashMap<&str, String>) -> Vec<u8> {
    let fields = message(enc);
    let mut out = Vec::new();
    for f in fields.unwrap_or_default() {
        let value = String::from_utf8_lossy(&f.payload);
        match names.get(value.as_ref()) {
            Some(new) if f.number == NODE_INPUT || f.number == NODE_OUTPUT => {
                put_bytes(&mut out, f.number, new.as_bytes())
            }
            _ => out.extend_from_slice(&f.encoded),
        }
    }
    let mut field = Vec::new();
    put_bytes(&mut field, GRAPH_NODE, &out);
    field
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
    }

    #[test]
    fn moves_the_last_layers_tail_behind_the_slice() {
        for m in ["tiny16", "tiny6", "tiny16-gqa"] {
            let path = models().join(m).join("onnx/decoder_model_merged.onnx");
            let (bytes, moved) = slice_to_last_position(&path).unwrap().unwrap();
            // The LM head, the final norm (7 operators as exported), and the last layer's
            // feed-forward with its norm and residual sum at least.
            assert!(moved > 20, "{m}: {moved} operators");
            // Mostly graph structure: the initializers' bytes stay in the original file.
            let size = std::fs::metadata(&path).unwrap().len() as usize;
            assert!(bytes.len() < size / 5, "{m}: {} of {size} bytes", bytes.len());
        }
    }

    #[test]
    fn leaves_graphs_without_a_weight_product_head() {
        assert!(slice_to_last_position(&models().join("tiny16/onnx/embed_tokens.onnx")).unwrap().is_none());
        assert!(slice_to_last_position(&models().join("tiny16/onnx/vision_encoder.onnx")).unwrap().is_none());
    }
}

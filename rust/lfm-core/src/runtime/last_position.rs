//! The decoder's position-wise tail, run for the last position only, and what feeds only
//! a last convolution layer, run for the few positions it reads.
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
//!
//! A last convolution layer (LFM2's short causal convolution) reads, for its last output
//! and its new state, only the last few positions of its input (the state's width, 3).
//! The position-wise operators that feed only that layer and the tail (the attention
//! layer before it: output projection, feed-forward block, norms, sums; the layer's own
//! input projection: ~7% of a position's weight products) run on those positions, and
//! their results are padded back with zeros to full length where the convolution block
//! reads them, so the block itself is left as exported. Its receptive field is assumed
//! here and checked by the engine at load (`Model::check_prefill_window`): a prompt run
//! once against the same prompt in pieces no longer than the window.

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
const WINDOW_STARTS: &str = "lfm_window_starts";
const WINDOW_PADS: &str = "lfm_window/pads";
const PAD_POSITIONS: &str = "lfm_window_pad_positions";

/// A rewritten decoder (weights referenced in place from the source file).
pub struct Rewrite {
    pub bytes: Vec<u8>,
    /// Operators that now see only the last position.
    pub tail_ops: usize,
    /// Operators that now see only the window of last positions (0 without one).
    pub window_ops: usize,
}

/// The rewritten decoder, or `None` when no matrix product by a constant weight leads to
/// `logits` through position-wise operators alone (the q8 exports' heads quantize their
/// input with one scale for all positions, for example).
///
/// With `window`, the position-wise operators that feed only the last layer's convolution
/// block (and the tail) run on the last `width` positions, where `width` is the widest
/// convolution state the block reads; their results are padded back to full length with
/// zeros before the block. This rests on the block reading only that many trailing
/// positions for its last output and its new state, which the engine checks once the
/// graph is loaded (`Model::check_prefill_window`), as nothing here proves it.
///
/// Assumes what the exported decoders have: the values entering the tail and the window
/// are `[batch, positions, ...]`, like `logits`.
pub fn slice_to_last_position(path: &Path, window: bool) -> Result<Option<Rewrite>> {
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
    let window = if window { Window::find(&view, &tail, &constants) } else { None };
    let in_window = |n: &usize| window.as_ref().is_some_and(|w| w.nodes.contains(n));
    let windowed = |v: &str| format!("{v}/lfm_window");
    let made_in_window = |v: &str| view.producer.get(v).is_some_and(in_window);

    // The values entering the tail from outside it are sliced; the tail's own values renamed.
    let ordered = sorted(&tail);
    let entering = entering_values(&view, &ordered, &constants);
    let renamed = |v: &str| format!("{v}/lfm_last_position");
    let mut new_names: HashMap<&str, String> = entering.iter().map(|v| (v.as_str(), renamed(v))).collect();
    for &n in &ordered {
        for o in view.nodes[n].outputs.iter().filter(|o| o.as_str() != "logits") {
            new_names.insert(o, renamed(o));
        }
    }
    // A value the window makes is sliced from its short version.
    let slice_of = |v: &str| {
        let source = if made_in_window(v) { windowed(v) } else { v.to_string() };
        let slice = node("Slice", &[&source, SLICE_STARTS, SLICE_ENDS, SLICE_AXES], &[&new_names[v]], &renamed(v));
        graph_node(&slice)
    };

    // The window: values entering it are cut to their last positions, its own renamed, and
    // those read outside it (other than by the tail) padded back under their own names.
    let (window_ordered, window_entering, window_names, padded) = match &window {
        Some(w) => {
            let ordered = sorted(&w.nodes);
            let entering = entering_values(&view, &ordered, &constants);
            let mut names: HashMap<&str, String> = entering.iter().map(|v| (v.as_str(), windowed(v))).collect();
            let mut padded = HashSet::new();
            for &n in &ordered {
                for o in &view.nodes[n].outputs {
                    names.insert(o, windowed(o));
                    let readers = view.consumers.get(o).map(Vec::as_slice).unwrap_or_default();
                    if readers.iter().any(|r| !w.nodes.contains(r) && !tail.contains(r)) {
                        padded.insert(o.as_str());
                    }
                }
            }
            (ordered, entering, names, padded)
        }
        None => Default::default(),
    };
    let window_cut = |v: &str| {
        let slice = node("Slice", &[v, WINDOW_STARTS, SLICE_ENDS, SLICE_AXES], &[&windowed(v)], &windowed(v));
        graph_node(&slice)
    };
    // How many positions the window dropped, as `Pad`'s pads for `[batch, positions, x]`,
    // from the first value cut (`reference`) and its cut version.
    let pads_from = |reference: &str| -> Vec<(u64, Vec<u8>)> {
        let full = "lfm_window/full_shape";
        let short = "lfm_window/shape";
        let (dropped, cut) = ("lfm_window/dropped", "lfm_window/cut");
        [
            node("Shape", &[reference], &[full], full),
            node("Shape", &[&windowed(reference)], &[short], short),
            node("Sub", &[full, short], &[dropped], dropped),
            node("Gather", &[dropped, SLICE_AXES], &[cut], cut),
            node("Mul", &[cut, PAD_POSITIONS], &[WINDOW_PADS], WINDOW_PADS),
        ]
        .iter()
        .map(|n| graph_node(n))
        .collect()
    };
    let pad = |o: &str| graph_node(&node("Pad", &[&windowed(o), WINDOW_PADS], &[o], &format!("{o}/lfm_window_pad")));
    let mut pads_made = false;
    let mut cut_and_pad = |v: &str, graph: &mut Vec<(u64, Vec<u8>)>| {
        graph.push(window_cut(v));
        if !pads_made {
            pads_made = true;
            graph.extend(pads_from(v));
        }
    };

    let tail_fields: HashSet<usize> = ordered.iter().map(|&n| view.nodes[n].field).collect();
    let window_fields: HashSet<usize> = window_ordered.iter().map(|&n| view.nodes[n].field).collect();
    let node_at: HashMap<usize, usize> = view.nodes.iter().enumerate().map(|(i, n)| (n.field, i)).collect();
    let old = std::mem::take(&mut parts.graph);
    let mut graph_inputs_sliced = false;
    for (field, (number, enc)) in old.into_iter().enumerate() {
        // Slices of graph inputs go before the first node.
        if number == GRAPH_NODE && !graph_inputs_sliced {
            graph_inputs_sliced = true;
            for v in window_entering.iter().filter(|v| !view.producer.contains_key(v.as_str())) {
                cut_and_pad(v, &mut parts.graph);
            }
            for v in entering.iter().filter(|v| !view.producer.contains_key(v.as_str())) {
                parts.graph.push(slice_of(v));
            }
        }
        let n = node_at.get(&field).copied();
        if tail_fields.contains(&field) {
            parts.graph.push((GRAPH_NODE, renamed_node(&enc, &new_names)));
            continue;
        }
        if number == GRAPH_VALUE_INFO
            && let Some(vi) = message(&enc)
            && strings(&vi, 1)
                .first()
                .is_some_and(|name| new_names.contains_key(name.as_str()) || window_names.contains_key(name.as_str()))
        {
            continue; // a shape declared for a value that is now shorter
        }
        if window_fields.contains(&field) {
            parts.graph.push((GRAPH_NODE, renamed_node(&enc, &window_names)));
        } else {
            parts.graph.push((number, enc));
        }
        // A value entering the tail or the window is sliced right after the node that makes
        // it; one the window makes for others is padded back.
        let Some(n) = n else { continue };
        for v in &view.nodes[n].outputs {
            if padded.contains(v.as_str()) {
                parts.graph.push(pad(v));
            }
            if window_entering.contains(&v) {
                cut_and_pad(v, &mut parts.graph);
            }
            if entering.contains(&v) {
                parts.graph.push(slice_of(v));
            }
        }
    }
    let mut constants_made = vec![(SLICE_STARTS, vec![-1i64]), (SLICE_ENDS, vec![i64::MAX]), (SLICE_AXES, vec![1])];
    if let Some(w) = &window {
        constants_made.push((WINDOW_STARTS, vec![-w.width]));
        constants_made.push((PAD_POSITIONS, vec![0, 1, 0, 0, 0, 0]));
    }
    for (name, v) in constants_made {
        let mut e = Vec::new();
        put_bytes(&mut e, GRAPH_INITIALIZER, &int64_tensor(name, &v));
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
    Ok(Some(Rewrite { bytes: parts.encode(), tail_ops: ordered.len(), window_ops: window_ordered.len() }))
}

/// The position-wise operators upstream of the last layer's convolution block, which
/// the block and the tail need for the last `width` positions only.
struct Window {
    nodes: HashSet<usize>,
    width: i64,
}

impl Window {
    /// `None` unless the last layer reads a convolution state and a weight product would
    /// run on the window.
    fn find(view: &View, tail: &HashSet<usize>, constants: &HashSet<String>) -> Option<Window> {
        // Operators whose results reach only the tail and convolution states: the last
        // layer's block and what only it reads (an attention layer's caches stop it),
        // grown backwards from the tail and the operators making the states.
        let state = |o: &String| o.starts_with("present_conv.") && view.graph_outputs.contains(o);
        let mut feeding = tail.clone();
        feeding.extend(
            (0..view.nodes.len())
                .filter(|&n| view.nodes[n].outputs.iter().all(|o| state(o) && !view.consumers.contains_key(o))),
        );
        loop {
            let joining: HashSet<usize> = feeding
                .iter()
                .flat_map(|&n| &view.nodes[n].inputs)
                .filter_map(|i| view.producer.get(i).copied())
                .filter(|p| !feeding.contains(p))
                .filter(|&p| {
                    view.nodes[p].outputs.iter().all(|o| {
                        (!view.graph_outputs.contains(o) || state(o))
                            && view.consumers.get(o).is_none_or(|c| c.iter().all(|r| feeding.contains(r)))
                    })
                })
                .collect();
            if joining.is_empty() {
                break;
            }
            feeding.extend(joining);
        }
        let width = feeding
            .iter()
            .flat_map(|&n| &view.nodes[n].inputs)
            .filter(|i| i.starts_with("past_conv."))
            .filter_map(|i| view.input_last_dims.get(i).copied())
            .max()?;
        // Of those, the position-wise operators connected to what enters the tail through
        // each other: like the tail's, their values are `[batch, positions, ...]` (an
        // attention's own operators, or arithmetic on shapes, are not connected).
        let candidate = |n: usize| {
            let node = &view.nodes[n];
            feeding.contains(&n)
                && !tail.contains(&n)
                && position_wise(view, n, constants)
                && node.inputs.iter().any(|i| !i.is_empty() && !constants.contains(i))
                && !node.outputs.iter().any(|o| view.graph_outputs.contains(o))
        };
        let mut nodes = HashSet::new();
        let mut todo: Vec<usize> = tail
            .iter()
            .flat_map(|&n| &view.nodes[n].inputs)
            .filter_map(|i| view.producer.get(i).copied())
            .filter(|&p| candidate(p))
            .collect();
        while let Some(n) = todo.pop() {
            if !nodes.insert(n) {
                continue;
            }
            let node = &view.nodes[n];
            let producers = node.inputs.iter().filter_map(|i| view.producer.get(i).copied());
            let consumers = node.outputs.iter().filter_map(|o| view.consumers.get(o)).flatten().copied();
            todo.extend(producers.chain(consumers).filter(|&m| candidate(m) && !nodes.contains(&m)));
        }
        let worth_it = nodes.iter().any(|&n| view.nodes[n].op.starts_with("MatMul"));
        (width > 0 && worth_it).then_some(Window { nodes, width })
    }
}

fn sorted(nodes: &HashSet<usize>) -> Vec<usize> {
    let mut v: Vec<usize> = nodes.iter().copied().collect();
    v.sort_unstable();
    v
}

/// Inputs of `nodes` made outside them, other than constants, in first-use order.
fn entering_values<'a>(view: &'a View, nodes: &[usize], constants: &HashSet<String>) -> Vec<&'a String> {
    let mut out: Vec<&String> = Vec::new();
    for &n in nodes {
        for i in &view.nodes[n].inputs {
            let inside = view.producer.get(i).is_some_and(|p| nodes.contains(p));
            if !i.is_empty() && !inside && !constants.contains(i) && !out.contains(&i) {
                out.push(i);
            }
        }
    }
    out
}

fn graph_node(node: &[u8]) -> (u64, Vec<u8>) {
    let mut enc = Vec::new();
    put_bytes(&mut enc, GRAPH_NODE, node);
    (GRAPH_NODE, enc)
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
            let r = slice_to_last_position(&path, false).unwrap().unwrap();
            let (bytes, moved) = (r.bytes, r.tail_ops);
            assert_eq!(r.window_ops, 0);
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
        for graph in ["embed_tokens", "vision_encoder"] {
            let path = models().join(format!("tiny16/onnx/{graph}.onnx"));
            assert!(slice_to_last_position(&path, true).unwrap().is_none());
        }
    }

    #[test]
    fn cuts_what_feeds_only_the_last_convolution_to_its_window() {
        for m in ["tiny16", "tiny6", "tiny16-gqa"] {
            let path = models().join(m).join("onnx/decoder_model_merged.onnx");
            let plain = slice_to_last_position(&path, false).unwrap().unwrap();
            let r = slice_to_last_position(&path, true).unwrap().unwrap();
            // The tail is the same; before it, the attention layer's output projection and
            // feed-forward block with their norms and sums, and the convolution's input
            // projection (three widths of the model: 1 + 3 + 1 weight products at least).
            assert_eq!(r.tail_ops, plain.tail_ops, "{m}");
            assert!(r.window_ops > 15, "{m}: {} operators", r.window_ops);
            let parts = ModelParts::read(&path).unwrap().unwrap();
            let view = View::new(&parts);
            let text = String::from_utf8_lossy(&r.bytes);
            // Cut to the convolution state's width (3 positions), padded back before the block.
            assert_eq!(view.input_last_dims.get("past_conv.0"), Some(&3), "{m}");
            assert!(text.contains("lfm_window_pad") && text.contains(WINDOW_STARTS), "{m}");
        }
    }
}

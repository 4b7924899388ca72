//! Fuses the exported vision encoder's attention and tanh-GELU into ONNX Runtime's kernels.
//!
//! The exported SigLIP2 graph spells attention out as MatMul, Mul (scale), Add (padding
//! mask), Softmax and MatMul over a `[batch, heads, patches, patches]` scores tensor, and
//! the tanh GELU as nine element-wise operators. lfm runs fp32 vision graphs one entry per
//! call on its real patches only (`Model::encode_image`), so the mask adds zero there, and
//! ONNX Runtime's `com.microsoft.MultiHeadAttention` (tiled attention on the CPU: the scores
//! tensor is never written out) and `FastGelu` compute the same function in fewer passes
//! over memory. Only the exact patterns below are rewritten; anything else stays as it is.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::error::Result;

use super::graph_view::{View, message};
use super::onnx_proto::{
    GRAPH_NODE, ModelParts, NODE_ATTRIBUTE, NODE_DOMAIN, NODE_INPUT, NODE_NAME, NODE_OP_TYPE, NODE_OUTPUT, put_bytes,
    put_varint, put_varint_field, strings,
};

const MODEL_OPSET_IMPORT: u64 = 8;
const CONTRIB: &str = "com.microsoft";
const ONNX_FLOAT: i64 = 1;

/// What a rewrite replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VisionFusion {
    pub attention_layers: usize,
    pub gelus: usize,
}

/// The rewritten vision graph (weights referenced in place from `path`) and what was fused,
/// or `None` when the graph is not float32 or nothing matched.
///
/// The attention rewrite drops the padding mask: the result is only valid for calls whose
/// `pixel_attention_mask` is all ones.
pub fn fuse_vision_graph(path: &Path) -> Result<Option<(Vec<u8>, VisionFusion)>> {
    let Some(mut parts) = ModelParts::read(path)? else { return Ok(None) };
    let view = View::new(&parts);
    if view.input_elem_type("pixel_values") != Some(ONNX_FLOAT) {
        return Ok(None);
    }
    let mut fusions = Vec::new();
    let mut done = VisionFusion::default();
    for i in 0..view.nodes.len() {
        let found = match view.nodes[i].op.as_str() {
            "Softmax" => view.attention(i).inspect(|_| done.attention_layers += 1),
            "Tanh" => view.tanh_gelu(i).inspect(|_| done.gelus += 1),
            _ => None,
        };
        fusions.extend(found);
    }
    if fusions.is_empty() {
        return Ok(None);
    }
    let mut removed = HashSet::new();
    let mut replaced = HashMap::new();
    for f in fusions {
        removed.extend(f.remove.iter().map(|&n| view.nodes[n].field));
        replaced.insert(view.nodes[f.at].field, f.node);
    }
    let old = std::mem::take(&mut parts.graph);
    for (i, field) in old.into_iter().enumerate() {
        if let Some(node) = replaced.remove(&i) {
            parts.graph.push((GRAPH_NODE, node));
        } else if !removed.contains(&i) {
            parts.graph.push(field);
        }
    }
    // What only fed the replaced nodes (the padding mask's construction) goes too.
    let live = View::new(&parts).live_fields();
    let old = std::mem::take(&mut parts.graph);
    parts.graph = old
        .into_iter()
        .enumerate()
        .filter(|(i, (n, _))| *n != GRAPH_NODE || live.contains(i))
        .map(|(_, f)| f)
        .collect();
    let has_contrib = parts.model.iter().any(|(n, enc)| {
        *n == MODEL_OPSET_IMPORT
            && message(enc).is_some_and(|fs| strings(&fs, 1).first().map(String::as_str) == Some(CONTRIB))
    });
    if !has_contrib {
        let mut opset = Vec::new();
        put_bytes(&mut opset, 1, CONTRIB.as_bytes());
        put_varint_field(&mut opset, 2, 1);
        let mut enc = Vec::new();
        put_bytes(&mut enc, MODEL_OPSET_IMPORT, &opset);
        parts.model.push((MODEL_OPSET_IMPORT, enc));
    }
    Ok(Some((parts.encode(), done)))
}

/// One rewrite: nodes to drop, and the node (by index) whose place the new node takes.
struct Fusion {
    remove: Vec<usize>,
    at: usize,
    node: Vec<u8>,
}

impl View {
    /// True when `value` is computed from the `pixel_attention_mask` input by operators
    /// that carry no weights (comparisons, casts, shape arithmetic, `Where`, `Expand`...).
    fn is_padding_mask(&self, value: &str) -> bool {
        let mut seen = HashSet::new();
        let mut todo = vec![value];
        let mut from_mask = false;
        while let Some(v) = todo.pop() {
            if !seen.insert(v) {
                continue;
            }
            if v == "pixel_attention_mask" {
                from_mask = true;
                continue;
            }
            let Some(&n) = self.producer.get(v) else {
                // A graph input other than the mask, or an initializer: only small
                // constants (scalars, shape vectors) belong in a mask's construction.
                if self.initializers.get(v).is_some_and(|d| d.iter().product::<i64>() > 16) {
                    return false;
                }
                continue;
            };
            let node = &self.nodes[n];
            match node.op.as_str() {
                "MatMul" | "Gemm" | "Conv" | "MatMulInteger" | "Einsum" => return false,
                // Only the dims of its input matter, not its values.
                "Shape" | "Size" => {}
                _ => todo.extend(node.inputs.iter().map(String::as_str)),
            }
        }
        from_mask
    }

    /// For a binary node with one scalar-constant input: (that constant, the other input).
    fn const_operand(&self, node: usize) -> Option<(f64, String)> {
        let n = &self.nodes[node];
        let [a, b] = n.inputs.as_slice() else { return None };
        match (self.scalar(a), self.scalar(b)) {
            (Some(c), None) => Some((c, b.clone())),
            (None, Some(c)) => Some((c, a.clone())),
            _ => None,
        }
    }

    fn transpose_with(&self, value: &str, perm: &[i64]) -> Option<usize> {
        self.made_by(value, "Transpose").filter(|&t| self.nodes[t].ints_attr("perm").as_deref() == Some(perm))
    }

    /// The target shape of a Reshape, element by element (`None` where computed at run time).
    fn reshape_target(&self, reshape: usize) -> Option<Vec<Option<i64>>> {
        let shape = self.nodes[reshape].inputs.get(1)?;
        if let Some(values) = self.consts.get(shape) {
            return Some(values.iter().map(|&x| Some(x as i64)).collect());
        }
        let concat = self.made_by(shape, "Concat")?;
        Some(self.nodes[concat].inputs.iter().map(|i| self.scalar(i).map(|x| x as i64)).collect())
    }

    /// The last-axis width of a linear layer's output (`MatMul` by a 2-D weight, then
    /// optionally a 1-D bias `Add`), read from the weights.
    fn width(&self, value: &str) -> Option<i64> {
        let node = &self.nodes[*self.producer.get(value)?];
        let dims = |i: &String| self.initializers.get(i);
        match node.op.as_str() {
            "Add" => node.inputs.iter().find_map(|i| match dims(i).map(Vec::as_slice) {
                Some([w]) => Some(*w),
                _ => None,
            }),
            "MatMul" => match dims(node.inputs.get(1)?).map(Vec::as_slice) {
                Some([_, w]) => Some(*w),
                _ => None,
            },
            _ => None,
        }
    }

    /// `softmax(Q·Kᵀ·scale + mask)·V` with heads split by Reshape/Transpose and merged back,
    /// found from its Softmax; becomes `MultiHeadAttention(q, k, v)`.
    fn attention(&self, softmax: usize) -> Option<Fusion> {
        let sm = &self.nodes[softmax];
        if !sm.is("Softmax") || !matches!(sm.int_attr("axis").unwrap_or(-1), -1 | 3) {
            return None;
        }
        let add = self.made_by(sm.inputs.first()?, "Add")?;
        let (mul, scale, qk) = self.nodes[add].inputs.iter().find_map(|i| {
            let mul = self.made_by(i, "Mul")?;
            let (scale, qk) = self.const_operand(mul)?;
            Some((mul, scale, self.made_by(&qk, "MatMul")?))
        })?;
        // The other addend is dropped: it must be the padding mask, computed from
        // `pixel_attention_mask` without weights (not, say, a learned position bias).
        let scores = self.nodes[mul].outputs.first()?;
        let bias = self.nodes[add].inputs.iter().find(|i| *i != scores)?;
        if !self.is_padding_mask(bias) {
            return None;
        }
        let tq = self.transpose_with(self.nodes[qk].inputs.first()?, &[0, 2, 1, 3])?;
        let tk = self.transpose_with(self.nodes[qk].inputs.get(1)?, &[0, 2, 3, 1])?;
        let rq = self.made_by(&self.nodes[tq].inputs[0], "Reshape")?;
        let rk = self.made_by(&self.nodes[tk].inputs[0], "Reshape")?;
        // Softmax -> float Casts (no-ops the exporter leaves) -> MatMul with V.
        let mut chain = vec![softmax];
        let pv = loop {
            let out = self.nodes[*chain.last()?].outputs.first()?;
            if let Some(cast) = self.read_only_by(out, "Cast")
                && self.nodes[cast].int_attr("to") == Some(ONNX_FLOAT)
            {
                chain.push(cast);
                continue;
            }
            let pv = self.read_only_by(out, "MatMul")?;
            break (self.nodes[pv].inputs.first() == Some(out)).then_some(pv)?;
        };
        let tv = self.transpose_with(self.nodes[pv].inputs.get(1)?, &[0, 2, 1, 3])?;
        let rv = self.made_by(&self.nodes[tv].inputs[0], "Reshape")?;
        let to = self.read_only_by(self.nodes[pv].outputs.first()?, "Transpose")?;
        if self.nodes[to].ints_attr("perm").as_deref() != Some(&[0, 2, 1, 3]) {
            return None;
        }
        let ro = self.read_only_by(self.nodes[to].outputs.first()?, "Reshape")?;

        // Heads: every split is [batch, patches, heads or -1, head_dim]; the merge gives hidden.
        let split = |r: usize| match self.reshape_target(r)?.as_slice() {
            [_, _, heads, Some(hd)] if *hd > 0 => Some((*heads, *hd)),
            _ => None,
        };
        let (heads_q, head_dim) = split(rq)?;
        if split(rk)?.1 != head_dim || split(rv)?.1 != head_dim {
            return None;
        }
        let hidden = self.width(&self.nodes[rq].inputs[0])?;
        let merged = match self.reshape_target(ro)?.as_slice() {
            [_, _, m] => *m,
            _ => return None,
        };
        let heads = hidden / head_dim;
        let fits = |d: Option<i64>, want: i64| d == Some(-1) || d == Some(want);
        if hidden % head_dim != 0 || !fits(heads_q, heads) || !fits(merged, hidden) {
            return None;
        }
        let mut remove = vec![add, mul, qk, tq, tk, rq, rk, pv, tv, rv, to, ro];
        remove.extend(&chain);
        let output = self.nodes[ro].outputs.first()?.clone();
        if !self.self_contained(&remove, &output) {
            return None;
        }
        let inputs = [rq, rk, rv].map(|r| self.nodes[r].inputs[0].as_str());
        let attrs = [int_attr("num_heads", heads), float_attr("scale", scale as f32)];
        let name = format!("{}/lfm_fused_attention", self.nodes[ro].name);
        Some(Fusion { remove, at: ro, node: contrib_node("MultiHeadAttention", &inputs, &output, &name, &attrs) })
    }

    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` spelled out by the exporter, found from
    /// its Tanh; becomes `FastGelu(x)`, taking along a preceding bias `Add` when only the
    /// GELU reads it.
    fn tanh_gelu(&self, tanh: usize) -> Option<Fusion> {
        let near = |c: f64, want: f64| (c - want).abs() <= 1e-6 * want.abs();
        let mul3 = self.made_by(self.nodes[tanh].inputs.first()?, "Mul")?;
        let (c, inner) = self.const_operand(mul3)?;
        if !near(c, (2.0 / std::f64::consts::PI).sqrt()) {
            return None;
        }
        let add0 = self.made_by(&inner, "Add")?;
        let (x, mul2, mul1, mul0) = self.nodes[add0].inputs.iter().find_map(|cube| {
            let mul2 = self.made_by(cube, "Mul")?;
            let (c, sq_x) = self.const_operand(mul2)?;
            let mul1 = self.made_by(&sq_x, "Mul").filter(|_| near(c, 0.044715))?;
            let x = self.nodes[add0].inputs.iter().find(|i| *i != cube)?;
            let [a, b] = self.nodes[mul1].inputs.as_slice() else { return None };
            let sq = if a == x {
                b
            } else if b == x {
                a
            } else {
                return None;
            };
            let mul0 = self.made_by(sq, "Mul").filter(|&m| self.nodes[m].inputs.iter().all(|i| i == x))?;
            Some((x.clone(), mul2, mul1, mul0))
        })?;
        let add1 = self.read_only_by(self.nodes[tanh].outputs.first()?, "Add")?;
        let (one, _) = self.const_operand(add1)?;
        let mul4 = self.read_only_by(self.nodes[add1].outputs.first()?, "Mul")?;
        if !self.nodes[mul4].inputs.contains(&x) || !near(one, 1.0) {
            return None;
        }
        let mul5 = self.read_only_by(self.nodes[mul4].outputs.first()?, "Mul")?;
        let (half, _) = self.const_operand(mul5)?;
        if !near(half, 0.5) {
            return None;
        }
        let mut remove = vec![mul0, mul1, mul2, add0, mul3, tanh, add1, mul4, mul5];
        let output = self.nodes[mul5].outputs.first()?.clone();
        if !self.self_contained(&remove, &output) {
            return None;
        }
        let mut inputs = vec![x.clone()];
        if let Some(bias_add) = self.made_by(&x, "Add")
            && let [a, b] = self.nodes[bias_add].inputs.as_slice()
        {
            let vector = |n: &String| self.initializers.get(n).is_some_and(|d| d.len() == 1);
            let folded = if vector(a) && !vector(b) {
                Some([b, a])
            } else if vector(b) && !vector(a) {
                Some([a, b])
            } else {
                None
            };
            let mut with_bias = remove.clone();
            with_bias.push(bias_add);
            if let Some([data, bias]) = folded
                && self.self_contained(&with_bias, &output)
            {
                inputs = vec![data.clone(), bias.clone()];
                remove = with_bias;
            }
        }
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let name = format!("{}/lfm_fused_gelu", self.nodes[mul5].name);
        Some(Fusion { remove, at: mul5, node: contrib_node("FastGelu", &inputs, &output, &name, &[]) })
    }
}

fn int_attr(name: &str, v: i64) -> Vec<u8> {
    let mut a = Vec::new();
    put_bytes(&mut a, 1, name.as_bytes());
    put_varint_field(&mut a, 3, v as u64);
    put_varint_field(&mut a, 20, 2); // AttributeType INT
    a
}

fn float_attr(name: &str, v: f32) -> Vec<u8> {
    let mut a = Vec::new();
    put_bytes(&mut a, 1, name.as_bytes());
    put_varint(&mut a, 2 << 3 | 5);
    a.extend_from_slice(&v.to_le_bytes());
    put_varint_field(&mut a, 20, 1); // AttributeType FLOAT
    a
}

/// An encoded graph node field for a `com.microsoft` operator.
fn contrib_node(op: &str, inputs: &[&str], output: &str, name: &str, attrs: &[Vec<u8>]) -> Vec<u8> {
    let mut n = Vec::new();
    for i in inputs {
        put_bytes(&mut n, NODE_INPUT, i.as_bytes());
    }
    put_bytes(&mut n, NODE_OUTPUT, output.as_bytes());
    put_bytes(&mut n, NODE_NAME, name.as_bytes());
    put_bytes(&mut n, NODE_OP_TYPE, op.as_bytes());
    for a in attrs {
        put_bytes(&mut n, NODE_ATTRIBUTE, a);
    }
    put_bytes(&mut n, NODE_DOMAIN, CONTRIB.as_bytes());
    let mut field = Vec::new();
    put_bytes(&mut field, GRAPH_NODE, &n);
    field
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(model: &str, file: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(model).join("onnx").join(file)
    }

    #[test]
    fn fuses_every_layer_of_the_exported_vision_encoders() {
        for (model, layers) in [("tiny16", 2), ("tiny6", 1), ("tiny16-gqa", 2)] {
            let path = fixture(model, "vision_encoder.onnx");
            let (bytes, fused) = fuse_vision_graph(&path).unwrap().unwrap();
            assert_eq!(fused, VisionFusion { attention_layers: layers, gelus: layers }, "{model}");
            let before = View::new(&ModelParts::read(&path).unwrap().unwrap());
            let out = std::env::temp_dir().join(format!("lfm-fused-{model}-{}.onnx", std::process::id()));
            std::fs::write(&out, &bytes).unwrap();
            let after = View::new(&ModelParts::read(&out).unwrap().unwrap());
            std::fs::remove_file(&out).unwrap();
            let count = |v: &View, op: &str| v.nodes.iter().filter(|n| n.op == op).count();
            assert_eq!(count(&after, "Softmax"), 0);
            assert_eq!(count(&after, "Tanh"), 0);
            assert_eq!(count(&after, "MultiHeadAttention"), layers);
            assert_eq!(count(&after, "FastGelu"), layers);
            // 14 nodes per attention and 9 per GELU, and then the padding mask's construction.
            assert!(before.nodes.len() - after.nodes.len() > layers * 23);
            assert!(!after.nodes.iter().any(|n| n.op == "Expand"));
            assert!(after.nodes.iter().filter(|n| n.op == "FastGelu").all(|n| n.inputs.len() == 2));
        }
    }

    #[test]
    fn leaves_graphs_without_the_patterns_alone() {
        assert!(fuse_vision_graph(&fixture("tiny16", "embed_tokens.onnx")).unwrap().is_none());
        assert!(fuse_vision_graph(&fixture("tiny6", "decoder_model_merged.onnx")).unwrap().is_none());
    }
}

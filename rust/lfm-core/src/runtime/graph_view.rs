//! A decoded view of an ONNX graph's structure (nodes, their wiring, small constants,
//! initializer shapes) for the load-time graph rewrites; weights are never read.

use std::collections::{HashMap, HashSet};

use super::onnx_proto::{
    Field, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_NODE, GRAPH_OUTPUT, ModelParts, NODE_ATTRIBUTE, NODE_DOMAIN,
    NODE_INPUT, NODE_NAME, NODE_OP_TYPE, NODE_OUTPUT, TENSOR_NAME, parse_fields, strings,
};

/// One operator of the graph.
pub(super) struct Node {
    /// Index of its field in `ModelParts::graph`.
    pub(super) field: usize,
    pub(super) op: String,
    pub(super) domain: String,
    pub(super) name: String,
    pub(super) inputs: Vec<String>,
    pub(super) outputs: Vec<String>,
    pub(super) attrs: Vec<(String, Vec<Field>)>,
}

impl Node {
    pub(super) fn attr(&self, name: &str) -> Option<&[Field]> {
        self.attrs.iter().find(|(n, _)| n == name).map(|(_, f)| f.as_slice())
    }

    pub(super) fn int_attr(&self, name: &str) -> Option<i64> {
        self.attr(name)?.iter().find(|f| f.number == 3 && f.wire == 0).and_then(varint)
    }

    pub(super) fn ints_attr(&self, name: &str) -> Option<Vec<i64>> {
        Some(repeated_ints(self.attr(name)?, 8))
    }

    pub(super) fn is(&self, op: &str) -> bool {
        self.op == op && self.domain.is_empty()
    }
}

/// The graph's nodes with their wiring and constant values.
pub(super) struct View {
    pub(super) nodes: Vec<Node>,
    pub(super) producer: HashMap<String, usize>,
    pub(super) consumers: HashMap<String, Vec<usize>>,
    /// Values of `Constant` nodes' outputs.
    pub(super) consts: HashMap<String, Vec<f64>>,
    /// Initializer name -> dims.
    pub(super) initializers: HashMap<String, Vec<i64>>,
    pub(super) graph_outputs: HashSet<String>,
    /// Graph input name -> element type.
    pub(super) input_types: HashMap<String, i64>,
    /// Graph input name -> its last dimension, where the graph declares it as a number.
    pub(super) input_last_dims: HashMap<String, i64>,
}

impl View {
    pub(super) fn new(parts: &ModelParts) -> View {
        let mut v = View {
            nodes: Vec::new(),
            producer: HashMap::new(),
            consumers: HashMap::new(),
            consts: HashMap::new(),
            initializers: HashMap::new(),
            graph_outputs: HashSet::new(),
            input_types: HashMap::new(),
            input_last_dims: HashMap::new(),
        };
        for (field, (number, _)) in parts.graph.iter().enumerate() {
            let Some(fs) = parts.graph_message(field) else { continue };
            match *number {
                GRAPH_NODE => {
                    let attrs = fs
                        .iter()
                        .filter(|f| f.number == NODE_ATTRIBUTE && f.wire == 2)
                        .filter_map(|f| parse_fields(&f.payload))
                        .map(|a| (strings(&a, 1).pop().unwrap_or_default(), a))
                        .collect();
                    let node = Node {
                        field,
                        op: strings(&fs, NODE_OP_TYPE).pop().unwrap_or_default(),
                        domain: strings(&fs, NODE_DOMAIN).pop().unwrap_or_default(),
                        name: strings(&fs, NODE_NAME).pop().unwrap_or_default(),
                        inputs: strings(&fs, NODE_INPUT),
                        outputs: strings(&fs, NODE_OUTPUT),
                        attrs,
                    };
                    let i = v.nodes.len();
                    for o in &node.outputs {
                        v.producer.insert(o.clone(), i);
                    }
                    for input in &node.inputs {
                        v.consumers.entry(input.clone()).or_default().push(i);
                    }
                    if node.is("Constant")
                        && let (Some(out), Some(values)) = (node.outputs.first(), constant_values(&node))
                    {
                        v.consts.insert(out.clone(), values);
                    }
                    v.nodes.push(node);
                }
                GRAPH_INITIALIZER => {
                    if let Some(name) = strings(&fs, TENSOR_NAME).pop() {
                        v.initializers.insert(name, repeated_ints(&fs, 1));
                    }
                }
                GRAPH_OUTPUT => v.graph_outputs.extend(strings(&fs, 1)),
                GRAPH_INPUT => {
                    if let (Some(name), Some(ty)) = (strings(&fs, 1).pop(), elem_type(&fs)) {
                        if let Some(dim) = last_dim(&fs) {
                            v.input_last_dims.insert(name.clone(), dim);
                        }
                        v.input_types.insert(name, ty);
                    }
                }
                _ => {}
            }
        }
        v
    }

    /// Graph fields of the nodes the graph's outputs depend on.
    pub(super) fn live_fields(&self) -> HashSet<usize> {
        let mut live = HashSet::new();
        let mut needed: Vec<&String> = self.graph_outputs.iter().collect();
        while let Some(value) = needed.pop() {
            if let Some(&n) = self.producer.get(value)
                && live.insert(self.nodes[n].field)
            {
                needed.extend(&self.nodes[n].inputs);
            }
        }
        live
    }

    pub(super) fn input_elem_type(&self, name: &str) -> Option<i64> {
        self.input_types.get(name).copied()
    }

    /// The node producing `value`, if it is a standard-domain `op`.
    pub(super) fn made_by(&self, value: &str, op: &str) -> Option<usize> {
        self.producer.get(value).copied().filter(|&i| self.nodes[i].is(op))
    }

    /// The single node reading `value`, if it is a standard-domain `op`.
    pub(super) fn read_only_by(&self, value: &str, op: &str) -> Option<usize> {
        match self.consumers.get(value).map(Vec::as_slice) {
            Some([i]) if self.nodes[*i].is(op) && !self.graph_outputs.contains(value) => Some(*i),
            _ => None,
        }
    }

    pub(super) fn scalar(&self, value: &str) -> Option<f64> {
        match self.consts.get(value).map(Vec::as_slice) {
            Some([x]) => Some(*x),
            _ => None,
        }
    }

    /// True when every output of `nodes` other than `kept` is read only inside `nodes`.
    pub(super) fn self_contained(&self, nodes: &[usize], kept: &str) -> bool {
        let set: HashSet<usize> = nodes.iter().copied().collect();
        nodes.iter().flat_map(|&n| &self.nodes[n].outputs).filter(|o| o.as_str() != kept).all(|o| {
            !self.graph_outputs.contains(o) && self.consumers.get(o).is_none_or(|c| c.iter().all(|i| set.contains(i)))
        })
    }
}

/// The fields of the message in an encoded length-delimited field.
pub(super) fn message(enc: &[u8]) -> Option<Vec<Field>> {
    parse_fields(enc).and_then(|f| f.into_iter().next()).and_then(|f| parse_fields(&f.payload))
}

/// The value of a varint field.
pub(super) fn varint(f: &Field) -> Option<i64> {
    let mut body = f.encoded.iter().skip_while(|&&b| b & 0x80 != 0).skip(1);
    decode_varint(&mut body)
}

fn decode_varint<'a>(bytes: &mut impl Iterator<Item = &'a u8>) -> Option<i64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.next()?;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v as i64);
        }
    }
    None
}

/// A repeated int64 field `number`, packed or not.
pub(super) fn repeated_ints(fields: &[Field], number: u64) -> Vec<i64> {
    let mut out = Vec::new();
    for f in fields.iter().filter(|f| f.number == number) {
        if f.wire == 2 {
            let mut bytes = f.payload.iter();
            while let Some(v) = decode_varint(&mut bytes) {
                out.push(v);
            }
        } else if let Some(v) = varint(f) {
            out.push(v);
        }
    }
    out
}

/// A `ValueInfoProto`'s tensor element type.
pub(super) fn elem_type(value_info: &[Field]) -> Option<i64> {
    let ty = parse_fields(&value_info.iter().find(|f| f.number == 2)?.payload)?;
    let tensor = parse_fields(&ty.iter().find(|f| f.number == 1)?.payload)?;
    tensor.iter().find(|f| f.number == 1 && f.wire == 0).and_then(varint)
}

/// A `ValueInfoProto`'s last tensor dimension, when it is a number (not a symbol).
fn last_dim(value_info: &[Field]) -> Option<i64> {
    let ty = parse_fields(&value_info.iter().find(|f| f.number == 2)?.payload)?;
    let tensor = parse_fields(&ty.iter().find(|f| f.number == 1)?.payload)?;
    let shape = parse_fields(&tensor.iter().find(|f| f.number == 2)?.payload)?;
    let dim = parse_fields(&shape.iter().rfind(|f| f.number == 1)?.payload)?;
    dim.iter().find(|f| f.number == 1 && f.wire == 0).and_then(varint)
}

/// The values of a `Constant` node holding a float, double or integer tensor.
pub(super) fn constant_values(node: &Node) -> Option<Vec<f64>> {
    if let Some(f) = node.attr("value_float").and_then(|a| a.iter().find(|f| f.number == 2 && f.wire == 5)) {
        return Some(vec![f64::from(f32_at_end(&f.encoded)?)]);
    }
    if let Some(v) = node.attr("value_int").and_then(|a| a.iter().find(|f| f.number == 3 && f.wire == 0)) {
        return Some(vec![varint(v)? as f64]);
    }
    let tensor = parse_fields(&node.attr("value")?.iter().find(|f| f.number == 5 && f.wire == 2)?.payload)?;
    let data_type = tensor.iter().find(|f| f.number == 2 && f.wire == 0).and_then(varint)?;
    let raw = tensor.iter().find(|f| f.number == 9 && f.wire == 2).map(|f| f.payload.as_slice());
    match (data_type, raw) {
        (1, Some(raw)) => {
            Some(raw.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect())
        }
        (1, None) => {
            let mut out = Vec::new();
            for f in tensor.iter().filter(|f| f.number == 4) {
                match f.wire {
                    2 => out.extend(
                        f.payload.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
                    ),
                    5 => out.push(f64::from(f32_at_end(&f.encoded)?)),
                    _ => return None,
                }
            }
            Some(out)
        }
        (7, Some(raw)) => {
            Some(raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()) as f64).collect())
        }
        (7, None) => Some(repeated_ints(&tensor, 7).into_iter().map(|v| v as f64).collect()),
        _ => None,
    }
}

pub(super) fn f32_at_end(encoded: &[u8]) -> Option<f32> {
    let b = encoded.get(encoded.len().checked_sub(4)?..)?;
    Some(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

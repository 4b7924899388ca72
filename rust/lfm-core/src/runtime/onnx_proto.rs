//! Just enough of the ONNX protobuf wire format to list a graph's operators without
//! loading its weights: the decoder is inspected for how it derives per-row positions.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::error::{Error, Result};

const MODEL_GRAPH: u64 = 7;
pub(super) const GRAPH_NODE: u64 = 1;
pub(super) const NODE_OP_TYPE: u64 = 4;
pub(super) const NODE_DOMAIN: u64 = 7;

struct Wire<R> {
    r: R,
}

impl<R: Read + Seek> Wire<R> {
    fn varint(&mut self) -> std::io::Result<Option<u64>> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let mut b = [0u8];
            if self.r.read(&mut b)? == 0 {
                return if shift == 0 { Ok(None) } else { Err(std::io::ErrorKind::UnexpectedEof.into()) };
            }
            v |= u64::from(b[0] & 0x7f) << shift;
            if b[0] & 0x80 == 0 {
                return Ok(Some(v));
            }
        }
        Err(std::io::ErrorKind::InvalidData.into())
    }

    /// Reads the next field header within `end`: (field number, wire type).
    fn field(&mut self, end: u64) -> std::io::Result<Option<(u64, u8)>> {
        if self.r.stream_position()? >= end {
            return Ok(None);
        }
        Ok(self.varint()?.map(|tag| (tag >> 3, (tag & 7) as u8)))
    }

    /// Reads a length prefix and returns where that body ends, refusing a body that runs
    /// past `end` (the end of the enclosing message or file). The lengths come from the
    /// file: unchecked, a huge one wrapped to a backward seek (a parse that never ends) or
    /// sized an allocation of terabytes.
    fn body_end(&mut self, end: u64) -> std::io::Result<u64> {
        let n = self.varint()?.unwrap_or(0);
        let start = self.r.stream_position()?;
        match start.checked_add(n) {
            Some(body_end) if body_end <= end => Ok(body_end),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a field of {n} bytes at offset {start} runs past its end at {end}"),
            )),
        }
    }

    /// Skips a field's value of wire type `wire`, which must end by `end`.
    fn skip(&mut self, wire: u8, end: u64) -> std::io::Result<()> {
        let body_end = match wire {
            0 => {
                self.varint()?;
                return Ok(());
            }
            1 => self.r.stream_position()?.saturating_add(8),
            2 => self.body_end(end)?,
            5 => self.r.stream_position()?.saturating_add(4),
            _ => return Err(std::io::ErrorKind::InvalidData.into()),
        };
        if body_end > end {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        // Absolute, so that a seek only ever moves forward.
        self.r.seek(SeekFrom::Start(body_end))?;
        Ok(())
    }

    /// A whole length-delimited body, which must end by `end`.
    fn bytes_exact(&mut self, end: u64) -> std::io::Result<Vec<u8>> {
        let body_end = self.body_end(end)?;
        let n = body_end - self.r.stream_position()?;
        let mut v = vec![0; usize::try_from(n).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?];
        self.r.read_exact(&mut v)?;
        Ok(v)
    }

    /// The first MiB of a length-delimited body (names: longer ones are cut), which must
    /// end by `end`.
    fn bytes(&mut self, end: u64) -> std::io::Result<Vec<u8>> {
        let body_end = self.body_end(end)?;
        let n = body_end - self.r.stream_position()?;
        let mut v = vec![0; n.min(1 << 20) as usize];
        self.r.read_exact(&mut v)?;
        self.r.seek(SeekFrom::Start(body_end))?;
        Ok(v)
    }
}

/// One node of a graph, without its attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GraphNode {
    pub domain: String,
    pub op: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// Every node of the main graph, in file order.
pub fn graph_nodes(path: &Path) -> Result<Vec<GraphNode>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut w = Wire { r: BufReader::new(file) };
    let bad = |e: std::io::Error| Error::model_load(path, format!("not an ONNX model: {e}"));
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    let mut nodes = Vec::new();
    while let Some((f, wt)) = w.field(len).map_err(bad)? {
        if f == MODEL_GRAPH && wt == 2 {
            let end = w.body_end(len).map_err(bad)?;
            while let Some((gf, gwt)) = w.field(end).map_err(bad)? {
                if gf == GRAPH_NODE && gwt == 2 {
                    let node_end = w.body_end(end).map_err(bad)?;
                    let mut node = GraphNode::default();
                    while let Some((nf, nwt)) = w.field(node_end).map_err(bad)? {
                        match (nf, nwt) {
                            (NODE_OP_TYPE, 2) => node.op = text(w.bytes(node_end).map_err(bad)?),
                            (NODE_DOMAIN, 2) => node.domain = text(w.bytes(node_end).map_err(bad)?),
                            (NODE_INPUT, 2) => node.inputs.push(text(w.bytes(node_end).map_err(bad)?)),
                            (NODE_OUTPUT, 2) => node.outputs.push(text(w.bytes(node_end).map_err(bad)?)),
                            _ => w.skip(nwt, node_end).map_err(bad)?,
                        }
                    }
                    nodes.push(node);
                } else {
                    w.skip(gwt, end).map_err(bad)?;
                }
            }
            return Ok(nodes);
        }
        w.skip(wt, len).map_err(bad)?;
    }
    Err(Error::model_load(path, "not an ONNX model: no graph"))
}

// ---------------------------------------------------------------------------------------
// Rewriting the decoder so that the LM head runs on the last position only.
// ---------------------------------------------------------------------------------------

pub(super) const GRAPH_INITIALIZER: u64 = 5;
pub(super) const GRAPH_INPUT: u64 = 11;
pub(super) const GRAPH_OUTPUT: u64 = 12;
pub(super) const GRAPH_VALUE_INFO: u64 = 13;
pub(super) const NODE_NAME: u64 = 3;
pub(super) const NODE_ATTRIBUTE: u64 = 5;
pub(super) const NODE_INPUT: u64 = 1;
pub(super) const NODE_OUTPUT: u64 = 2;
pub(super) const TENSOR_NAME: u64 = 8;
const TENSOR_RAW_DATA: u64 = 9;
const TENSOR_EXTERNAL_DATA: u64 = 13;
const TENSOR_DATA_LOCATION: u64 = 14;

pub(super) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

pub(super) fn put_bytes(out: &mut Vec<u8>, field: u64, data: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

pub(super) fn put_varint_field(out: &mut Vec<u8>, field: u64, v: u64) {
    put_varint(out, field << 3);
    put_varint(out, v);
}

/// One field of a message read into memory: its number, wire type, and encoded bytes
/// (tag included), plus the payload of a length-delimited field.
pub(super) struct Field {
    pub number: u64,
    pub wire: u8,
    pub encoded: Vec<u8>,
    pub payload: Vec<u8>,
}

pub(super) fn parse_fields(buf: &[u8]) -> Option<Vec<Field>> {
    let mut out = Vec::new();
    let mut w = Wire { r: std::io::Cursor::new(buf) };
    let end = buf.len() as u64;
    while let Some((number, wire)) = w.field(end).ok()? {
        let start_tag = {
            // Re-encode the tag (the cursor is past it).
            let mut t = Vec::new();
            put_varint(&mut t, number << 3 | u64::from(wire));
            t
        };
        let body_start = w.r.position() as usize;
        let payload = if wire == 2 {
            let p1 = w.body_end(end).ok()?;
            let p0 = w.r.position();
            let p = buf.get(usize::try_from(p0).ok()?..usize::try_from(p1).ok()?)?.to_vec();
            w.r.set_position(p1);
            p
        } else {
            w.skip(wire, end).ok()?;
            Vec::new()
        };
        let body_end = w.r.position() as usize;
        let mut encoded = start_tag;
        encoded.extend_from_slice(buf.get(body_start..body_end)?);
        out.push(Field { number, wire, encoded, payload });
    }
    Some(out)
}

pub(super) fn strings(fields: &[Field], number: u64) -> Vec<String> {
    fields
        .iter()
        .filter(|f| f.number == number && f.wire == 2)
        .map(|f| String::from_utf8_lossy(&f.payload).into_owned())
        .collect()
}

pub(super) fn int64_tensor(name: &str, values: &[i64]) -> Vec<u8> {
    let mut t = Vec::new();
    put_varint_field(&mut t, 1, values.len() as u64); // dims
    put_varint_field(&mut t, 2, 7); // data_type INT64
    let mut packed = Vec::new();
    for &v in values {
        put_varint(&mut packed, v as u64);
    }
    put_bytes(&mut t, 7, &packed); // int64_data (packed)
    put_bytes(&mut t, TENSOR_NAME, name.as_bytes());
    t
}

pub(super) fn node(op: &str, inputs: &[&str], outputs: &[&str], name: &str) -> Vec<u8> {
    let mut n = Vec::new();
    for i in inputs {
        put_bytes(&mut n, NODE_INPUT, i.as_bytes());
    }
    for o in outputs {
        put_bytes(&mut n, NODE_OUTPUT, o.as_bytes());
    }
    put_bytes(&mut n, 3, name.as_bytes());
    put_bytes(&mut n, NODE_OP_TYPE, op.as_bytes());
    n
}

/// A model read field by field, its graph's fields kept apart; inline initializer data
/// become external references into the source file, so the parts are mostly structure.
pub(super) struct ModelParts {
    /// Top-level fields other than the graph: (field number, encoded field).
    pub model: Vec<(u64, Vec<u8>)>,
    /// The graph's fields in file order: (field number, encoded field).
    pub graph: Vec<(u64, Vec<u8>)>,
}

impl ModelParts {
    /// Reads `path`; `None` when a field has a wire type a model never uses.
    pub fn read(path: &Path) -> Result<Option<ModelParts>> {
        let bad = |e: std::io::Error| Error::model_load(path, format!("not an ONNX model: {e}"));
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let location = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let mut w = Wire { r: BufReader::new(file) };
        let mut model = Vec::new();
        let mut graph_fields: Option<Vec<(u64, Vec<u8>)>> = None;
        while let Some((f, wt)) = w.field(len).map_err(bad)? {
            if f == MODEL_GRAPH && wt == 2 {
                let end = w.body_end(len).map_err(bad)?;
                let mut fields = Vec::new();
                while let Some((gf, gwt)) = w.field(end).map_err(bad)? {
                    if gf == GRAPH_INITIALIZER && gwt == 2 {
                        fields.push((gf, externalize_tensor(&mut w, end, &location).map_err(bad)?));
                    } else if gwt == 2 {
                        let body = w.bytes_exact(end).map_err(bad)?;
                        let mut enc = Vec::new();
                        put_bytes(&mut enc, gf, &body);
                        fields.push((gf, enc));
                    } else {
                        // Scalars in a graph are rare; keep them verbatim.
                        let mut enc = Vec::new();
                        put_varint(&mut enc, gf << 3 | u64::from(gwt));
                        let v = w.varint().map_err(bad)?.unwrap_or(0);
                        if gwt != 0 {
                            return Ok(None);
                        }
                        put_varint(&mut enc, v);
                        fields.push((gf, enc));
                    }
                }
                graph_fields = Some(fields);
            } else {
                let mut enc = Vec::new();
                put_varint(&mut enc, f << 3 | u64::from(wt));
                match wt {
                    0 => put_varint(&mut enc, w.varint().map_err(bad)?.unwrap_or(0)),
                    2 => {
                        let body = w.bytes_exact(len).map_err(bad)?;
                        put_varint(&mut enc, body.len() as u64);
                        enc.extend_from_slice(&body);
                    }
                    _ => return Ok(None),
                }
                model.push((f, enc));
            }
        }
        Ok(graph_fields.map(|graph| ModelParts { model, graph }))
    }

    /// The serialized model.
    pub fn encode(&self) -> Vec<u8> {
        let mut graph_bytes = Vec::new();
        for (_, enc) in &self.graph {
            graph_bytes.extend_from_slice(enc);
        }
        let mut out = Vec::new();
        for (f, enc) in &self.model {
            if *f < MODEL_GRAPH {
                out.extend_from_slice(enc);
            }
        }
        put_bytes(&mut out, MODEL_GRAPH, &graph_bytes);
        for (f, enc) in &self.model {
            if *f > MODEL_GRAPH {
                out.extend_from_slice(enc);
            }
        }
        out
    }

    /// The fields of the message inside graph field `i` (a node, initializer, ...).
    pub fn graph_message(&self, i: usize) -> Option<Vec<Field>> {
        parse_fields(&self.graph[i].1).and_then(|f| f.into_iter().next()).and_then(|f| parse_fields(&f.payload))
    }
}

/// A `ValueInfoProto` (fields given) whose tensor shape has dimension 1 set to 1.
pub(super) fn one_position_value_info(vi: &[Field]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for f in vi {
        if f.number != 2 {
            out.extend_from_slice(&f.encoded);
            continue;
        }
        // TypeProto -> tensor_type (1) -> shape (2) -> dim (1, repeated).
        let mut ty = Vec::new();
        for tf in parse_fields(&f.payload)? {
            if tf.number != 1 {
                ty.extend_from_slice(&tf.encoded);
                continue;
            }
            let mut tensor = Vec::new();
            for sf in parse_fields(&tf.payload)? {
                if sf.number != 2 {
                    tensor.extend_from_slice(&sf.encoded);
                    continue;
                }
                let mut shape = Vec::new();
                let mut i = 0;
                for df in parse_fields(&sf.payload)? {
                    if df.number == 1 {
                        if i == 1 {
                            let mut dim = Vec::new();
                            put_varint_field(&mut dim, 1, 1);
                            put_bytes(&mut shape, 1, &dim);
                        } else {
                            shape.extend_from_slice(&df.encoded);
                        }
                        i += 1;
                    } else {
                        shape.extend_from_slice(&df.encoded);
                    }
                }
                put_bytes(&mut tensor, 2, &shape);
            }
            put_bytes(&mut ty, 1, &tensor);
        }
        put_bytes(&mut out, 2, &ty);
    }
    Some(out)
}

/// Initializer data up to this size is copied into a rewritten model rather than referenced.
const INLINE_TENSOR_BYTES: u64 = 1024;

/// Reads one `TensorProto` field body (length prefix next) and re-encodes it as a graph
/// initializer field whose inline `raw_data`, when larger than `INLINE_TENSOR_BYTES`, is
/// replaced by an external reference to the same bytes of `location`. The body must end
/// by `graph_end`.
fn externalize_tensor<R: Read + Seek>(w: &mut Wire<R>, graph_end: u64, location: &str) -> std::io::Result<Vec<u8>> {
    let end = w.body_end(graph_end)?;
    let mut tensor = Vec::new();
    let mut raw: Option<(u64, u64)> = None;
    while let Some((f, wt)) = w.field(end)? {
        if f == TENSOR_RAW_DATA && wt == 2 {
            let data_end = w.body_end(end)?;
            let offset = w.r.stream_position()?;
            let len = data_end - offset;
            if len <= INLINE_TENSOR_BYTES {
                // Small tensors (axes, shapes, scalars) stay inline: ONNX shape inference
                // reads them while the graph loads and cannot read external data.
                let mut data = vec![0; len as usize];
                w.r.read_exact(&mut data)?;
                put_bytes(&mut tensor, TENSOR_RAW_DATA, &data);
            } else {
                w.r.seek(SeekFrom::Start(data_end))?;
                raw = Some((offset, len));
            }
            continue;
        }
        put_varint(&mut tensor, f << 3 | u64::from(wt));
        match wt {
            0 => put_varint(&mut tensor, w.varint()?.unwrap_or(0)),
            1 => {
                let mut b = [0u8; 8];
                w.r.read_exact(&mut b)?;
                tensor.extend_from_slice(&b);
            }
            5 => {
                let mut b = [0u8; 4];
                w.r.read_exact(&mut b)?;
                tensor.extend_from_slice(&b);
            }
            2 => {
                let body = w.bytes_exact(end)?;
                put_varint(&mut tensor, body.len() as u64);
                tensor.extend_from_slice(&body);
            }
            _ => return Err(std::io::ErrorKind::InvalidData.into()),
        }
    }
    if let Some((offset, len)) = raw {
        for (k, v) in [("location", location.to_string()), ("offset", offset.to_string()), ("length", len.to_string())]
        {
            let mut entry = Vec::new();
            put_bytes(&mut entry, 1, k.as_bytes());
            put_bytes(&mut entry, 2, v.as_bytes());
            put_bytes(&mut tensor, TENSOR_EXTERNAL_DATA, &entry);
        }
        put_varint_field(&mut tensor, TENSOR_DATA_LOCATION, 1);
    }
    let mut out = Vec::new();
    put_bytes(&mut out, GRAPH_INITIALIZER, &tensor);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `bytes` written to a file of its own, for the readers that take a path.
    fn temp_model(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("lfm-onnx-proto-{}-{name}.onnx", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// Files whose length prefixes run past the end: each must be refused as a malformed
    /// model, not seek backwards forever (a length that wraps to a negative offset) nor
    /// allocate what the prefix claims (terabytes).
    #[test]
    fn lengths_past_the_end_are_refused() {
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        // Field 1 (wire 2) of 2^64 - 11 bytes: once a seek of -11 bytes, back to the start.
        let mut wrap = vec![0x0A];
        put_varint(&mut wrap, u64::MAX - 10);
        cases.push(("wrap", wrap));
        // Field 1 of 2^42 bytes, then 3 bytes.
        let mut huge = vec![0x0A];
        put_varint(&mut huge, 1 << 42);
        huge.extend_from_slice(b"xyz");
        cases.push(("huge", huge));
        // A graph whose node claims more bytes than the graph holds.
        let mut node = Vec::new();
        put_varint(&mut node, NODE_OP_TYPE << 3 | 2);
        put_varint(&mut node, u64::MAX);
        let mut graph = Vec::new();
        put_bytes(&mut graph, GRAPH_NODE, &node);
        let mut nested = Vec::new();
        put_bytes(&mut nested, MODEL_GRAPH, &graph);
        cases.push(("nested", nested));
        // A graph initializer whose raw data claims 2^63 bytes.
        let mut tensor = Vec::new();
        put_varint(&mut tensor, TENSOR_RAW_DATA << 3 | 2);
        put_varint(&mut tensor, 1 << 63);
        let mut graph = Vec::new();
        put_bytes(&mut graph, GRAPH_INITIALIZER, &tensor);
        let mut init = Vec::new();
        put_bytes(&mut init, MODEL_GRAPH, &graph);
        cases.push(("initializer", init));
        // Which readers reach the bad length: (graph_nodes, ModelParts::read, parse_fields).
        let reach = [(true, true, true), (true, true, true), (true, false, false), (false, true, false)];
        for ((name, bytes), (in_nodes, in_parts, in_fields)) in cases.iter().zip(reach) {
            let p = temp_model(name, bytes);
            let nodes = graph_nodes(&p);
            let parts = ModelParts::read(&p);
            std::fs::remove_file(&p).unwrap();
            assert_eq!(matches!(nodes, Err(Error::ModelLoad { .. })), in_nodes, "{name}: {nodes:?}");
            assert_eq!(matches!(parts, Err(Error::ModelLoad { .. })), in_parts, "{name}");
            assert_eq!(parse_fields(bytes).is_none(), in_fields, "{name}");
        }
    }

    #[test]
    fn well_formed_fields_still_parse() {
        let mut buf = Vec::new();
        put_bytes(&mut buf, 4, b"Add");
        put_varint_field(&mut buf, 2, 7);
        buf.extend_from_slice(&[1 << 3 | 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        let fields = parse_fields(&buf).unwrap();
        assert_eq!(fields.iter().map(|f| (f.number, f.wire)).collect::<Vec<_>>(), [(4, 2), (2, 0), (1, 1)]);
        assert_eq!(fields[0].payload, b"Add");
        // A fixed-size value cut short.
        assert!(parse_fields(&buf[..buf.len() - 1]).is_none());
    }

    #[test]
    fn lists_the_tiny_decoder_ops() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/tiny6/onnx/decoder_model_merged.onnx");
        let nodes = graph_nodes(&p).unwrap();
        assert!(nodes.iter().any(|n| n.op == "MatMul"));
        assert!(nodes.iter().any(|n| n.op == "Softmax"));
        assert!(!nodes.iter().any(|n| n.op == "GroupQueryAttention"));
    }

    #[test]
    fn reads_the_wiring_of_group_query_attention() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/tiny16-gqa/onnx/decoder_model_merged.onnx");
        let nodes = graph_nodes(&p).unwrap();
        let gqa: Vec<&GraphNode> = nodes.iter().filter(|n| n.op == "GroupQueryAttention").collect();
        assert_eq!(gqa.len(), 6);
        assert!(gqa.iter().all(|n| n.domain == "com.microsoft"));
        assert_eq!(gqa[0].inputs[3], "past_key_values.2.key");
        assert_eq!(gqa[0].outputs[1], "present.2.key");
    }
}

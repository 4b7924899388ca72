//! Just enough of the ONNX protobuf wire format to list a graph's operators without
//! loading its weights: the decoder is inspected for how it derives per-row positions.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::error::{Error, Result};

const MODEL_GRAPH: u64 = 7;
const GRAPH_NODE: u64 = 1;
const NODE_OP_TYPE: u64 = 4;
const NODE_DOMAIN: u64 = 7;

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

    fn skip(&mut self, wire: u8) -> std::io::Result<()> {
        match wire {
            0 => {
                self.varint()?;
            }
            1 => {
                self.r.seek(SeekFrom::Current(8))?;
            }
            2 => {
                let n = self.varint()?.unwrap_or(0);
                self.r.seek(SeekFrom::Current(n as i64))?;
            }
            5 => {
                self.r.seek(SeekFrom::Current(4))?;
            }
            _ => return Err(std::io::ErrorKind::InvalidData.into()),
        }
        Ok(())
    }

    fn bytes(&mut self) -> std::io::Result<Vec<u8>> {
        let n = self.varint()?.unwrap_or(0) as usize;
        let mut v = vec![0; n.min(1 << 20)];
        self.r.read_exact(&mut v)?;
        if n > v.len() {
            self.r.seek(SeekFrom::Current((n - v.len()) as i64))?;
        }
        Ok(v)
    }
}

/// `(domain, op_type)` of every node of the main graph, in file order.
pub fn graph_ops(path: &Path) -> Result<Vec<(String, String)>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut w = Wire { r: BufReader::new(file) };
    let bad = |e: std::io::Error| Error::model_load(path, format!("not an ONNX model: {e}"));
    let mut ops = Vec::new();
    while let Some((f, wt)) = w.field(len).map_err(bad)? {
        if f == MODEL_GRAPH && wt == 2 {
            let n = w.varint().map_err(bad)?.unwrap_or(0);
            let end = w.r.stream_position().map_err(bad)? + n;
            while let Some((gf, gwt)) = w.field(end).map_err(bad)? {
                if gf == GRAPH_NODE && gwt == 2 {
                    let n = w.varint().map_err(bad)?.unwrap_or(0);
                    let node_end = w.r.stream_position().map_err(bad)? + n;
                    let (mut op, mut domain) = (String::new(), String::new());
                    while let Some((nf, nwt)) = w.field(node_end).map_err(bad)? {
                        match (nf, nwt) {
                            (NODE_OP_TYPE, 2) => op = String::from_utf8_lossy(&w.bytes().map_err(bad)?).into_owned(),
                            (NODE_DOMAIN, 2) => domain = String::from_utf8_lossy(&w.bytes().map_err(bad)?).into_owned(),
                            _ => w.skip(nwt).map_err(bad)?,
                        }
                    }
                    ops.push((domain, op));
                } else {
                    w.skip(gwt).map_err(bad)?;
                }
            }
            return Ok(ops);
        }
        w.skip(wt).map_err(bad)?;
    }
    Err(Error::model_load(path, "not an ONNX model: no graph"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_the_tiny_decoder_ops() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/tiny6/onnx/decoder_model_merged.onnx");
        let ops = graph_ops(&p).unwrap();
        assert!(ops.iter().any(|(_, op)| op == "MatMul"));
        assert!(ops.iter().any(|(_, op)| op == "Softmax"));
        assert!(!ops.iter().any(|(_, op)| op == "GroupQueryAttention"));
    }
}

//! Everything that touches ONNX Runtime.

pub mod batch;
pub mod graph;
mod graph_view;
mod last_position;
pub mod model;
pub mod onnx_proto;
pub mod tensor;
pub mod vision_fusion;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{Error, Result};

pub use batch::{BatchCache, BatchSemantics};
pub use graph::SessionConfig;
pub use model::{GraphPaths, HybridCache, LayerKind, Model, ModelSpec};

static ORT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();

/// Loads the ONNX Runtime shared library once per process: `library` when given, else
/// `$ORT_DYLIB_PATH`. Later calls return the first outcome.
pub fn init(library: Option<&Path>) -> Result<PathBuf> {
    let outcome = ORT.get_or_init(|| {
        let path = match library {
            Some(p) => p.to_path_buf(),
            None => match std::env::var_os("ORT_DYLIB_PATH") {
                Some(p) => PathBuf::from(p),
                None => {
                    return Err("ONNX Runtime was not found: install the `onnxruntime` package or set \
                                ORT_DYLIB_PATH to libonnxruntime's path"
                        .to_string());
                }
            },
        };
        if !path.is_file() {
            return Err(format!("ONNX Runtime library {} does not exist", path.display()));
        }
        match ort::init_from(&path) {
            Ok(builder) => {
                builder.with_name("lfm").commit();
                Ok(path)
            }
            Err(e) => Err(format!("cannot load ONNX Runtime from {}: {e}", path.display())),
        }
    });
    outcome.clone().map_err(|detail| Error::model_load(library.map(Path::to_path_buf).unwrap_or_default(), detail))
}

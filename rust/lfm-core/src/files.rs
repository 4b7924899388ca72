//! Finding a model's files on disk, in the Hugging Face layout (graphs under `onnx/`,
//! tokenizer and configs at the root) or a flat one (everything in one folder).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::options::{GraphKind, Variant};
use crate::runtime::GraphPaths;

/// The real model's small files, bundled (LFM Open License v1.0, see assets/NOTICE.md).
pub mod bundled {
    pub const CONFIG_JSON: &str = include_str!("../assets/config.json");
    pub const TOKENIZER_CONFIG_JSON: &str = include_str!("../assets/tokenizer_config.json");
    pub const CHAT_TEMPLATE_JINJA: &str = include_str!("../assets/chat_template.jinja");
    pub const PREPROCESSOR_CONFIG_JSON: &str = include_str!("../assets/preprocessor_config.json");
    pub const PROCESSOR_CONFIG_JSON: &str = include_str!("../assets/processor_config.json");
    /// The LFM2.5-VL-450M tokenizer (provenance and licence in assets/NOTICE.md).
    pub const TOKENIZER_JSON: &[u8] = include_bytes!("../assets/tokenizer.json");
    pub const TOKENIZER_JSON_SHA256: &str = "f3910942aa907c48b0cc20ec426ee38bfa8dcda8feecf035ced981918cb30f14";
}

/// Every file an engine loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    pub graphs: GraphPaths,
    /// `None`: the bundled LFM2.5-VL-450M tokenizer.
    pub tokenizer: Option<PathBuf>,
    pub tokenizer_config: Option<PathBuf>,
    pub chat_template: Option<PathBuf>,
}

fn graph_file(dir: &Path, kind: GraphKind, variant: &Variant) -> PathBuf {
    dir.join(format!("{}{}.onnx", kind.stem(), variant.precision(kind).file_suffix()))
}

fn optional(path: PathBuf) -> Option<PathBuf> {
    path.is_file().then_some(path)
}

impl ModelFiles {
    /// Resolves the files of a model folder; `onnx/` is used when it exists.
    pub fn from_dir(dir: &Path, variant: &Variant) -> Result<ModelFiles> {
        if !dir.exists() {
            return Err(Error::NotFound { path: dir.to_path_buf() });
        }
        if !dir.is_dir() {
            return Err(Error::model_load(dir, "expected a model folder, found a file"));
        }
        let onnx = dir.join("onnx");
        let graph_dir = if onnx.is_dir() { onnx } else { dir.to_path_buf() };
        let graphs = Self::graphs_in(&graph_dir, variant)?;
        let tokenizer = dir.join("tokenizer.json");
        if !tokenizer.is_file() {
            return Err(Error::model_load(
                &tokenizer,
                "missing: a model folder needs tokenizer.json next to its configs",
            ));
        }
        Ok(ModelFiles {
            graphs,
            tokenizer: Some(tokenizer),
            tokenizer_config: optional(dir.join("tokenizer_config.json")),
            chat_template: optional(dir.join("chat_template.jinja")),
        })
    }

    /// The three graphs alone (in `dir` or `dir/onnx`); tokenizer, chat template and
    /// configs come from the bundled copies of the real model's files.
    pub fn from_onnx_dir(dir: &Path, variant: &Variant) -> Result<ModelFiles> {
        if !dir.exists() {
            return Err(Error::NotFound { path: dir.to_path_buf() });
        }
        let onnx = dir.join("onnx");
        let graph_dir = if onnx.is_dir() { onnx } else { dir.to_path_buf() };
        Ok(ModelFiles {
            graphs: Self::graphs_in(&graph_dir, variant)?,
            tokenizer: None,
            tokenizer_config: None,
            chat_template: None,
        })
    }

    /// The three graphs of `variant` in `dir`, each of which must exist.
    pub fn graphs_in(dir: &Path, variant: &Variant) -> Result<GraphPaths> {
        let find = |kind| {
            let p = graph_file(dir, kind, variant);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::model_load(&p, format!("missing: the {} graph of this variant", kind.stem())))
            }
        };
        Ok(GraphPaths {
            vision_encoder: find(GraphKind::VisionEncoder)?,
            embed_tokens: find(GraphKind::EmbedTokens)?,
            decoder: find(GraphKind::Decoder)?,
        })
    }
}

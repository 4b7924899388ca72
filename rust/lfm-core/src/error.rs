//! The one error type of lfm-core.
//!
//! Each variant carries what a caller needs to act: the offending value and the limit it
//! broke. The Python binding maps every variant to one exception class, exhaustively.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in lfm-core.
///
/// Deliberately not `#[non_exhaustive]`: the crate is workspace-internal, and the Python
/// binding's mapping must fail to compile when a variant is added, not fall into a
/// catch-all arm.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An option value is out of range or of the wrong kind.
    #[error("invalid option `{field}`: got {value}, expected {expected}")]
    InvalidOption { field: String, value: String, expected: String },

    /// An image could not be decoded (corrupt, truncated, unsupported format).
    #[error("cannot decode image: {detail}")]
    ImageDecode { detail: String },

    /// An image is larger than a configured limit (checked from the header, before decoding).
    #[error("image {field} is {value}, over the limit of {limit}")]
    ImageTooLarge { field: &'static str, value: u64, limit: u64 },

    /// An image has a zero side.
    #[error("image of {width}x{height} pixels has no area")]
    ImageTooSmall { width: u32, height: u32 },

    /// No tile grid fits the image budget (extreme aspect ratios).
    #[error(
        "image of {width}x{height} pixels needs {tokens} image tokens in one tile, over the limit of {limit}; \
         its aspect ratio is too extreme"
    )]
    TileGridImpossible { width: u32, height: u32, tokens: usize, limit: usize },

    /// An image was given in a form that cannot be used (wrong shape, wrong dtype).
    #[error("invalid image input: {detail}")]
    ImageInput { detail: String },

    /// The request is malformed or breaks a limit (shape, roles, placeholders, special tokens).
    #[error("request rejected: {reason}")]
    RequestRejected { field: String, value: String, limit: String, reason: String },

    /// The prompt plus the requested new tokens exceed the context window.
    #[error(
        "the prompt needs at least {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} that exceeds \
         the context of {limit} tokens"
    )]
    PromptTooLong { prompt_tokens: usize, max_new_tokens: usize, limit: usize },

    /// A grammar (JSON Schema, Lark, regex) was rejected.
    #[error("invalid grammar: {detail}")]
    Grammar { detail: String },

    /// The model's output does not parse as the task expects.
    #[error("cannot parse model output: {detail}")]
    Parse { detail: String },

    /// A model file is missing a required piece or breaks the expected contract.
    #[error("cannot load model file {}: {detail}", path.display())]
    ModelLoad { path: PathBuf, detail: String },

    /// A path does not exist.
    #[error("no such file or directory: {}", path.display())]
    NotFound { path: PathBuf },

    /// An I/O failure other than a missing path.
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    /// ONNX Runtime failed, or a graph produced an unusable output.
    #[error("inference failed in {stage}: {detail}")]
    Inference { stage: &'static str, detail: String },

    /// A broken invariant or a caught panic: a bug in lfm.
    #[error("internal error (a bug in lfm, please report it): {0}")]
    Internal(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidOption`].
    pub fn option(field: impl Into<String>, value: impl ToString, expected: impl Into<String>) -> Self {
        Error::InvalidOption { field: field.into(), value: value.to_string(), expected: expected.into() }
    }

    /// Shorthand for [`Error::RequestRejected`].
    pub fn rejected(
        field: impl Into<String>,
        value: impl ToString,
        limit: impl ToString,
        reason: impl Into<String>,
    ) -> Self {
        Error::RequestRejected {
            field: field.into(),
            value: value.to_string(),
            limit: limit.to_string(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::ModelLoad`].
    pub fn model_load(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        Error::ModelLoad { path: path.into(), detail: detail.into() }
    }

    /// Maps an I/O error on `path`, keeping "not found" distinct.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound { path }
        } else {
            Error::Io { path, source }
        }
    }

    /// Shorthand for [`Error::Inference`].
    pub fn inference(stage: &'static str, detail: impl ToString) -> Self {
        Error::Inference { stage, detail: detail.to_string() }
    }
}

/// Runs `f`, turning a panic into [`Error::Internal`] so that no panic crosses an API edge.
pub fn catch_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(Error::Internal(format!("panic in {what}: {}", panic_message(&*payload)))),
    }
}

/// The message a panic carried, when it carried text.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

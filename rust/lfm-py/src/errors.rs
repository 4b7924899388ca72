//! The one mapping from `lfm_core::Error` to the exception classes of `lfm.errors`.

use lfm_core::Error;
use pyo3::exceptions::{PyFileNotFoundError, PyOSError};
use pyo3::prelude::*;

/// Builds `lfm.errors.<class_name>(message)` with its attributes set.
fn lfm_error(py: Python<'_>, class_name: &str, message: String, attrs: &[(&str, Option<String>)]) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let cls = py.import("lfm.errors")?.getattr(class_name)?;
        let exc = cls.call1((message.clone(),))?;
        for (k, v) in attrs {
            exc.setattr(*k, v.clone())?;
        }
        Ok(PyErr::from_value(exc))
    };
    build().unwrap_or_else(|e| e)
}

/// Exhaustive by design: a new core error must choose its Python class here.
pub fn to_py_err(py: Python<'_>, e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::InvalidOption { field, value, expected } => lfm_error(
            py,
            "InvalidOptionsError",
            msg,
            &[("field", Some(field)), ("value", Some(value)), ("limit", Some(expected))],
        ),
        Error::ImageDecode { .. } | Error::ImageInput { .. } => lfm_error(py, "ImageError", msg, &[]),
        Error::ImageTooLarge { field, value, limit } => lfm_error(
            py,
            "ImageError",
            msg,
            &[
                ("field", Some(field.to_string())),
                ("value", Some(value.to_string())),
                ("limit", Some(limit.to_string())),
            ],
        ),
        Error::ImageTooSmall { width, height } => lfm_error(
            py,
            "ImageError",
            msg,
            &[
                ("field", Some("size".into())),
                ("value", Some(format!("{width}x{height}"))),
                ("limit", Some("1x1".into())),
            ],
        ),
        Error::TileGridImpossible { width, height, tokens, limit } => lfm_error(
            py,
            "ImageError",
            msg,
            &[
                ("field", Some("image tokens".into())),
                ("value", Some(format!("{tokens} ({width}x{height})"))),
                ("limit", Some(limit.to_string())),
            ],
        ),
        Error::RequestRejected { field, value, limit, .. } => lfm_error(
            py,
            "RequestRejectedError",
            msg,
            &[("field", Some(field)), ("value", Some(value)), ("limit", Some(limit))],
        ),
        Error::PromptTooLong { prompt_tokens, max_new_tokens, limit } => lfm_error(
            py,
            "PromptTooLongError",
            msg,
            &[
                ("field", Some("prompt_tokens".into())),
                ("value", Some((prompt_tokens + max_new_tokens).to_string())),
                ("limit", Some(limit.to_string())),
            ],
        ),
        Error::Grammar { .. } => lfm_error(py, "GrammarError", msg, &[]),
        Error::Parse { .. } => lfm_error(py, "ParseError", msg, &[]),
        Error::ModelLoad { path, .. } => {
            lfm_error(py, "ModelLoadError", msg, &[("path", Some(path.display().to_string()))])
        }
        Error::NotFound { path } => PyFileNotFoundError::new_err((2, msg, path.display().to_string())),
        Error::Io { path, source } => {
            PyOSError::new_err((source.raw_os_error().unwrap_or(0), msg, path.display().to_string()))
        }
        Error::Inference { .. } => lfm_error(py, "InferenceError", msg, &[]),
        Error::Internal(_) => lfm_error(py, "InternalError", msg, &[]),
    }
}

/// Runs a core call with the GIL released, turning a panic into `InternalError`.
pub fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> lfm_core::Result<T> + Send) -> PyResult<T> {
    py.detach(|| lfm_core::error::catch_panic("lfm core", f)).map_err(|e| to_py_err(py, e))
}

//! `lfm._lfm.Engine`: convert arguments, release the GIL, call the core, map the error.

use std::path::PathBuf;
use std::sync::Arc;

use lfm_core::engine::Engine as CoreEngine;
use lfm_core::files::ModelFiles;
use lfm_core::options::{self, EngineOptions, RequestOptions};
use lfm_core::request::{Cancel, Generation, ImageSource};
use numpy::PyArray1;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::errors::{detached, to_py_err};
use crate::images::image_source;

fn json(s: &str) -> PyResult<serde_json::Value> {
    serde_json::from_str(s).map_err(|e| PyValueError::new_err(format!("messages are not JSON-serialisable: {e}")))
}

fn sources(images: &Bound<'_, PyList>) -> PyResult<Vec<ImageSource>> {
    images.iter().map(|i| image_source(&i)).collect()
}

/// Loads ONNX Runtime from `path` (once per process); returns the path in use.
#[pyfunction]
pub fn init_ort(py: Python<'_>, path: Option<PathBuf>) -> PyResult<String> {
    detached(py, || lfm_core::runtime::init(path.as_deref())).map(|p| p.display().to_string())
}

/// A cancellation handle shared with a running request.
#[pyclass(frozen, module = "lfm._lfm")]
pub struct CancelToken {
    pub inner: Cancel,
}

#[pymethods]
impl CancelToken {
    #[new]
    #[pyo3(signature = (timeout_s=None))]
    fn new(timeout_s: Option<f64>) -> Self {
        CancelToken { inner: Cancel::new().with_timeout(timeout_s) }
    }

    fn cancel(&self) {
        self.inner.cancel();
    }

    fn is_cancelled(&self) -> bool {
        self.inner.is_cancelled()
    }
}

#[pyclass(frozen, module = "lfm._lfm", name = "Engine")]
pub struct PyEngine {
    inner: Arc<CoreEngine>,
}

fn generation_dict<'py>(py: Python<'py>, g: Generation) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("text", g.text)?;
    d.set_item("token_ids", g.token_ids)?;
    d.set_item("finish_reason", g.finish_reason.as_str())?;
    d.set_item("prompt_tokens", g.usage.prompt_tokens)?;
    d.set_item("image_tokens", g.usage.image_tokens)?;
    d.set_item("completion_tokens", g.usage.completion_tokens)?;
    d.set_item("preprocess_s", g.timings.preprocess_s)?;
    d.set_item("vision_s", g.timings.vision_s)?;
    d.set_item("prefill_s", g.timings.prefill_s)?;
    d.set_item("decode_s", g.timings.decode_s)?;
    Ok(d)
}

#[pymethods]
impl PyEngine {
    /// Loads a model folder (HF or flat layout) with options given as JSON.
    #[staticmethod]
    fn from_dir(py: Python<'_>, path: PathBuf, options_json: &str) -> PyResult<Self> {
        let opts: EngineOptions = options::from_json("engine", options_json).map_err(|e| to_py_err(py, e))?;
        let engine = detached(py, move || {
            let files = ModelFiles::from_dir(&path, &opts.variant)?;
            CoreEngine::load(&files, opts)
        })?;
        Ok(PyEngine { inner: Arc::new(engine) })
    }

    /// Widths read from the graphs.
    fn spec<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.spec();
        let d = PyDict::new(py);
        d.set_item("hidden", s.hidden)?;
        d.set_item("vocab", s.vocab)?;
        d.set_item("num_layers", s.layers.len())?;
        let kinds: Vec<&str> =
            s.layers.iter().map(|k| if matches!(k, lfm_core::runtime::LayerKind::Conv) { "conv" } else { "attention" }).collect();
        d.set_item("layer_types", kinds)?;
        d.set_item("conv_channels", s.conv_channels)?;
        d.set_item("conv_width", s.conv_width)?;
        d.set_item("kv_heads", s.kv_heads)?;
        d.set_item("head_dim", s.head_dim)?;
        d.set_item("tokenizer_vocab", self.inner.tokenizer().vocab_size)?;
        d.set_item("eos_token_id", self.inner.tokenizer().special.eos)?;
        Ok(d)
    }

    #[pyo3(signature = (messages_json, tools_json=None, add_generation_prompt=true))]
    fn apply_chat_template(&self, py: Python<'_>, messages_json: &str, tools_json: Option<&str>, add_generation_prompt: bool) -> PyResult<String> {
        let messages = json(messages_json)?;
        let tools = tools_json.map(json).transpose()?;
        let engine = self.inner.clone();
        detached(py, move || engine.render(&messages, tools.as_ref(), add_generation_prompt))
    }

    fn encode_prompt(&self, py: Python<'_>, messages_json: &str, images: &Bound<'_, PyList>) -> PyResult<Vec<u32>> {
        let messages = json(messages_json)?;
        let srcs = sources(images)?;
        let engine = self.inner.clone();
        detached(py, move || engine.encode_prompt(&messages, srcs))
    }

    fn next_token_logits<'py>(&self, py: Python<'py>, messages_json: &str, images: &Bound<'py, PyList>) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let messages = json(messages_json)?;
        let srcs = sources(images)?;
        let engine = self.inner.clone();
        let row = detached(py, move || engine.next_token_logits(&messages, srcs))?;
        Ok(PyArray1::from_vec(py, row))
    }

    /// Generates; returns a dict the Python layer turns into `lfm.Generation`.
    #[pyo3(signature = (messages_json, images, options_json, cancel=None))]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        messages_json: &str,
        images: &Bound<'py, PyList>,
        options_json: &str,
        cancel: Option<&Bound<'py, CancelToken>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let messages = json(messages_json)?;
        let srcs = sources(images)?;
        let opts: RequestOptions = options::from_json("request", options_json).map_err(|e| to_py_err(py, e))?;
        let cancel = match cancel {
            Some(c) => c.get().inner.clone(),
            None => Cancel::new().with_timeout(opts.timeout_s),
        };
        let engine = self.inner.clone();
        let g = detached(py, move || engine.generate(&messages, srcs, &opts, &cancel, None))?;
        generation_dict(py, g)
    }
}

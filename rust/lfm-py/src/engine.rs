//! `lfm._lfm.Engine`: convert arguments, release the GIL, call the core, map the error.
//! Generation runs on a worker thread while the calling thread waits with the GIL
//! released, waking every 50 ms to let Ctrl-C through (the request is then cancelled
//! between two decode steps).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use lfm_core::engine::Engine as CoreEngine;
use lfm_core::files::ModelFiles;
use lfm_core::grammar::Grammar;
use lfm_core::options::{self, EngineOptions, RequestOptions};
use lfm_core::request::{Cancel, Closer, Generation, ImageSource};
use lfm_core::runtime::model::Prefill;
use lfm_core::scheduler::{Job, Scheduler};
use lfm_core::sequence::TextSink;
use numpy::PyArray1;
use pyo3::exceptions::{PyStopIteration, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::errors::{detached, to_py_err};
use crate::images::image_source;

fn json(s: &str) -> PyResult<serde_json::Value> {
    serde_json::from_str(s).map_err(|e| PyValueError::new_err(format!("not valid JSON: {e}")))
}

fn sources(images: &Bound<'_, PyList>) -> PyResult<Vec<ImageSource>> {
    images.iter().map(|i| image_source(&i)).collect()
}

/// `(kind, source)` from Python to a core grammar.
pub fn grammar(kind: &str, source: &str) -> PyResult<Grammar> {
    match kind {
        "json_schema" => Ok(Grammar::JsonSchema(json(source)?)),
        "lark" => Ok(Grammar::Lark(source.to_string())),
        "regex" => Ok(Grammar::Regex(source.to_string())),
        other => Err(PyValueError::new_err(format!("unknown grammar kind {other:?}"))),
    }
}

/// Compiles a grammar against a byte vocabulary; raises `GrammarError` on any problem.
#[pyfunction]
pub fn check_grammar(py: Python<'_>, kind: &str, source: &str) -> PyResult<()> {
    let g = grammar(kind, source)?;
    detached(py, move || g.check())
}

/// Cancels every request in the process and waits (at most `timeout_s`) until no
/// scheduler thread runs ONNX Runtime: lfm registers it to run at interpreter exit.
#[pyfunction]
pub fn shutdown(py: Python<'_>, timeout_s: f64) -> PyResult<bool> {
    let timeout = std::time::Duration::try_from_secs_f64(timeout_s.clamp(0.0, 3600.0)).unwrap_or_default();
    detached(py, move || {
        lfm_core::request::shut_down();
        Ok(lfm_core::scheduler::wait_idle(timeout))
    })
}

/// Execution providers the loaded ONNX Runtime offers (lfm's names).
#[pyfunction]
pub fn available_providers() -> Vec<&'static str> {
    lfm_core::runtime::graph::available_providers()
}

/// Loads ONNX Runtime from `path` (once per process); returns the path in use.
#[pyfunction]
pub fn init_ort(py: Python<'_>, path: Option<PathBuf>) -> PyResult<String> {
    detached(py, || lfm_core::runtime::init(path.as_deref())).map(|p| p.display().to_string())
}

enum Event {
    Text(String),
    Done(lfm_core::Result<Generation>),
}

/// Everything one generation needs, owned, so it can move to the scheduler thread.
struct Request {
    messages: serde_json::Value,
    images: Vec<ImageSource>,
    options: RequestOptions,
    grammar: Option<Grammar>,
    cancel: Cancel,
}

/// Submits a request to the engine's scheduler; events arrive on the returned channel.
fn submit(scheduler: &Scheduler, req: Request, stream: bool) -> Receiver<Event> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let text_tx = tx.clone();
    let sink: Option<TextSink> =
        stream.then(|| Box::new(move |delta: &str| text_tx.send(Event::Text(delta.to_string())).is_ok()) as TextSink);
    scheduler.submit(Job {
        messages: req.messages,
        images: req.images,
        options: req.options,
        grammar: req.grammar,
        cancel: req.cancel,
        sink,
        reply: Box::new(move |result| {
            let _ = tx.send(Event::Done(result));
        }),
    });
    rx
}

/// Waits for the next event with the GIL released; Ctrl-C cancels the request, waits for
/// the worker to stop, and raises `KeyboardInterrupt`.
fn next_event(py: Python<'_>, rx: &Receiver<Event>, cancel: &Cancel) -> PyResult<Event> {
    loop {
        match py.detach(|| rx.recv_timeout(Duration::from_millis(50))) {
            Ok(ev) => return Ok(ev),
            Err(RecvTimeoutError::Timeout) => {
                if let Err(interrupt) = py.check_signals() {
                    cancel.cancel();
                    py.detach(|| {
                        while let Ok(ev) = rx.recv() {
                            if matches!(ev, Event::Done(_)) {
                                break;
                            }
                        }
                    });
                    return Err(interrupt);
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(to_py_err(py, lfm_core::Error::Internal("the generation thread vanished".into())));
            }
        }
    }
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
    let ends: Vec<(String, String, &str)> = g
        .field_ends
        .into_iter()
        .map(|f| (f.key, f.text, if f.closed_by == Closer::Model { "model" } else { "grammar" }))
        .collect();
    d.set_item("field_ends", ends)?;
    Ok(d)
}

/// A running generation whose text arrives piece by piece.
#[pyclass(frozen, module = "lfm._lfm")]
pub struct Stream {
    rx: Mutex<Option<Receiver<Event>>>,
    cancel: Cancel,
    result: Mutex<Option<Py<PyDict>>>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        // Abandoned streams stop their worker at the next decode step.
        self.cancel.cancel();
    }
}

#[pymethods]
impl Stream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<String> {
        // Never wait for the lock: its holder waits for the GIL this thread holds.
        let mut guard =
            self.rx.try_lock().map_err(|_| PyValueError::new_err("stream used from two threads at once"))?;
        let Some(rx) = guard.as_ref() else {
            return Err(PyStopIteration::new_err(()));
        };
        match next_event(py, rx, &self.cancel) {
            Ok(Event::Text(t)) => Ok(t),
            Ok(Event::Done(result)) => {
                *guard = None;
                let g = result.map_err(|e| to_py_err(py, e))?;
                *self.result.lock().map_err(|_| PyValueError::new_err("poisoned"))? =
                    Some(generation_dict(py, g)?.unbind());
                Err(PyStopIteration::new_err(()))
            }
            Err(e) => {
                *guard = None;
                Err(e)
            }
        }
    }

    /// Waits (GIL released, Ctrl-C cancels) until the generation ends; returns its dict.
    /// Text pieces not yet taken are dropped.
    fn wait<'py>(&self, py: Python<'py>) -> PyResult<Py<PyDict>> {
        loop {
            if let Some(d) = self.result(py) {
                return Ok(d);
            }
            match self.__next__(py) {
                Ok(_) => continue,
                Err(e) if e.is_instance_of::<PyStopIteration>(py) => {
                    return self.result(py).ok_or_else(|| PyValueError::new_err("the stream ended without a result"));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The finished generation (a dict), or None before the stream is exhausted.
    fn result(&self, py: Python<'_>) -> Option<Py<PyDict>> {
        self.result.lock().ok().and_then(|r| r.as_ref().map(|d| d.clone_ref(py)))
    }

    fn cancel(&self) {
        self.cancel.cancel();
    }
}

#[pyclass(frozen, module = "lfm._lfm", name = "Engine")]
pub struct PyEngine {
    inner: Arc<CoreEngine>,
    scheduler: Scheduler,
    warned: AtomicBool,
}

impl PyEngine {
    fn request(
        &self,
        messages_json: &str,
        images: &Bound<'_, PyList>,
        options_json: &str,
        grammar_spec: Option<(String, String)>,
    ) -> PyResult<Request> {
        let py = images.py();
        let options: RequestOptions = options::from_json("request", options_json).map_err(|e| to_py_err(py, e))?;
        Ok(Request {
            messages: json(messages_json)?,
            images: sources(images)?,
            cancel: Cancel::new().with_timeout(options.timeout_s),
            grammar: grammar_spec.map(|(k, s)| grammar(&k, &s)).transpose()?,
            options,
        })
    }
}

impl PyEngine {
    /// Parses the options, resolves the files and loads the engine with the GIL released.
    fn load(
        py: Python<'_>,
        options_json: &str,
        files: impl FnOnce(&lfm_core::options::Variant) -> lfm_core::Result<ModelFiles> + Send,
    ) -> PyResult<Self> {
        let opts: EngineOptions = options::from_json("engine", options_json).map_err(|e| to_py_err(py, e))?;
        let engine = detached(py, move || {
            let files = files(&opts.variant)?;
            CoreEngine::load(&files, opts)
        })?;
        let inner = Arc::new(engine);
        Ok(PyEngine { scheduler: Scheduler::start(inner.clone()), inner, warned: AtomicBool::new(false) })
    }

    /// Issues `lfm.LfmWarning` once if the scheduler stopped batching on this model.
    fn warn_fallback(&self, py: Python<'_>) -> PyResult<()> {
        let reason = self.scheduler.fallback_reason.lock().ok().and_then(|r| r.clone());
        if let Some(reason) = reason
            && !self.warned.swap(true, Ordering::Relaxed)
        {
            let cls = py.import("lfm.errors")?.getattr("LfmWarning")?;
            PyErr::warn(py, &cls, &std::ffi::CString::new(reason).unwrap_or_default(), 1)?;
        }
        Ok(())
    }
}

#[pymethods]
impl PyEngine {
    /// Loads a model folder (HF or flat layout) with options given as JSON.
    #[staticmethod]
    fn from_dir(py: Python<'_>, path: PathBuf, options_json: &str) -> PyResult<Self> {
        Self::load(py, options_json, move |variant| ModelFiles::from_dir(&path, variant))
    }

    /// Loads the three graphs of a folder with the bundled tokenizer, template and configs.
    #[staticmethod]
    fn from_onnx_dir(py: Python<'_>, path: PathBuf, options_json: &str) -> PyResult<Self> {
        Self::load(py, options_json, move |variant| ModelFiles::from_onnx_dir(&path, variant))
    }

    /// Scheduler counters: decoder steps, sequence-steps, largest batch.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let st = &self.scheduler.stats;
        let d = PyDict::new(py);
        d.set_item("decoder_steps", st.steps.load(Ordering::Relaxed))?;
        d.set_item("sequence_steps", st.rows.load(Ordering::Relaxed))?;
        d.set_item("max_batch", st.max_batch.load(Ordering::Relaxed))?;
        Ok(d)
    }

    /// What loading could not honour (shown as `lfm.LfmWarning` by the Python layer).
    fn load_warnings(&self) -> Vec<String> {
        self.inner.model().warnings.clone()
    }

    /// Widths read from the graphs.
    fn spec<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.spec();
        let d = PyDict::new(py);
        d.set_item("hidden", s.hidden)?;
        d.set_item("vocab", s.vocab)?;
        d.set_item("num_layers", s.layers.len())?;
        let kinds: Vec<&str> = s
            .layers
            .iter()
            .map(|k| if matches!(k, lfm_core::runtime::LayerKind::Conv) { "conv" } else { "attention" })
            .collect();
        d.set_item("layer_types", kinds)?;
        d.set_item("conv_channels", s.conv_channels)?;
        d.set_item("conv_width", s.conv_width)?;
        d.set_item("kv_heads", s.kv_heads)?;
        d.set_item("head_dim", s.head_dim)?;
        d.set_item("tokenizer_vocab", self.inner.tokenizer().vocab_size)?;
        d.set_item("eos_token_id", self.inner.tokenizer().special.eos)?;
        let batching = match s.batching {
            lfm_core::runtime::BatchSemantics::MaskLengths => "mask_lengths",
            lfm_core::runtime::BatchSemantics::CacheWidth => "cache_width",
        };
        d.set_item("attention_rows", batching)?;
        d.set_item("kv_cache", if s.kv_in_place { "in_place" } else { "copied" })?;
        let prefill = match s.prefill {
            Prefill::OneRun => "one_run",
            Prefill::Chunked => "chunked",
            Prefill::InPlace => "in_place",
        };
        d.set_item("prefill", prefill)?;
        d.set_item("vision_attention", if s.vision_fused { "fused" } else { "as_exported" })?;
        d.set_item("last_position_ops", s.last_position_ops)?;
        d.set_item("prefill_window_ops", s.prefill_window_ops)?;
        Ok(d)
    }

    #[pyo3(signature = (messages_json, tools_json=None, add_generation_prompt=true))]
    fn apply_chat_template(
        &self,
        py: Python<'_>,
        messages_json: &str,
        tools_json: Option<&str>,
        add_generation_prompt: bool,
    ) -> PyResult<String> {
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

    fn next_token_logits<'py>(
        &self,
        py: Python<'py>,
        messages_json: &str,
        images: &Bound<'py, PyList>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let messages = json(messages_json)?;
        let srcs = sources(images)?;
        let engine = self.inner.clone();
        let row = detached(py, move || engine.next_token_logits(&messages, srcs))?;
        Ok(PyArray1::from_vec(py, row))
    }

    /// Compiles a grammar for this engine's tokenizer (raises `GrammarError`).
    fn check_grammar(&self, py: Python<'_>, kind: &str, source: &str) -> PyResult<()> {
        let g = grammar(kind, source)?;
        let engine = self.inner.clone();
        detached(py, move || engine.constraint(&g).map(|_| ()))
    }

    /// Generates; returns a dict the Python layer turns into `lfm.Generation`.
    #[pyo3(signature = (messages_json, images, options_json, grammar=None))]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        messages_json: &str,
        images: &Bound<'py, PyList>,
        options_json: &str,
        grammar: Option<(String, String)>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let req = self.request(messages_json, images, options_json, grammar)?;
        let cancel = req.cancel.clone();
        let rx = submit(&self.scheduler, req, false);
        loop {
            if let Event::Done(result) = next_event(py, &rx, &cancel)? {
                self.warn_fallback(py)?;
                return generation_dict(py, result.map_err(|e| to_py_err(py, e))?);
            }
        }
    }

    /// Starts a generation and returns its handle; with `text=True` its text arrives
    /// piece by piece through the handle's iterator.
    #[pyo3(signature = (messages_json, images, options_json, grammar=None, text=true))]
    fn stream(
        &self,
        messages_json: &str,
        images: &Bound<'_, PyList>,
        options_json: &str,
        grammar: Option<(String, String)>,
        text: bool,
    ) -> PyResult<Stream> {
        let req = self.request(messages_json, images, options_json, grammar)?;
        let cancel = req.cancel.clone();
        Ok(Stream { rx: Mutex::new(Some(submit(&self.scheduler, req, text))), cancel, result: Mutex::new(None) })
    }

    /// Issues the batching-fallback warning if it is due (after waiting on handles).
    fn check_warnings(&self, py: Python<'_>) -> PyResult<()> {
        self.warn_fallback(py)
    }
}

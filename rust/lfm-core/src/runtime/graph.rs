//! One ONNX graph: its session, and its inputs and outputs as read from the file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{RunOptions, Session};
use ort::value::{DynValue, TensorElementType, ValueType};

use crate::error::{Error, Result};

use super::tensor::FloatType;

/// An input or output of a graph: name, element type, and dims (-1 where symbolic).
#[derive(Debug, Clone, PartialEq)]
pub struct Port {
    pub name: String,
    pub ty: Option<TensorElementType>,
    pub dims: Vec<i64>,
}

impl Port {
    fn from_outlet(name: &str, ty: &ValueType) -> Port {
        Port {
            name: name.to_string(),
            ty: ty.tensor_type(),
            dims: ty.tensor_shape().map(|s| s.to_vec()).unwrap_or_default(),
        }
    }

    /// Fixed size of axis `i`, if the graph declares one.
    pub fn fixed(&self, i: usize) -> Option<usize> {
        self.dims.get(i).and_then(|&d| usize::try_from(d).ok())
    }

    pub fn float_type(&self) -> Option<FloatType> {
        self.ty.and_then(FloatType::from_ort)
    }

    fn describe(&self) -> String {
        let dims: Vec<String> = self.dims.iter().map(|d| if *d < 0 { "?".into() } else { d.to_string() }).collect();
        format!("{:?} [{}]", self.ty, dims.join(", "))
    }
}

/// What ONNX Runtime's memory arena does after a call (see `Graph::run`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    Keep,
    Release,
}

/// Session settings shared by the three graphs.
#[derive(Debug, Clone, Default)]
pub struct SessionConfig {
    pub intra_threads: Option<usize>,
    pub inter_threads: Option<usize>,
    /// Execution providers in order of preference (`"cpu"` is always the fallback).
    pub providers: Vec<String>,
}

fn provider(name: &str) -> Option<Box<dyn ort::ep::ExecutionProvider>> {
    use ort::ep;
    Some(match name {
        // TF32 matrix products would round fp32 graphs to 10-bit mantissas: results drift
        // from the reference, so fp32 stays fp32 (fp16 graphs are unaffected).
        "cuda" => Box::new(ep::CUDA::default().with_tf32(false)),
        "tensorrt" => Box::new(ep::TensorRT::default()),
        "rocm" => Box::new(ep::ROCm::default()),
        "directml" => Box::new(ep::DirectML::default()),
        "coreml" => Box::new(ep::CoreML::default()),
        _ => return None,
    })
}

/// The execution providers this ONNX Runtime can use (by lfm's names), CPU included.
pub fn available_providers() -> Vec<&'static str> {
    let mut out = vec!["cpu"];
    for name in ["cuda", "tensorrt", "rocm", "directml", "coreml"] {
        if provider(name).is_some_and(|p| p.is_available().unwrap_or(false)) {
            out.push(name);
        }
    }
    out
}

/// ONNX Runtime's name of a provider option (`"cuda"` -> `CUDAExecutionProvider`).
fn ort_name(name: &str) -> &'static str {
    match name {
        "cuda" => "CUDAExecutionProvider",
        "tensorrt" => "TensorrtExecutionProvider",
        "rocm" => "ROCMExecutionProvider",
        "directml" => "DmlExecutionProvider",
        "coreml" => "CoreMLExecutionProvider",
        _ => "CPUExecutionProvider",
    }
}

/// A loaded graph. ONNX Runtime sessions run one call at a time (`run` takes `&mut`), so
/// the session sits behind a mutex.
pub struct Graph {
    pub path: PathBuf,
    pub inputs: Vec<Port>,
    pub outputs: Vec<Port>,
    session: Mutex<Session>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph").field("path", &self.path).field("inputs", &self.inputs).finish()
    }
}

impl Graph {
    /// Loads a graph; `warnings` receives what could not be honoured (a requested
    /// execution provider that is not available, so the CPU runs that graph).
    pub fn load(path: &Path, config: &SessionConfig, warnings: &mut Vec<String>) -> Result<Graph> {
        Self::load_with(path, config, warnings, None)
    }

    /// Loads a graph from `model` (a rewritten copy of `path`'s graph whose weights refer
    /// to files next to `path`), or from `path` itself when `model` is `None`.
    pub fn load_with(
        path: &Path,
        config: &SessionConfig,
        warnings: &mut Vec<String>,
        model: Option<&[u8]>,
    ) -> Result<Graph> {
        if !path.exists() {
            return Err(Error::NotFound { path: path.to_path_buf() });
        }
        let load_err = |e: ort::Error| Error::model_load(path, format!("ONNX Runtime cannot load it: {e}"));
        let mut builder = Session::builder().map_err(load_err)?;
        builder = builder.with_optimization_level(GraphOptimizationLevel::All).map_err(|e| load_err(e.into()))?;
        if let Some(n) = config.intra_threads {
            builder = builder.with_intra_threads(n).map_err(|e| load_err(e.into()))?;
        }
        if let Some(n) = config.inter_threads {
            builder = builder.with_inter_threads(n).map_err(|e| load_err(e.into()))?;
            if n > 1 {
                builder = builder.with_parallel_execution(true).map_err(|e| load_err(e.into()))?;
            }
        }
        for name in config.providers.iter().filter(|p| p.as_str() != "cpu") {
            let Some(ep) = provider(name) else { continue };
            let available = ep.is_available().unwrap_or(false);
            let registered = available && ep.register(&mut builder).is_ok();
            if !registered {
                let why = if available {
                    "it failed to start (driver or libraries missing?)"
                } else {
                    "this ONNX Runtime build does not include it (install onnxruntime-gpu for CUDA/TensorRT)"
                };
                let msg =
                    format!("execution provider `{name}` ({}) is not available: {why}; using the CPU", ort_name(name));
                if !warnings.contains(&msg) {
                    warnings.push(msg);
                }
            }
        }
        let session = match model {
            Some(bytes) => {
                let folder = path.parent().unwrap_or(Path::new(".")).to_string_lossy().into_owned();
                builder = builder
                    .with_config_entry("session.model_external_initializers_file_folder_path", folder)
                    .map_err(|e| load_err(e.into()))?;
                builder.commit_from_memory(bytes).map_err(load_err)?
            }
            None => builder.commit_from_file(path).map_err(load_err)?,
        };
        let inputs = session.inputs().iter().map(|o| Port::from_outlet(o.name(), o.dtype())).collect();
        let outputs = session.outputs().iter().map(|o| Port::from_outlet(o.name(), o.dtype())).collect();
        Ok(Graph { path: path.to_path_buf(), inputs, outputs, session: Mutex::new(session) })
    }

    pub fn input(&self, name: &str) -> Option<&Port> {
        self.inputs.iter().find(|p| p.name == name)
    }

    pub fn output(&self, name: &str) -> Option<&Port> {
        self.outputs.iter().find(|p| p.name == name)
    }

    /// A load error naming this graph's file.
    pub fn error(&self, detail: impl Into<String>) -> Error {
        Error::model_load(&self.path, detail)
    }

    /// Checks that `port` is a float tensor of `rank` whose listed axes have the given
    /// fixed sizes (`None`: must be present as a fixed size, any value).
    pub fn expect_float(&self, port: Option<&Port>, name: &str, rank: usize, shape_doc: &str) -> Result<Port> {
        let p = port.ok_or_else(|| self.error(format!("missing `{name}` (expected float {shape_doc})")))?;
        if p.float_type().is_none() || p.dims.len() != rank {
            return Err(self.error(format!("`{name}` must be float32 or float16 {shape_doc}, got {}", p.describe())));
        }
        Ok(p.clone())
    }

    /// Checks that `port` is an int64 tensor of `rank`.
    pub fn expect_int64(&self, port: Option<&Port>, name: &str, rank: usize, shape_doc: &str) -> Result<Port> {
        let p = port.ok_or_else(|| self.error(format!("missing `{name}` (expected int64 {shape_doc})")))?;
        if p.ty != Some(TensorElementType::Int64) || p.dims.len() != rank {
            return Err(self.error(format!("`{name}` must be int64 {shape_doc}, got {}", p.describe())));
        }
        Ok(p.clone())
    }

    /// The fixed size of `axis` of `port`, or an error naming the width that cannot be read.
    pub fn width(&self, port: &Port, axis: usize, what: &str) -> Result<usize> {
        port.fixed(axis).filter(|&w| w > 0).ok_or_else(|| {
            self.error(format!("`{}` axis {axis} ({what}) must have a fixed size, got {}", port.name, port.describe()))
        })
    }

    /// Runs the graph through an I/O binding: `outputs` pairs each output name with a
    /// tensor to write into (`Some`, which may be one of the inputs: ONNX Runtime's
    /// GroupQueryAttention then updates its key/value cache in place) or `None` for a
    /// tensor ONNX Runtime allocates. Returns the outputs in `outputs`' order. `memory` as
    /// for [`Graph::run`].
    pub fn run_bound(
        &self,
        stage: &'static str,
        inputs: &[(&str, &DynValue)],
        outputs: Vec<(String, Option<DynValue>)>,
        memory: Memory,
    ) -> Result<Vec<(String, DynValue)>> {
        let err = |e: ort::Error| Error::inference(stage, e);
        let mut session =
            self.session.lock().map_err(|_| Error::Internal(format!("{stage}: session lock poisoned")))?;
        let mut binding = session.create_binding().map_err(err)?;
        for (name, value) in inputs {
            binding.bind_input(*name, *value).map_err(err)?;
        }
        let cpu = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default).map_err(err)?;
        let names: Vec<String> = outputs.iter().map(|(n, _)| n.clone()).collect();
        for (name, value) in outputs {
            match value {
                Some(v) => binding.bind_output(name, v).map_err(err)?,
                None => binding.bind_output_to_device(name, &cpu).map_err(err)?,
            }
        }
        let options = RunSettings::current(memory).map_err(err)?;
        let mut out = session.run_binding_with_options(&binding, options.get(memory)).map_err(err)?;
        if memory == Memory::Release {
            crate::heap::release_free_memory();
        }
        names
            .into_iter()
            .map(|n| {
                let v = out.remove(&n).ok_or_else(|| Error::inference(stage, format!("output `{n}` missing")))?;
                Ok((n, v))
            })
            .collect()
    }

    /// Runs the graph on named inputs; returns every output, owned, in graph order.
    ///
    /// `Memory::Release` hands the memory ONNX Runtime's arena grew by back to the system
    /// after the call (arena shrinkage, then a trim of the C heap): for the last of a run of
    /// calls with large working sets (an image's last vision entry, a prompt's last chunk).
    /// With `Memory::Keep` the arena keeps it for the next call.
    pub fn run(
        &self,
        stage: &'static str,
        inputs: Vec<(&str, ort::session::SessionInputValue<'_>)>,
        memory: Memory,
    ) -> Result<Vec<(String, DynValue)>> {
        let err = |e: ort::Error| Error::inference(stage, e);
        let mut session =
            self.session.lock().map_err(|_| Error::Internal(format!("{stage}: session lock poisoned")))?;
        let take = |mut out: ort::session::SessionOutputs<'_>| {
            self.outputs
                .iter()
                .map(|p| {
                    out.remove(&p.name)
                        .map(|v| (p.name.clone(), v))
                        .ok_or_else(|| Error::inference(stage, format!("output `{}` missing", p.name)))
                })
                .collect()
        };
        let options = RunSettings::current(memory).map_err(err)?;
        let outputs = take(session.run_with_options(inputs, options.get(memory)).map_err(err)?);
        if memory == Memory::Release {
            // The arena frees its regions to the C heap, which keeps blocks of up to 32 MB
            // for reuse: trim it too, or each call leaves some resident.
            crate::heap::release_free_memory();
        }
        outputs
    }
}

/// The run options of one `until` call (both `Memory` kinds), which its watcher may
/// terminate. They are this call's own: a cancelled request stops its own runs, never
/// another thread's.
struct Terminable {
    keep: RunOptions,
    release: RunOptions,
}

impl Terminable {
    fn new() -> ort::Result<Terminable> {
        Ok(Terminable { keep: RunOptions::new()?, release: release_options()? })
    }

    fn terminate(&self) {
        // Setting the flag fails only on a null handle, which these never are.
        let _ = self.keep.terminate();
        let _ = self.release.terminate();
    }
}

thread_local! {
    /// The options of the `until` call under way on this thread, if any.
    static TERMINABLE: std::cell::RefCell<Option<Arc<Terminable>>> = const { std::cell::RefCell::new(None) };
}

/// The options a run on this thread goes with: those of an `until` call under way, else
/// fresh ones (ONNX Runtime's default, or the arena's release).
enum RunSettings {
    Terminable(Arc<Terminable>),
    Plain(RunOptions),
}

impl RunSettings {
    fn current(memory: Memory) -> ort::Result<RunSettings> {
        if let Some(t) = TERMINABLE.with(|t| t.borrow().clone()) {
            return Ok(RunSettings::Terminable(t));
        }
        Ok(RunSettings::Plain(match memory {
            Memory::Keep => RunOptions::new()?,
            Memory::Release => release_options()?,
        }))
    }

    fn get(&self, memory: Memory) -> &RunOptions {
        match (self, memory) {
            (RunSettings::Terminable(t), Memory::Keep) => &t.keep,
            (RunSettings::Terminable(t), Memory::Release) => &t.release,
            (RunSettings::Plain(options), _) => options,
        }
    }
}

/// Asked while long runs are under way: true once they should stop (a cancelled request).
pub type Stop<'a> = &'a (dyn Fn() -> bool + Sync);

/// Calls `f` (graph runs on this thread) while a watcher thread asks `stop` every 10 ms;
/// once it says yes, ONNX Runtime's terminate flag stops the run under way (checked
/// between operators), so a cancelled request waits for neither a whole image nor a whole
/// prompt. The flag is on run options of this call's own, so runs elsewhere (another
/// thread, the next request) are not touched. `None` once stopped, whatever `f` returned.
pub fn until<T>(stop: Stop<'_>, f: impl FnOnce() -> Result<Option<T>>) -> Result<Option<T>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let options = Arc::new(Terminable::new().map_err(|e| Error::inference("run options", e))?);
    let (done, stopped) = (AtomicBool::new(false), AtomicBool::new(false));
    let result = std::thread::scope(|scope| {
        let watching = std::thread::Builder::new().name("lfm-stop-watch".into()).spawn_scoped(scope, || {
            while !done.load(Ordering::Acquire) {
                if stop() {
                    stopped.store(true, Ordering::Release);
                    options.terminate();
                    return;
                }
                std::thread::park_timeout(std::time::Duration::from_millis(10));
            }
        });
        // No thread to be had (a process at its limit): the work runs, stoppable only
        // between its images and chunks, as before.
        let Ok(watcher) = watching else { return f() };
        /// Once `f` returns, or unwinds (the scope would otherwise wait for the watcher
        /// forever): takes this thread's runs off the options and ends the watcher.
        struct Installed<'a> {
            done: &'a AtomicBool,
            watcher: std::thread::Thread,
        }
        impl Drop for Installed<'_> {
            fn drop(&mut self) {
                TERMINABLE.with(|t| t.borrow_mut().take());
                self.done.store(true, Ordering::Release);
                self.watcher.unpark();
            }
        }
        let previous = TERMINABLE.with(|t| t.borrow_mut().replace(options.clone()));
        debug_assert!(previous.is_none(), "until calls do not nest");
        let installed = Installed { done: &done, watcher: watcher.thread().clone() };
        let result = f();
        drop(installed);
        let _ = watcher.join(); // it cannot panic: `stop` is the caller's, and cheap
        result
    });
    if stopped.load(Ordering::Acquire) {
        return Ok(None);
    }
    result
}

/// Run options under which ONNX Runtime's CPU arena gives back what the run grew it by.
fn release_options() -> ort::Result<RunOptions> {
    let mut options = RunOptions::new()?;
    options.set("memory.enable_memory_arena_shrinkage", "cpu:0")?;
    Ok(options)
}

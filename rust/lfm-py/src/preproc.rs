//! `lfm.preproc` and option validation: no ONNX Runtime involved.

use lfm_core::options::{self, EngineOptions, ImageBudget, Limits, RequestOptions};
use lfm_core::preproc::decode::{DecodeLimits, decode as core_decode};
use lfm_core::preproc::{self, Preprocessor, RgbImage, TileGrid};
use lfm_core::recycle;
use lfm_core::request::ImageSource;
use numpy::ndarray::ArrayView3;
use numpy::{PyArray1, PyArray3, PyArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::{detached, to_py_err};
use crate::images::image_source;

/// `(rows, cols, (tile_h, tile_w), (thumb_h, thumb_w) | None)`.
pub type GridTuple = (usize, usize, (usize, usize), Option<(usize, usize)>);

pub fn grid_tuple(g: &TileGrid) -> GridTuple {
    (g.rows, g.cols, g.tile, g.thumbnail)
}

fn budget(py: Python<'_>, json: &str) -> PyResult<ImageBudget> {
    let b: ImageBudget = options::from_json("image_budget", json).map_err(|e| to_py_err(py, e))?;
    b.validate().map_err(|e| to_py_err(py, e))?;
    Ok(b)
}

/// Validates an options object given as JSON; returns it normalised (defaults filled in).
#[pyfunction]
pub fn validate_options(py: Python<'_>, kind: &str, json: &str) -> PyResult<String> {
    fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(
        kind: &str,
        json: &str,
        validate: impl Fn(&T) -> lfm_core::Result<()>,
    ) -> lfm_core::Result<String> {
        let v: T = options::from_json(kind, json)?;
        validate(&v)?;
        serde_json::to_string(&v).map_err(|e| lfm_core::Error::Internal(e.to_string()))
    }
    let out = match kind {
        "request" => round_trip::<RequestOptions>(kind, json, RequestOptions::validate),
        "engine" => round_trip::<EngineOptions>(kind, json, EngineOptions::validate),
        "image_budget" => round_trip::<ImageBudget>(kind, json, ImageBudget::validate),
        "limits" => round_trip::<Limits>(kind, json, Limits::validate),
        other => return Err(PyValueError::new_err(format!("unknown options kind {other:?}"))),
    };
    out.map_err(|e| to_py_err(py, e))
}

/// Tile plan of a `width x height` image.
#[pyfunction]
pub fn plan(py: Python<'_>, width: i64, height: i64, budget_json: &str) -> PyResult<GridTuple> {
    let b = budget(py, budget_json)?;
    if width < 0 || height < 0 {
        return Err(PyValueError::new_err(format!("image size must not be negative, got {width}x{height}")));
    }
    // Refused, not clamped: a clamped side would plan some other image than the one asked.
    let side = |field: &'static str, v: i64| {
        u32::try_from(v).map_err(|_| {
            let e = lfm_core::Error::ImageTooLarge { field, value: v.unsigned_abs(), limit: u32::MAX.into() };
            to_py_err(py, e)
        })
    };
    let (w, h) = (side("width", width)?, side("height", height)?);
    preproc::plan(w, h, &b).map(|g| grid_tuple(&g)).map_err(|e| to_py_err(py, e))
}

/// Validates a hand-made grid; returns `(num_entries, num_image_tokens)`.
#[pyfunction]
#[pyo3(signature = (rows, cols, tile, thumbnail=None))]
pub fn grid_info(
    py: Python<'_>,
    rows: usize,
    cols: usize,
    tile: (usize, usize),
    thumbnail: Option<(usize, usize)>,
) -> PyResult<(usize, usize)> {
    let g = TileGrid::new(rows, cols, tile, thumbnail).map_err(|e| to_py_err(py, e))?;
    Ok((g.num_entries(), g.num_image_tokens()))
}

/// The text that replaces one `<image>` for this grid.
#[pyfunction]
#[pyo3(signature = (rows, cols, tile, thumbnail=None))]
pub fn placeholder_text(
    py: Python<'_>,
    rows: usize,
    cols: usize,
    tile: (usize, usize),
    thumbnail: Option<(usize, usize)>,
) -> PyResult<String> {
    let g = TileGrid::new(rows, cols, tile, thumbnail).map_err(|e| to_py_err(py, e))?;
    Ok(preproc::placeholder_text(&g))
}

fn pixels(py: Python<'_>, src: ImageSource, limits: &DecodeLimits) -> PyResult<RgbImage> {
    detached(py, || match src {
        ImageSource::Pixels(p) => Ok(p),
        ImageSource::Bytes(b) => core_decode(&b, limits),
        ImageSource::Path(p) => core_decode(&limits.read_file(&p)?, limits),
    })
}

/// Decodes an image to a uint8 `HxWx3` array, EXIF orientation applied.
#[pyfunction]
pub fn decode<'py>(py: Python<'py>, image: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let img = pixels(py, image_source(image)?, &DecodeLimits::default())?;
    let (h, w) = (img.height as usize, img.width as usize);
    Ok(PyArray1::from_vec(py, img.data).reshape([h, w, 3])?.into_any())
}

/// `(pixel_values, pixel_attention_mask, spatial_shapes, grid)` as Python objects.
type Preprocessed<'py> = (Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>, GridTuple);

/// Preprocesses one image: `(pixel_values, pixel_attention_mask, spatial_shapes, grid)`.
#[pyfunction]
pub fn preprocess<'py>(py: Python<'py>, image: &Bound<'py, PyAny>, budget_json: &str) -> PyResult<Preprocessed<'py>> {
    let b = budget(py, budget_json)?;
    let src = image_source(image)?;
    let img = pixels(py, src, &DecodeLimits::default())?;
    let pre = detached(py, || Preprocessor::new(b)?.preprocess(&img));
    recycle::give(img.data);
    let pre = pre?;
    let (n, p, d) = (pre.num_entries, pre.patches_per_entry, pre.patch_dim);
    Ok((
        recycled_array(py, pre.pixel_values, (n, p, d))?,
        PyArray1::from_vec(py, pre.pixel_attention_mask).reshape([n, p])?.into_any(),
        PyArray1::from_vec(py, pre.spatial_shapes).reshape([n, 2])?.into_any(),
        grid_tuple(&pre.grid),
    ))
}

/// Owns a preprocessing buffer while a numpy array (its `base`) uses it, then gives it back
/// to `lfm_core::recycle`: the next image's tensor reuses its mapped pages instead of
/// faulting in fresh ones.
#[pyclass(frozen, module = "lfm._lfm")]
pub struct RecycledBuffer {
    data: Vec<f32>,
}

impl Drop for RecycledBuffer {
    fn drop(&mut self) {
        recycle::give(std::mem::take(&mut self.data));
    }
}

/// `data` as a writeable float32 array of `shape` whose memory goes back to the pool when
/// the array is freed.
fn recycled_array<'py>(py: Python<'py>, data: Vec<f32>, shape: (usize, usize, usize)) -> PyResult<Bound<'py, PyAny>> {
    let owner = Bound::new(py, RecycledBuffer { data })?;
    let view = ArrayView3::from_shape(shape, owner.get().data.as_slice())
        .map_err(|e| PyValueError::new_err(format!("pixel tensor shape {shape:?}: {e}")))?;
    // SAFETY: the array keeps `owner` alive as its base, and `owner` never moves, resizes or
    // reads its buffer before it is freed, after the array.
    Ok(unsafe { PyArray3::borrow_from_array(&view, owner.clone().into_any()) }.into_any())
}

/// Renders messages (JSON) with a chat template (the bundled one when `template` is None).
#[pyfunction]
#[pyo3(signature = (messages_json, tools_json=None, add_generation_prompt=true, template=None, bos_token="<|startoftext|>"))]
pub fn apply_chat_template(
    py: Python<'_>,
    messages_json: &str,
    tools_json: Option<&str>,
    add_generation_prompt: bool,
    template: Option<&str>,
    bos_token: &str,
) -> PyResult<String> {
    let parse = |s: &str| {
        serde_json::from_str::<serde_json::Value>(s)
            .map_err(|e| PyValueError::new_err(format!("not JSON-serialisable: {e}")))
    };
    let messages = parse(messages_json)?;
    let tools = tools_json.map(parse).transpose()?;
    let source = template.unwrap_or(lfm_core::files::bundled::CHAT_TEMPLATE_JINJA).to_string();
    let bos = bos_token.to_string();
    detached(py, move || {
        lfm_core::chat::ChatTemplate::new(&source)?.render(&messages, tools.as_ref(), add_generation_prompt, &bos)
    })
}

/// Panics inside the core, for the test that proves no panic reaches Python (it must
/// come back as `lfm.InternalError`).
#[pyfunction]
pub fn _panic_for_tests(py: Python<'_>) -> PyResult<()> {
    detached(py, || -> lfm_core::Result<()> { panic!("deliberate panic for the test suite") })
}

/// A file bundled with lfm (the real model's tokenizer, configs and chat template).
#[pyfunction]
pub fn bundled_file(py: Python<'_>, name: &str) -> PyResult<Py<pyo3::types::PyBytes>> {
    use lfm_core::files::bundled as b;
    let data: &[u8] = match name {
        "tokenizer.json" => b::TOKENIZER_JSON,
        "tokenizer_config.json" => b::TOKENIZER_CONFIG_JSON.as_bytes(),
        "chat_template.jinja" => b::CHAT_TEMPLATE_JINJA.as_bytes(),
        "config.json" => b::CONFIG_JSON.as_bytes(),
        "preprocessor_config.json" => b::PREPROCESSOR_CONFIG_JSON.as_bytes(),
        "processor_config.json" => b::PROCESSOR_CONFIG_JSON.as_bytes(),
        other => return Err(PyValueError::new_err(format!("no bundled file {other:?}"))),
    };
    Ok(pyo3::types::PyBytes::new(py, data).unbind())
}

/// Token ids of `text` (no special tokens added) with a tokenizer.json file, or the
/// bundled LFM2.5-VL-450M tokenizer when `path` is None.
#[pyfunction]
#[pyo3(signature = (text, path=None))]
pub fn tokenize(py: Python<'_>, text: String, path: Option<std::path::PathBuf>) -> PyResult<Vec<u32>> {
    use lfm_core::tokenizer::TextTokenizer;
    detached(py, move || {
        let tok = match &path {
            Some(p) => TextTokenizer::from_file(p, None)?,
            None => TextTokenizer::from_bytes(
                std::path::Path::new("<bundled>"),
                lfm_core::files::bundled::TOKENIZER_JSON,
                None,
            )?,
        };
        tok.encode(&text)
    })
}

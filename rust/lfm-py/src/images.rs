//! Python image values to owned core images (copied while the GIL is held).

use lfm_core::preproc::RgbImage;
use lfm_core::request::ImageSource;
use numpy::{PyReadonlyArray3, PyUntypedArrayMethods};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

/// `str` (a path), `bytes` (an encoded file) or a C-contiguous uint8 `HxWx3` array. The
/// Python layer turns PIL images, `os.PathLike` and other array layouts into these.
pub fn image_source(obj: &Bound<'_, PyAny>) -> PyResult<ImageSource> {
    if obj.cast::<PyString>().is_ok() {
        // Through the filesystem encoding, so paths that are not UTF-8 (surrogate-escaped
        // by Python) still name their file.
        return Ok(ImageSource::Path(obj.extract::<std::path::PathBuf>()?));
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(ImageSource::Bytes(b.as_bytes().to_vec()));
    }
    if let Ok(a) = obj.extract::<PyReadonlyArray3<'_, u8>>() {
        let shape = a.shape().to_vec();
        if shape[2] != 3 {
            return Err(PyTypeError::new_err(format!("image array must be HxWx3 uint8, got shape {shape:?}")));
        }
        // Into a kept buffer where one is free (preprocessing gives its copies back).
        let data = match a.as_slice() {
            Ok(s) => {
                let mut data = lfm_core::recycle::take(s.len());
                data.copy_from_slice(s);
                data
            }
            Err(_) => a.as_array().iter().copied().collect(),
        };
        let (h, w) = (shape[0], shape[1]);
        let (w32, h32) = (u32::try_from(w), u32::try_from(h));
        let (Ok(w), Ok(h)) = (w32, h32) else {
            return Err(PyTypeError::new_err("image array is too large"));
        };
        let img = RgbImage::new(w, h, data).map_err(|e| crate::errors::to_py_err(obj.py(), e))?;
        return Ok(ImageSource::Pixels(img));
    }
    Err(PyTypeError::new_err(format!(
        "expected an image path (str), encoded bytes or a uint8 HxWx3 array, got {}",
        obj.get_type().name()?
    )))
}

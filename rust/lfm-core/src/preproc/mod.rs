//! Image preprocessing: decode, plan, pixels, placeholders. Needs no ONNX Runtime.

#[cfg(feature = "decoders")]
pub mod decode;
#[cfg(feature = "decoders")]
mod jpeg;
#[cfg(target_arch = "x86_64")]
mod kernels_x86;
mod parallel;
pub mod pixels;
pub mod placeholder;
pub mod plan;
pub mod resize;
mod target_ratios;

pub use pixels::PreprocessedImage;
pub use placeholder::{expand_placeholders, placeholder_text};
pub use plan::{Geometry, TileGrid, plan, smart_resize};

use crate::error::{Error, Result};
use crate::options::ImageBudget;

/// Tightly packed 8-bit RGB pixels, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Wraps `data` (`height x width x 3` bytes), checking its length.
    pub fn new(width: u32, height: u32, data: Vec<u8>) -> Result<Self> {
        let want = width as usize * height as usize * 3;
        if data.len() != want {
            return Err(Error::ImageInput {
                detail: format!("{width}x{height} RGB needs {want} bytes, got {}", data.len()),
            });
        }
        if width == 0 || height == 0 {
            return Err(Error::ImageTooSmall { width, height });
        }
        Ok(RgbImage { width, height, data })
    }
}

/// Plans and preprocesses images under one [`ImageBudget`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preprocessor {
    budget: ImageBudget,
}

impl Preprocessor {
    pub fn new(budget: ImageBudget) -> Result<Self> {
        budget.validate()?;
        Ok(Preprocessor { budget })
    }

    pub fn budget(&self) -> &ImageBudget {
        &self.budget
    }

    /// The tile plan for an image of `width x height` pixels.
    pub fn plan(&self, width: u32, height: u32) -> Result<TileGrid> {
        plan(width, height, &self.budget)
    }

    /// Plans and runs the pixel pipeline.
    pub fn preprocess(&self, image: &RgbImage) -> Result<PreprocessedImage> {
        let grid = self.plan(image.width, image.height)?;
        pixels::preprocess_with_grid(image, &grid)
    }
}

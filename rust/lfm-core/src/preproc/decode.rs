//! Image files to RGB pixels, the way transformers' `load_image` reads them: EXIF
//! orientation applied, alpha dropped (not composited), grayscale replicated.
//!
//! The header is read first, so that oversized images are refused before any pixel buffer
//! is allocated.

use std::io::{Cursor, Read};
use std::path::Path;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use crate::error::{Error, Result, catch_panic};

use super::RgbImage;

/// Size caps applied while reading an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Longest accepted side, in pixels.
    pub max_side: u32,
    /// Largest accepted decoded buffer (width x height x 4 bytes).
    pub max_decoded_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        let l = crate::options::Limits::default();
        DecodeLimits { max_side: l.max_image_side, max_decoded_bytes: l.max_decoded_image_bytes }
    }
}

impl From<&crate::options::Limits> for DecodeLimits {
    fn from(l: &crate::options::Limits) -> Self {
        DecodeLimits { max_side: l.max_image_side, max_decoded_bytes: l.max_decoded_image_bytes }
    }
}

/// What the header says: the size after EXIF orientation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    pub width: u32,
    pub height: u32,
    pub orientation: Orientation,
}

fn decode_err(e: impl std::fmt::Display) -> Error {
    Error::ImageDecode { detail: e.to_string() }
}

fn swaps_axes(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH
    )
}

fn open(bytes: &[u8]) -> Result<(ImageFormat, impl ImageDecoder + use<'_>)> {
    if bytes.is_empty() {
        return Err(decode_err("empty input (0 bytes)"));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(decode_err)?;
    // The header is checked against lfm's own limits (typed errors naming the limit);
    // the decoder gets them before any pixel is decoded.
    reader.no_limits();
    let Some(format) = reader.format() else {
        return Err(decode_err("unrecognised format (supported: JPEG, PNG, WebP)"));
    };
    Ok((format, reader.into_decoder().map_err(decode_err)?))
}

impl DecodeLimits {
    /// Checks an image's size, from a file's header or of pixels given as an array: both
    /// are held decoded, so both answer to the same limits.
    pub fn check_size(&self, width: u32, height: u32) -> Result<()> {
        for (field, v) in [("width", width), ("height", height)] {
            if v > self.max_side {
                return Err(Error::ImageTooLarge { field, value: v as u64, limit: self.max_side as u64 });
            }
        }
        let bytes = width as u64 * height as u64 * 4;
        if bytes > self.max_decoded_bytes {
            return Err(Error::ImageTooLarge {
                field: "decoded size in bytes",
                value: bytes,
                limit: self.max_decoded_bytes,
            });
        }
        if width == 0 || height == 0 {
            return Err(Error::ImageTooSmall { width, height });
        }
        Ok(())
    }

    /// Reads an image file. Only a regular file: opening a FIFO blocks until a writer comes
    /// and a device may never end, either of which would stall every request behind this
    /// one. At most twice `max_decoded_bytes` and 64 MiB more: the limit counts 4 bytes per
    /// pixel, a 16-bit RGBA file may hold 8, and metadata (EXIF, ICC, XMP) comes on top.
    pub fn read_file(&self, path: &Path) -> Result<Vec<u8>> {
        let cap = self.max_decoded_bytes.saturating_mul(2).saturating_add(64 << 20);
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            // Fails as reading any directory does, with its OS error (IsADirectoryError).
            return std::fs::read(path).map_err(|e| Error::io(path, e));
        }
        if !meta.is_file() {
            return Err(decode_err(format!("{} is not a regular file", path.display())));
        }
        let too_large = |value| Error::ImageTooLarge { field: "file size in bytes", value, limit: cap };
        if meta.len() > cap {
            return Err(too_large(meta.len()));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        file.take(cap.saturating_add(1)).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
        if bytes.len() as u64 > cap {
            return Err(too_large(bytes.len() as u64)); // it grew while being read
        }
        Ok(bytes)
    }
}

fn check_header(dec: &mut impl ImageDecoder, limits: &DecodeLimits) -> Result<ImageHeader> {
    let (w, h) = dec.dimensions();
    // A broken EXIF block is not worth refusing the image for: PIL ignores it too.
    let orientation = dec.orientation().unwrap_or(Orientation::NoTransforms);
    let (width, height) = if swaps_axes(orientation) { (h, w) } else { (w, h) };
    limits.check_size(width, height)?;
    Ok(ImageHeader { width, height, orientation })
}

/// Reads only the header: oriented size, checked against `limits`.
pub fn probe(bytes: &[u8], limits: &DecodeLimits) -> Result<ImageHeader> {
    catch_panic("image header", || check_header(&mut open(bytes)?.1, limits))
}

/// Decodes `bytes` (JPEG, PNG or WebP) to RGB with the EXIF orientation applied.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage> {
    catch_panic("image decode", || {
        let (format, mut dec) = open(bytes)?;
        let header = check_header(&mut dec, limits)?;
        if format == ImageFormat::Jpeg {
            drop(dec);
            let mut img = super::jpeg::decode_jpeg(bytes)?;
            super::jpeg::apply_orientation(&mut img, header.orientation);
            return Ok(img);
        }
        let mut il = image::Limits::default();
        il.max_image_width = Some(limits.max_side);
        il.max_image_height = Some(limits.max_side);
        il.max_alloc = Some(limits.max_decoded_bytes.saturating_mul(2));
        dec.set_limits(il).map_err(decode_err)?;
        let mut img = DynamicImage::from_decoder(dec).map_err(decode_err)?;
        img.apply_orientation(header.orientation);
        Ok(to_rgb(img))
    })
}

/// RGB8 as PIL's `convert("RGB")` gives it: alpha dropped, gray replicated, 16-bit color
/// samples reduced to their high byte, 16-bit gray (PIL's mode `I;16`) clipped to 255.
fn to_rgb(img: DynamicImage) -> RgbImage {
    let (width, height) = (img.width(), img.height());
    let data = match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageRgb16(b) => b.into_raw().iter().map(|v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(b) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            .collect(),
        DynamicImage::ImageLuma16(b) => b.into_raw().iter().flat_map(|&v| [v.min(255) as u8; 3]).collect(),
        DynamicImage::ImageLumaA16(b) => b.into_raw().chunks_exact(2).flat_map(|p| [(p[0] >> 8) as u8; 3]).collect(),
        other => other.to_rgb8().into_raw(),
    };
    RgbImage { width, height, data }
}

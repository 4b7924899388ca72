//! JPEG to RGB with libjpeg-turbo's decoder (through mozjpeg), as PIL decodes it: islow
//! IDCT, fancy chroma upsampling, grayscale replicated, Adobe CMYK converted with PIL's
//! formula, and a file cut short refused (PIL: "image file is truncated").

use image::metadata::Orientation;
use mozjpeg::{ColorSpace, Decompress, Marker};

use crate::error::{Error, Result, panic_message};

use super::RgbImage;

fn err(detail: impl std::fmt::Display) -> Error {
    Error::ImageDecode { detail: format!("JPEG: {detail}") }
}

/// Where the first start-of-scan marker is, found by walking the marker segments: a plain
/// search would find the scan of an EXIF thumbnail inside an APP1 segment.
fn first_scan(bytes: &[u8]) -> Option<usize> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    let mut i = 2;
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            i += 1; // stray bytes between segments: libjpeg skips them too (with a warning)
            continue;
        }
        match bytes[i + 1] {
            0xFF => i += 1, // fill byte
            0xDA => return Some(i),
            0x01 | 0xD0..=0xD7 => i += 2, // markers without a length
            _ => i += 2 + u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize,
        }
    }
    None
}

/// True when an end-of-image marker follows the first start-of-scan: a file cut short
/// has none. (Scan data escapes 0xFF bytes, so the marker cannot occur inside it.)
fn is_complete(bytes: &[u8]) -> bool {
    first_scan(bytes).is_some_and(|sos| bytes[sos + 2..].windows(2).any(|w| w == [0xFF, 0xD9]))
}

/// PIL's CMYK to RGB: `x = 255 - k; channel = x - x*c/255` (rounded as PIL's MULDIV255).
fn cmyk_to_rgb(cmyk: &[u8], inverted: bool) -> Vec<u8> {
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    cmyk.chunks_exact(4)
        .flat_map(|p| {
            let v = |i: usize| if inverted { 255 - p[i] as i32 } else { p[i] as i32 };
            let nk = 255 - v(3);
            [0, 1, 2].map(|i| (nk - muldiv255(v(i), nk)).clamp(0, 255) as u8)
        })
        .collect()
}

/// Decodes a JPEG's pixels (orientation not applied).
pub fn decode_jpeg(bytes: &[u8]) -> Result<RgbImage> {
    if !is_complete(bytes) {
        return Err(err("the file is truncated (no end-of-image marker after the image data)"));
    }
    // libjpeg's fatal errors (corrupt data) reach Rust as unwinding panics carrying its
    // message (mozjpeg's error manager): a bad file, not a bug in lfm.
    std::panic::catch_unwind(|| decode_pixels(bytes)).unwrap_or_else(|payload| Err(err(panic_message(&*payload))))
}

fn decode_pixels(bytes: &[u8]) -> Result<RgbImage> {
    let d = Decompress::with_markers(&[Marker::APP(14)]).from_mem(bytes).map_err(err)?;
    let (width, height) = (d.width() as u32, d.height() as u32);
    // PIL reads Adobe CMYK as inverted ("CMYK;I"): an APP14 "Adobe" marker says so.
    let adobe = d.markers().any(|m| m.data.starts_with(b"Adobe"));
    let data = match d.color_space() {
        ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => {
            let mut img = d.to_colorspace(ColorSpace::JCS_CMYK).map_err(err)?;
            let cmyk: Vec<u8> = img.read_scanlines().map_err(err)?;
            img.finish().map_err(err)?;
            cmyk_to_rgb(&cmyk, adobe)
        }
        _ => {
            let mut img = d.rgb().map_err(err)?;
            let rgb: Vec<u8> = img.read_scanlines().map_err(err)?;
            img.finish().map_err(err)?;
            rgb
        }
    };
    RgbImage::new(width, height, data)
}

/// Applies an EXIF orientation to packed RGB.
pub fn apply_orientation(img: &mut RgbImage, o: Orientation) {
    if o == Orientation::NoTransforms {
        return;
    }
    let (w, h) = (img.width as usize, img.height as usize);
    let swap = matches!(
        o,
        Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH
    );
    let (nw, nh) = if swap { (h, w) } else { (w, h) };
    let mut out = vec![0u8; img.data.len()];
    for y in 0..nh {
        for x in 0..nw {
            // Source pixel of destination (x, y).
            let (sx, sy) = match o {
                Orientation::NoTransforms => (x, y),
                Orientation::FlipHorizontal => (w - 1 - x, y),
                Orientation::Rotate180 => (w - 1 - x, h - 1 - y),
                Orientation::FlipVertical => (x, h - 1 - y),
                Orientation::Rotate90FlipH => (y, x),
                Orientation::Rotate90 => (y, h - 1 - x),
                Orientation::Rotate270FlipH => (w - 1 - y, h - 1 - x),
                Orientation::Rotate270 => (w - 1 - y, x),
            };
            let (s, d) = ((sy * w + sx) * 3, (y * nw + x) * 3);
            out[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    *img = RgbImage { width: nw as u32, height: nh as u32, data: out };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orientations_match_image_crate() {
        let data: Vec<u8> = (0..2 * 3 * 3).map(|v| v as u8).collect();
        let src = RgbImage { width: 3, height: 2, data: data.clone() };
        for o in [
            Orientation::FlipHorizontal,
            Orientation::Rotate180,
            Orientation::FlipVertical,
            Orientation::Rotate90FlipH,
            Orientation::Rotate90,
            Orientation::Rotate270FlipH,
            Orientation::Rotate270,
        ] {
            let mut ours = src.clone();
            apply_orientation(&mut ours, o);
            let mut theirs = image::DynamicImage::ImageRgb8(image::RgbImage::from_raw(3, 2, data.clone()).unwrap());
            theirs.apply_orientation(o);
            assert_eq!(ours.data, theirs.to_rgb8().into_raw(), "{o:?}");
            assert_eq!((ours.width, ours.height), (theirs.width(), theirs.height()));
        }
    }

    #[test]
    fn truncation_is_detected() {
        assert!(!is_complete(&[0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 3]));
        assert!(is_complete(&[0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 0xFF, 0xD9]));
    }

    #[test]
    fn cmyk_formula() {
        assert_eq!(cmyk_to_rgb(&[0, 0, 0, 0], false), vec![255, 255, 255]);
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 255], true), vec![255, 255, 255]);
        assert_eq!(cmyk_to_rgb(&[0, 0, 0, 255], false), vec![0, 0, 0]);
    }
}

//! Bilinear resizing with antialias, bit-exact with what transformers' image processor
//! gets from torchvision on uint8 images (torch's AVX2 uint8 kernel, itself modelled on
//! Pillow): separable passes, horizontal first; per-axis float64 triangle weights scaled
//! by the downsampling factor, normalised, then quantised to int16 with the largest
//! precision that fits; integer accumulation with a rounding offset; uint8 between passes.
//!
//! Exactness matters: one level of difference on a few percent of pixels moves the vision
//! features by ~1e-2, far above the logits tolerance the engine is held to.

use super::RgbImage;
use super::parallel::par_items;
#[cfg(target_arch = "x86_64")]
use super::resize_x86;

/// Integer filter taps of one axis.
struct Taps {
    /// First source index of each output position.
    start: Vec<usize>,
    /// Number of source positions of each output position.
    len: Vec<usize>,
    /// `max_len` weights per output position.
    weights: Vec<i32>,
    max_len: usize,
    precision: u32,
}

impl Taps {
    fn new(in_size: usize, out_size: usize) -> Taps {
        let scale = in_size as f64 / out_size as f64;
        let (support, invscale) = if scale >= 1.0 { (scale, 1.0 / scale) } else { (1.0, 1.0) };
        let max_len = support.ceil() as usize * 2 + 1;
        let mut start = Vec::with_capacity(out_size);
        let mut len = Vec::with_capacity(out_size);
        let mut wf = vec![0f64; out_size * max_len];
        let mut w_max = 0f64;
        for i in 0..out_size {
            let center = scale * (i as f64 + 0.5);
            // C++ casts truncate toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xsize = (((center + support + 0.5) as i64).min(in_size as i64) - xmin).clamp(0, max_len as i64);
            let row = &mut wf[i * max_len..(i + 1) * max_len];
            let mut total = 0f64;
            for (j, slot) in row.iter_mut().take(xsize as usize).enumerate() {
                let x = (j as f64 + xmin as f64 - center + 0.5) * invscale;
                let w = (1.0 - x.abs()).max(0.0);
                *slot = w;
                total += w;
            }
            if total != 0.0 {
                for w in &mut row[..xsize as usize] {
                    *w /= total;
                    w_max = w_max.max(*w);
                }
            }
            start.push(xmin as usize);
            len.push(xsize as usize);
        }
        let mut precision = 0u32;
        while precision < 22 {
            let next = (0.5 + w_max * (1u64 << (precision + 1)) as f64) as i64;
            if next >= 1 << 15 {
                break;
            }
            precision += 1;
        }
        let one = (1u64 << precision) as f64;
        let weights = wf
            .iter()
            .map(|&w| {
                let v = w * one;
                (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i16 as i32
            })
            .collect();
        Taps { start, len, weights, max_len, precision }
    }

    /// Weights of output position `i` and the first source index they apply to.
    #[inline]
    fn of(&self, i: usize) -> (usize, &[i32]) {
        (self.start[i], &self.weights[i * self.max_len..i * self.max_len + self.len[i]])
    }

    #[inline]
    fn round(&self, acc: i32) -> u8 {
        (acc >> self.precision).clamp(0, 255) as u8
    }

    fn bias(&self) -> i32 {
        if self.precision > 0 { 1 << (self.precision - 1) } else { 0 }
    }
}

/// Rows of an output image: in parallel from 256 KiB on, and from 64 rows.
fn par_rows(out: &mut [u8], row_len: usize, f: impl Fn(usize, &mut [u8]) + Sync) {
    let min_len = (1 << 18).max(64 * row_len);
    par_items(out, row_len, min_len, f);
}

/// Horizontal pass: every row of `src` resized to `width` pixels.
fn horizontal(src: &RgbImage, width: usize, kernels: bool) -> Vec<u8> {
    let (sw, sh) = (src.width as usize, src.height as usize);
    let taps = Taps::new(sw, width);
    let pixel = |y: usize, x: usize, px: &mut [u8]| {
        let row = &src.data[y * sw * 3..(y + 1) * sw * 3];
        let (start, w) = taps.of(x);
        let mut acc = [taps.bias(); 3];
        for (k, &wk) in w.iter().enumerate() {
            let s = &row[(start + k) * 3..(start + k) * 3 + 3];
            acc[0] += s[0] as i32 * wk;
            acc[1] += s[1] as i32 * wk;
            acc[2] += s[2] as i32 * wk;
        }
        px.copy_from_slice(&acc.map(|a| taps.round(a)));
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = kernels;
    #[cfg(target_arch = "x86_64")]
    let simd = kernels.then(|| resize_x86::HorizontalTaps::new(&taps.start, &taps.weights, taps.max_len));
    let mut out = vec![0u8; sh * width * 3];
    par_rows(&mut out, width * 3, |y0, chunk| {
        for (dy, dst) in chunk.chunks_exact_mut(width * 3).enumerate() {
            let y = y0 + dy;
            #[cfg(target_arch = "x86_64")]
            if let Some(t) = &simd {
                let scalar = |x: usize, px: &mut [u8]| pixel(y, x, px);
                // SAFETY: `kernels` is true only where `resize_x86::available()` said yes.
                unsafe {
                    resize_x86::horizontal_row(&src.data, y * sw * 3, dst, t, taps.bias(), taps.precision, scalar)
                };
                continue;
            }
            for (x, px) in dst.chunks_exact_mut(3).enumerate() {
                pixel(y, x, px);
            }
        }
    });
    out
}

/// Vertical pass: `mid` (rows of `row_len` bytes) resized to `height` rows.
fn vertical(mid: &[u8], row_len: usize, height: usize, kernels: bool) -> Vec<u8> {
    let taps = Taps::new(mid.len() / row_len, height);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = kernels;
    // Columns `first..` of output row `y`, summed in `acc` (at least `dst.len()` long).
    let columns = |y: usize, first: usize, dst: &mut [u8], acc: &mut [i32]| {
        let (start, w) = taps.of(y);
        let acc = &mut acc[..dst.len()];
        acc.fill(taps.bias());
        for (k, &wk) in w.iter().enumerate() {
            let src = &mid[(start + k) * row_len + first..(start + k) * row_len + first + dst.len()];
            for (a, &v) in acc.iter_mut().zip(src) {
                *a += v as i32 * wk;
            }
        }
        for (d, &a) in dst.iter_mut().zip(acc.iter()) {
            *d = taps.round(a);
        }
    };
    let mut out = vec![0u8; height * row_len];
    par_rows(&mut out, row_len, |y0, chunk| {
        // One accumulator row per thread, reused for every row it writes.
        let mut acc = vec![0i32; row_len];
        for (dy, dst) in chunk.chunks_exact_mut(row_len).enumerate() {
            let y = y0 + dy;
            #[cfg(target_arch = "x86_64")]
            if kernels {
                let (start, w) = taps.of(y);
                let scalar = |first: usize, rest: &mut [u8]| columns(y, first, rest, &mut acc);
                // SAFETY: SSE2 is part of x86-64.
                unsafe { resize_x86::vertical_row(mid, start, w, dst, taps.bias(), taps.precision, scalar) };
                continue;
            }
            columns(y, 0, dst, &mut acc);
        }
    });
    out
}

/// Whether the x86-64 kernels run (checked once per process).
#[cfg(target_arch = "x86_64")]
static KERNELS: std::sync::LazyLock<bool> = std::sync::LazyLock::new(resize_x86::available);
#[cfg(not(target_arch = "x86_64"))]
static KERNELS: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| false);

/// Resizes `src` to `width x height`.
pub fn resize(src: &RgbImage, width: usize, height: usize) -> RgbImage {
    resize_with(src, width, height, *KERNELS)
}

/// [`resize`] with the x86-64 kernels or without (`kernels` only where they are available).
fn resize_with(src: &RgbImage, width: usize, height: usize, kernels: bool) -> RgbImage {
    let (sw, sh) = (src.width as usize, src.height as usize);
    // Horizontal pass first, as torchvision does (skipped when the width does not change).
    let horizontal = (width != sw).then(|| horizontal(src, width, kernels));
    let mid: &[u8] = horizontal.as_deref().unwrap_or(&src.data);
    let data = if height != sh {
        vertical(mid, width * 3, height, kernels)
    } else {
        horizontal.unwrap_or_else(|| src.data.clone())
    };
    RgbImage { width: width as u32, height: height as u32, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_constant() {
        let img = RgbImage { width: 3, height: 2, data: (0..18).collect() };
        assert_eq!(resize(&img, 3, 2), img);
        let flat = RgbImage { width: 7, height: 5, data: vec![200; 105] };
        let r = resize(&flat, 3, 11);
        assert!(r.data.iter().all(|&v| v == 200));
    }

    /// The x86-64 kernels give the scalar passes' bytes: up- and downscaling on each axis,
    /// one to many taps, widths that leave SIMD tails, images a load can overrun.
    #[test]
    fn kernels_match_scalar() {
        if !*KERNELS {
            return;
        }
        let mut seed = 0x2545_f491_u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        let sizes = [(1, 1), (1, 7), (5, 3), (16, 16), (17, 9), (33, 64), (640, 480), (300, 400), (1920, 37)];
        let targets = [(1, 1), (2, 3), (7, 5), (15, 17), (31, 29), (64, 48), (512, 512), (416, 576), (672, 384)];
        for &(w, h) in &sizes {
            let data = (0..w * h * 3).map(|_| (next() >> 24) as u8).collect();
            let img = RgbImage { width: w as u32, height: h as u32, data };
            for &(tw, th) in &targets {
                let scalar = resize_with(&img, tw, th, false);
                assert_eq!(resize_with(&img, tw, th, true), scalar, "{w}x{h} -> {tw}x{th}");
            }
        }
    }
}

//! Bilinear resizing with antialias, bit-exact with what transformers' image processor
//! gets from torchvision on uint8 images (torch's AVX2 uint8 kernel, itself modelled on
//! Pillow): separable passes, horizontal first; per-axis float64 triangle weights scaled
//! by the downsampling factor, normalised, then quantised to int16 with the largest
//! precision that fits; integer accumulation with a rounding offset; uint8 between passes.
//!
//! Exactness matters: one level of difference on a few percent of pixels moves the vision
//! features by ~1e-2, far above the logits tolerance the engine is held to.

use std::ops::Range;

use super::RgbImage;
#[cfg(target_arch = "x86_64")]
use super::kernels_x86;

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

    #[cfg(target_arch = "x86_64")]
    fn rounding(&self) -> kernels_x86::Rounding {
        kernels_x86::Rounding { bias: self.bias(), precision: self.precision }
    }
}

/// A resize of one image, producing any rectangle of its output rows on demand: the
/// pixel pipeline cuts tiles straight out of it, band by band, so neither the
/// horizontal pass's rows nor the resized image are ever stored whole (their fresh
/// pages cost more than the arithmetic).
pub struct Resizer<'a> {
    src: &'a RgbImage,
    width: usize,
    height: usize,
    /// `None` when the width does not change.
    horizontal: Option<Horizontal>,
    /// `None` when the height does not change.
    vertical: Option<Taps>,
    kernels: Kernels,
}

/// The horizontal pass' taps, and their x86-64 layout where that kernel runs.
struct Horizontal {
    taps: Taps,
    #[cfg(target_arch = "x86_64")]
    simd: Option<kernels_x86::HorizontalTaps>,
}

/// Working memory of one thread, reused from band to band.
#[derive(Default)]
pub struct Scratch {
    /// Horizontal-pass rows of the band's source rows.
    mid: Vec<u8>,
    /// One output row.
    row: Vec<u8>,
    /// The scalar vertical pass' sums.
    acc: Vec<i32>,
}

impl<'a> Resizer<'a> {
    /// Resizes `src` to `width x height`.
    pub fn new(src: &'a RgbImage, width: usize, height: usize) -> Self {
        Self::with_kernels(src, width, height, kernels())
    }

    /// [`Resizer::new`] with the given kernels (only ones [`kernels`] allows).
    fn with_kernels(src: &'a RgbImage, width: usize, height: usize, kernels: Kernels) -> Self {
        let (sw, sh) = (src.width as usize, src.height as usize);
        let horizontal = (width != sw).then(|| {
            let taps = Taps::new(sw, width);
            #[cfg(target_arch = "x86_64")]
            let simd = (kernels >= Kernels::Ssse3)
                .then(|| kernels_x86::HorizontalTaps::new(&taps.start, &taps.weights, taps.max_len, kernels));
            Horizontal {
                taps,
                #[cfg(target_arch = "x86_64")]
                simd,
            }
        });
        let vertical = (height != sh).then(|| Taps::new(sh, height));
        Resizer { src, width, height, horizontal, vertical, kernels }
    }

    /// Passes output rows `rows`, cut to columns `cols`, in order to `emit(y, bytes)`
    /// (`3 * cols.len()` bytes each). Every rectangle gets the bytes of the whole resize.
    pub fn rows(
        &self,
        rows: Range<usize>,
        cols: Range<usize>,
        scratch: &mut Scratch,
        mut emit: impl FnMut(usize, &[u8]),
    ) {
        assert!(rows.end <= self.height && cols.end <= self.width, "rectangle outside the output");
        let row_len = cols.len() * 3;
        // The source rows the band reads (tap windows move down monotonically).
        let sources = match &self.vertical {
            Some(t) if !rows.is_empty() => {
                t.start[rows.start]..rows.clone().map(|y| t.start[y] + t.len[y]).max().unwrap_or(0)
            }
            _ => rows.clone(),
        };
        let Scratch { mid, row, acc } = scratch;
        let sw = self.src.width as usize;
        let mid: &[u8] = match &self.horizontal {
            Some(h) => {
                mid.resize(sources.len() * row_len, 0);
                for (y, dst) in sources.clone().zip(mid.chunks_exact_mut(row_len.max(1))) {
                    self.horizontal_row(h, y, cols.start, dst);
                }
                mid
            }
            // Whole source rows are used as they are; a column range is copied out.
            None if cols.len() == sw => &self.src.data[sources.start * row_len..sources.end * row_len],
            None => {
                mid.clear();
                for y in sources.clone() {
                    mid.extend_from_slice(&self.src.data[(y * sw + cols.start) * 3..(y * sw + cols.end) * 3]);
                }
                mid
            }
        };
        for y in rows {
            match &self.vertical {
                Some(t) => {
                    row.resize(row_len, 0);
                    acc.resize(row_len, 0);
                    let (start, w) = t.of(y);
                    vertical_row(t, &mid[(start - sources.start) * row_len..], w, row, acc, self.kernels);
                    emit(y, row);
                }
                None => emit(y, &mid[(y - sources.start) * row_len..(y - sources.start + 1) * row_len]),
            }
        }
    }

    /// Source row `y` resized to output columns `first..first + dst.len() / 3`.
    fn horizontal_row(&self, h: &Horizontal, y: usize, first: usize, dst: &mut [u8]) {
        let taps = &h.taps;
        let sw = self.src.width as usize;
        let row = &self.src.data[y * sw * 3..(y + 1) * sw * 3];
        let pixel = |x: usize, px: &mut [u8]| {
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
        #[cfg(target_arch = "x86_64")]
        if let Some(t) = &h.simd {
            // SAFETY: `simd` exists only where `kernels()` allows SSSE3.
            unsafe { kernels_x86::horizontal_row(&self.src.data, y * sw * 3, first, dst, t, taps.rounding(), pixel) };
            return;
        }
        for (x, px) in (first..).zip(dst.chunks_exact_mut(3)) {
            pixel(x, px);
        }
    }
}

/// One output row of the vertical pass: `dst[j] = round(sum_k w[k] * mid[k * dst.len() + j])`;
/// `acc` is at least `dst.len()` long.
fn vertical_row(taps: &Taps, mid: &[u8], w: &[i32], dst: &mut [u8], acc: &mut [i32], kernels: Kernels) {
    let row_len = dst.len();
    // Columns `first..` summed in `acc`.
    let mut columns = |first: usize, dst: &mut [u8]| {
        let acc = &mut acc[..dst.len()];
        acc.fill(taps.bias());
        for (k, &wk) in w.iter().enumerate() {
            for (a, &v) in acc.iter_mut().zip(&mid[k * row_len + first..k * row_len + first + dst.len()]) {
                *a += v as i32 * wk;
            }
        }
        for (d, &a) in dst.iter_mut().zip(acc.iter()) {
            *d = taps.round(a);
        }
    };
    #[cfg(target_arch = "x86_64")]
    if kernels >= Kernels::Ssse3 {
        let wide = kernels == Kernels::Avx2;
        // SAFETY: SSE2 is part of x86-64; `wide` only where `kernels()` found AVX2.
        unsafe { kernels_x86::vertical_row(mid, w, dst, taps.rounding(), wide, columns) };
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = kernels;
    columns(0, dst);
}

/// Which SIMD kernels the pixel pipeline runs; each gives the scalar code's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // only x86-64 has SIMD kernels
pub(super) enum Kernels {
    Scalar,
    /// x86-64 with SSSE3: both resize passes four to sixteen values at a time.
    Ssse3,
    /// x86-64 with AVX2 too: eight horizontal pixels at a time, and normalising.
    Avx2,
}

/// The best kernels this CPU runs (checked once per process).
pub(super) fn kernels() -> Kernels {
    #[cfg(target_arch = "x86_64")]
    static KERNELS: std::sync::LazyLock<Kernels> = std::sync::LazyLock::new(kernels_x86::best);
    #[cfg(not(target_arch = "x86_64"))]
    static KERNELS: std::sync::LazyLock<Kernels> = std::sync::LazyLock::new(|| Kernels::Scalar);
    *KERNELS
}

/// Resizes `src` to `width x height`.
pub fn resize(src: &RgbImage, width: usize, height: usize) -> RgbImage {
    whole(&Resizer::new(src, width, height))
}

/// Every output row of `r`, in one image.
fn whole(r: &Resizer<'_>) -> RgbImage {
    let mut data = Vec::with_capacity(r.width * r.height * 3);
    r.rows(0..r.height, 0..r.width, &mut Scratch::default(), |_, row| data.extend_from_slice(row));
    RgbImage { width: r.width as u32, height: r.height as u32, data }
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
        let mut seed = 0x2545_f491_u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        let sizes = [(1, 1), (1, 7), (5, 3), (16, 16), (17, 9), (33, 64), (640, 480), (300, 400), (1920, 37)];
        let targets = [(1, 1), (2, 3), (7, 5), (15, 17), (31, 29), (64, 48), (512, 512), (416, 576), (672, 384)];
        let levels = [Kernels::Ssse3, Kernels::Avx2].into_iter().filter(|&k| k <= kernels());
        for level in levels {
            for &(w, h) in &sizes {
                let data = (0..w * h * 3).map(|_| (next() >> 24) as u8).collect();
                let img = RgbImage { width: w as u32, height: h as u32, data };
                for &(tw, th) in &targets {
                    let scalar = whole(&Resizer::with_kernels(&img, tw, th, Kernels::Scalar));
                    let simd = whole(&Resizer::with_kernels(&img, tw, th, level));
                    assert_eq!(simd, scalar, "{level:?}: {w}x{h} -> {tw}x{th}");
                }
            }
        }
    }

    /// Any rectangle of output rows, through any scratch memory, holds the whole resize's
    /// bytes: bands that start and end anywhere, column ranges at both edges, each axis
    /// kept, up- or downscaled.
    #[test]
    fn rectangles_are_crops_of_the_whole() {
        let mut seed = 0x9e37_79b9_u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        let sizes = [(37, 23), (64, 64), (300, 41)];
        let targets = [(37, 23), (37, 50), (90, 23), (20, 11), (128, 96), (16, 64)];
        for &(w, h) in &sizes {
            let data = (0..w * h * 3).map(|_| (next() >> 24) as u8).collect();
            let img = RgbImage { width: w as u32, height: h as u32, data };
            for &(tw, th) in &targets {
                let r = Resizer::new(&img, tw, th);
                let full = whole(&r);
                let mut scratch = Scratch::default();
                for _ in 0..20 {
                    let (a, b) = (next() as usize % th, next() as usize % th);
                    let (c, d) = (next() as usize % tw, next() as usize % tw);
                    let (rows, cols) = (a.min(b)..a.max(b) + 1, c.min(d)..c.max(d) + 1);
                    let mut seen = rows.start;
                    r.rows(rows.clone(), cols.clone(), &mut scratch, |y, bytes| {
                        assert_eq!(y, seen);
                        seen += 1;
                        let at = (y * tw + cols.start) * 3;
                        assert_eq!(
                            bytes,
                            &full.data[at..at + cols.len() * 3],
                            "{w}x{h} -> {tw}x{th}: row {y} cols {cols:?}"
                        );
                    });
                    assert_eq!(seen, rows.end);
                }
            }
        }
    }
}

//! The pixel pipeline: resize (bilinear with antialias, as torchvision/PIL do it), cut the
//! tiles row-major, add the thumbnail, flatten 16x16 patches as (dy, dx, channel), and
//! normalise to [-1, 1].

use std::sync::{Mutex, PoisonError};

use crate::error::Result;
use crate::recycle;

use super::RgbImage;
use super::parallel::work_threads;
use super::plan::{Geometry, TileGrid};
use super::resize::{Kernels, Resizer, Scratch, kernels};

/// Model-ready tensors for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessedImage {
    /// `[num_entries, patches_per_entry, patch_dim]`, row-major.
    pub pixel_values: Vec<f32>,
    /// `[num_entries, patches_per_entry]`: 1 for real patches, 0 for padding.
    pub pixel_attention_mask: Vec<i64>,
    /// `[num_entries, 2]`: (patch rows, patch cols) of each entry, unpadded.
    pub spatial_shapes: Vec<i64>,
    pub num_entries: usize,
    pub patches_per_entry: usize,
    pub patch_dim: usize,
    pub grid: TileGrid,
}

/// Byte to model input: (b/255 - 0.5) / 0.5, computed as transformers' fused normalise
/// does (a true division, so the table holds exactly its results).
#[inline]
fn normalise(b: u8) -> f32 {
    (b as f32 - 127.5) / 127.5
}

/// [`normalise`] for every byte.
fn normalise_table() -> [f32; 256] {
    std::array::from_fn(|b| normalise(b as u8))
}

/// `out[i] = normalise(src[i])`, by AVX2 where `avx2` says the CPU has it.
#[inline]
fn normalise_into(out: &mut [f32], src: &[u8], table: &[f32; 256], avx2: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is true only where `kernels()` found AVX2.
        unsafe { super::kernels_x86::normalise(out, src) };
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = avx2;
    for (o, &b) in out.iter_mut().zip(src) {
        *o = table[b as usize];
    }
}

/// How entries are padded to a common number of patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// To the per-axis maximum patch grid of the image (`max(h) * max(w)`), as the
    /// public preprocessing API reports it.
    PerAxis,
    /// To the largest entry's patch count: less padding for the vision encoder to carry;
    /// the attention mask makes the features identical.
    Tight,
}

/// Runs the pixel pipeline for `image` under an already computed `grid`.
pub fn preprocess_with_grid(image: &RgbImage, grid: &TileGrid) -> Result<PreprocessedImage> {
    preprocess_padded(image, grid, Padding::PerAxis)
}

/// Patch rows per unit of work: small enough to share an image between cores and to keep
/// a band's horizontal-pass rows in cache, large enough that the rows a band's vertical
/// taps share with the next (computed by both) stay a few percent.
const BAND_PATCH_ROWS: usize = 4;

/// Output values below which one thread does the whole image (threads cost ~0.1 ms).
const PARALLEL_FROM: usize = 1 << 18;

/// One entry's rectangle of a resized image: `x0, y0` and `h x w` pixels.
#[derive(Clone, Copy)]
struct Entry {
    /// 0: the tile canvas, 1: the thumbnail.
    source: usize,
    x0: usize,
    y0: usize,
    h: usize,
    w: usize,
}

/// A unit of work with the output values it alone writes.
enum Work<'o> {
    /// Patch rows `first_row..` of `entry` (as many as `out` holds).
    Band { entry: Entry, first_row: usize, out: &'o mut [f32] },
    /// Padding patches.
    Zeros(&'o mut [f32]),
}

/// [`preprocess_with_grid`] with a choice of padding.
pub fn preprocess_padded(image: &RgbImage, grid: &TileGrid, padding: Padding) -> Result<PreprocessedImage> {
    let g = Geometry::LFM2_VL;
    let p = g.patch_size;
    let patch_dim = p * p * 3;

    // Entries are crops of the resized canvas, then the thumbnail.
    let (th, tw) = grid.tile;
    let sources: Vec<Resizer<'_>> = std::iter::once(Resizer::new(image, grid.cols * tw, grid.rows * th))
        .chain(grid.thumbnail.map(|(h, w)| Resizer::new(image, w, h)))
        .collect();
    let mut entries = Vec::with_capacity(grid.num_entries());
    for r in 0..grid.rows {
        for c in 0..grid.cols {
            entries.push(Entry { source: 0, x0: c * tw, y0: r * th, h: th, w: tw });
        }
    }
    if let Some((h, w)) = grid.thumbnail {
        entries.push(Entry { source: 1, x0: 0, y0: 0, h, w });
    }

    let per_entry = match padding {
        Padding::PerAxis => {
            let max_hp = entries.iter().map(|e| e.h / p).max().unwrap_or(0);
            let max_wp = entries.iter().map(|e| e.w / p).max().unwrap_or(0);
            max_hp * max_wp
        }
        Padding::Tight => entries.iter().map(|e| (e.h / p) * (e.w / p)).max().unwrap_or(0),
    };
    let n = entries.len();
    let mut mask = vec![0i64; n * per_entry];
    let mut shapes = Vec::with_capacity(n * 2);
    for (e, entry) in entries.iter().enumerate() {
        shapes.extend([(entry.h / p) as i64, (entry.w / p) as i64]);
        mask[e * per_entry..e * per_entry + (entry.h / p) * (entry.w / p)].fill(1);
    }

    // Every value is written below (real patches by their band, padding by `Zeros`), so a
    // kept buffer's old contents never show.
    let mut pixel_values: Vec<f32> = recycle::take(n * per_entry * patch_dim);
    let parallel = pixel_values.len() >= PARALLEL_FROM;
    let mut work = Vec::new();
    for (entry, mut out) in entries.iter().zip(pixel_values.chunks_exact_mut(per_entry * patch_dim)) {
        let (hp, wp) = (entry.h / p, entry.w / p);
        for first_row in (0..hp).step_by(BAND_PATCH_ROWS) {
            let rows = BAND_PATCH_ROWS.min(hp - first_row);
            let (band, rest) = out.split_at_mut(rows * wp * patch_dim);
            work.push(Work::Band { entry: *entry, first_row, out: band });
            out = rest;
        }
        if !out.is_empty() {
            work.push(Work::Zeros(out));
        }
    }
    let table = normalise_table();
    let avx2 = kernels() == Kernels::Avx2;
    let run = |work: Work<'_>, scratch: &mut Scratch| match work {
        Work::Zeros(out) => out.fill(0.0),
        Work::Band { entry, first_row, out } => {
            let wp = entry.w / p;
            let y0 = entry.y0 + first_row * p;
            let rows = y0..y0 + out.len() / (wp * patch_dim) * p;
            sources[entry.source].rows(rows, entry.x0..entry.x0 + entry.w, scratch, |y, bytes| {
                // Row `dy` of each patch in this band's patch row `py`.
                let (py, dy) = ((y - y0) / p, (y - y0) % p);
                for (px, src) in bytes.chunks_exact(p * 3).enumerate() {
                    let at = (py * wp + px) * patch_dim + dy * p * 3;
                    normalise_into(&mut out[at..at + p * 3], src, &table, avx2);
                }
            });
        }
    };
    let threads = if parallel { work_threads(work.len()) } else { 1 };
    // Bands go to whichever thread is free (entries differ in size); this thread is one of
    // them, and the only one for a small image.
    let queue = Mutex::new(work.into_iter());
    let worker = || {
        let mut scratch = Scratch::default();
        while let Some(w) = { queue.lock().unwrap_or_else(PoisonError::into_inner).next() } {
            run(w, &mut scratch);
        }
    };
    std::thread::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(worker);
        }
        worker();
    });
    Ok(PreprocessedImage {
        pixel_values,
        pixel_attention_mask: mask,
        spatial_shapes: shapes,
        num_entries: n,
        patches_per_entry: per_entry,
        patch_dim,
        grid: *grid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(w: u32, h: u32, rgb: [u8; 3]) -> RgbImage {
        RgbImage { width: w, height: h, data: rgb.iter().copied().cycle().take((w * h * 3) as usize).collect() }
    }

    #[test]
    fn red_square_first_patch() {
        let img = solid(256, 256, [255, 0, 0]);
        let grid = super::super::plan::plan(256, 256, &Default::default()).unwrap();
        let pre = preprocess_with_grid(&img, &grid).unwrap();
        assert_eq!(&pre.pixel_values[..3], &[1.0, -1.0, -1.0]);
        assert_eq!(pre.spatial_shapes, vec![16, 16]);
        assert_eq!(pre.patches_per_entry, 256);
    }

    #[test]
    fn multi_tile_layout_and_padding() {
        let img = solid(1920, 1080, [0, 255, 0]);
        let grid = super::super::plan::plan(1920, 1080, &Default::default()).unwrap();
        let pre = preprocess_with_grid(&img, &grid).unwrap();
        assert_eq!(pre.num_entries, 9);
        // tiles are 32x32 patches, the thumbnail 24x42: padded per axis to 32x42
        assert_eq!(pre.patches_per_entry, 32 * 42);
        assert_eq!(&pre.spatial_shapes[16..], &[24, 42]);
        let real: i64 = pre.pixel_attention_mask[8 * pre.patches_per_entry..].iter().sum();
        assert_eq!(real, 24 * 42);
    }

    #[test]
    fn patch_values_are_row_then_column_then_channel() {
        // 32x32 image whose pixel (x, y) is (x, y, 7): the first patch's second value-triple
        // is pixel (1, 0) and its 17th triple is pixel (0, 1).
        let mut data = Vec::new();
        for y in 0..32u8 {
            for x in 0..32u8 {
                data.extend([x, y, 7]);
            }
        }
        let img = RgbImage { width: 32, height: 32, data };
        let grid = TileGrid::new(1, 1, (32, 32), None).unwrap();
        let pre = preprocess_with_grid(&img, &grid).unwrap();
        assert_eq!(pre.pixel_values[3], normalise(1));
        assert_eq!(pre.pixel_values[16 * 3 + 1], normalise(1));
        // second patch starts at pixel (16, 0)
        assert_eq!(pre.pixel_values[768], normalise(16));
    }
}

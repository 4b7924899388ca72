//! The pixel pipeline: resize (bilinear with antialias, as torchvision/PIL do it), cut the
//! tiles row-major, add the thumbnail, flatten 16x16 patches as (dy, dx, channel), and
//! normalise to [-1, 1].

use crate::error::Result;

use super::RgbImage;
use super::parallel::par_items;
use super::plan::{Geometry, TileGrid};
use super::resize::resize;

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

/// [`preprocess_with_grid`] with a choice of padding.
pub fn preprocess_padded(image: &RgbImage, grid: &TileGrid, padding: Padding) -> Result<PreprocessedImage> {
    let g = Geometry::LFM2_VL;
    let p = g.patch_size;
    let patch_dim = p * p * 3;

    // Entries as (source image, x0, y0, h, w): crops of the resized canvas, then the thumbnail.
    let (th, tw) = grid.tile;
    let canvas = resize(image, grid.cols * tw, grid.rows * th);
    let thumb = grid.thumbnail.map(|(h, w)| resize(image, w, h));
    let mut entries: Vec<(&RgbImage, usize, usize, usize, usize)> = Vec::with_capacity(grid.num_entries());
    for r in 0..grid.rows {
        for c in 0..grid.cols {
            entries.push((&canvas, c * tw, r * th, th, tw));
        }
    }
    if let (Some(t), Some((h, w))) = (thumb.as_ref(), grid.thumbnail) {
        entries.push((t, 0, 0, h, w));
    }

    let per_entry = match padding {
        Padding::PerAxis => {
            let max_hp = entries.iter().map(|e| e.3 / p).max().unwrap_or(0);
            let max_wp = entries.iter().map(|e| e.4 / p).max().unwrap_or(0);
            max_hp * max_wp
        }
        Padding::Tight => entries.iter().map(|e| (e.3 / p) * (e.4 / p)).max().unwrap_or(0),
    };
    let n = entries.len();
    let mut mask = vec![0i64; n * per_entry];
    let mut shapes = Vec::with_capacity(n * 2);
    for (e, &(_, _, _, h, w)) in entries.iter().enumerate() {
        shapes.extend([(h / p) as i64, (w / p) as i64]);
        mask[e * per_entry..e * per_entry + (h / p) * (w / p)].fill(1);
    }

    // Zero-filled by the allocator, so padding needs no writes; entries are written in
    // parallel, each touching only its own pages.
    let mut pixel_values = vec![0f32; n * per_entry * patch_dim];
    crate::heap::prefer_huge_pages(&mut pixel_values);
    let table = normalise_table();
    let entry_len = per_entry * patch_dim;
    par_items(&mut pixel_values, entry_len, 1 << 18, |first, run| {
        for (k, out) in run.chunks_exact_mut(entry_len).enumerate() {
            let (src, x0, y0, h, w) = entries[first + k];
            let (hp, wp) = (h / p, w / p);
            let stride = src.width as usize * 3;
            for py in 0..hp {
                for px in 0..wp {
                    let base = (py * wp + px) * patch_dim;
                    for dy in 0..p {
                        let row = (y0 + py * p + dy) * stride + (x0 + px * p) * 3;
                        let out = &mut out[base + dy * p * 3..base + (dy + 1) * p * 3];
                        for (o, &b) in out.iter_mut().zip(&src.data[row..row + p * 3]) {
                            *o = table[b as usize];
                        }
                    }
                }
            }
        }
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

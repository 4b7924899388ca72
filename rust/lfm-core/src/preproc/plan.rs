//! The tile-grid plan: how one image of `width x height` pixels becomes tiles and tokens.
//!
//! A port of transformers' `Lfm2VlImageProcessor` arithmetic (smart resize, the "too
//! large" test, the closest-aspect-ratio grid with its tie rule, the thumbnail), working on
//! header dimensions only, so requests can be planned before any pixel is decoded.

use crate::error::{Error, Result};
use crate::options::ImageBudget;

use super::target_ratios::TABLE;

/// Preprocessing geometry of LFM2-VL (`preprocessor_config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Side of one vision patch, in pixels.
    pub patch_size: usize,
    /// Pixel-unshuffle factor: `downsample^2` patches become one token.
    pub downsample: usize,
    /// Side of one main tile, in pixels.
    pub tile_size: usize,
}

impl Geometry {
    pub const LFM2_VL: Geometry = Geometry { patch_size: 16, downsample: 2, tile_size: 512 };

    /// Pixels per token along one axis (32).
    pub fn unit(&self) -> usize {
        self.patch_size * self.downsample
    }

    /// Tokens of an `h x w` entry (both multiples of [`Geometry::unit`]). Saturates rather
    /// than wraps, so an absurd size reads as "too many", never as a small count.
    pub fn tokens(&self, (h, w): (usize, usize)) -> usize {
        (h / self.unit()).saturating_mul(w / self.unit())
    }
}

/// The plan for one image: `rows x cols` main tiles of `tile` (h, w) pixels, then an
/// optional thumbnail of the whole image. A 1x1 grid is one smart-resized tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TileGrid {
    pub rows: usize,
    pub cols: usize,
    /// (height, width) of each main tile.
    pub tile: (usize, usize),
    /// (height, width) of the thumbnail, when there is one.
    pub thumbnail: Option<(usize, usize)>,
}

impl TileGrid {
    /// Checks that a hand-made grid is one the model can consume.
    pub fn new(rows: usize, cols: usize, tile: (usize, usize), thumbnail: Option<(usize, usize)>) -> Result<Self> {
        let unit = Geometry::LFM2_VL.unit();
        let in_range = |n: usize| (1..=crate::options::MAX_TILES_CAP).contains(&n);
        if !in_range(rows) {
            return Err(Error::option("rows", rows, "1 to 10"));
        }
        if !in_range(cols) {
            return Err(Error::option("cols", cols, "1 to 10"));
        }
        for (name, (h, w)) in std::iter::once(("tile", tile)).chain(thumbnail.map(|t| ("thumbnail", t))) {
            if h == 0 || w == 0 || h % unit != 0 || w % unit != 0 {
                return Err(Error::option(name, format!("({h}, {w})"), format!("positive multiples of {unit}")));
            }
            // No entry the model consumes has more tokens than an image may have at all (a
            // 512x512 tile is 256); without this bound the token counts wrap and
            // `placeholder_text` tries to allocate terabytes.
            let cap = crate::options::MAX_IMAGE_TOKENS_CAP;
            if Geometry::LFM2_VL.tokens((h, w)) > cap {
                return Err(Error::option(
                    name,
                    format!("({h}, {w})"),
                    format!("at most {cap} tokens, one per {unit}x{unit} pixels"),
                ));
            }
        }
        if thumbnail.is_some() && rows * cols == 1 {
            return Err(Error::option("thumbnail", "a thumbnail on a 1x1 grid", "None for a single tile"));
        }
        Ok(TileGrid { rows, cols, tile, thumbnail })
    }

    /// True when the image is cut into several tiles (row/column markers are emitted).
    pub fn is_multi_tile(&self) -> bool {
        self.rows > 1 || self.cols > 1
    }

    /// Entries fed to the vision encoder: the tiles, then the thumbnail.
    pub fn num_entries(&self) -> usize {
        self.rows * self.cols + usize::from(self.thumbnail.is_some())
    }

    /// Tokens of one main tile.
    pub fn tokens_per_tile(&self) -> usize {
        Geometry::LFM2_VL.tokens(self.tile)
    }

    /// Tokens of the thumbnail (0 without one).
    pub fn thumbnail_tokens(&self) -> usize {
        self.thumbnail.map_or(0, |t| Geometry::LFM2_VL.tokens(t))
    }

    /// `<image>` tokens this image becomes (markers and wrappers not counted).
    pub fn num_image_tokens(&self) -> usize {
        // Saturating: the fields are public, so a grid built without `new` may be absurd.
        (self.rows.saturating_mul(self.cols))
            .saturating_mul(self.tokens_per_tile())
            .saturating_add(self.thumbnail_tokens())
    }

    /// Structural tokens around the image tokens: start/end, one marker per tile, and the
    /// thumbnail marker.
    pub fn num_structural_tokens(&self) -> usize {
        let markers =
            if self.is_multi_tile() { self.rows * self.cols + usize::from(self.thumbnail.is_some()) } else { 0 };
        2 + markers
    }

    /// Entry sizes (h, w) in the order the vision encoder sees them.
    pub fn entry_sizes(&self) -> Vec<(usize, usize)> {
        let mut v = vec![self.tile; self.rows * self.cols];
        v.extend(self.thumbnail);
        v
    }
}

/// Python's `round()` (half to even) of `n / factor`, times `factor`.
fn round_by_factor(n: usize, factor: usize) -> usize {
    let q = n as f64 / factor as f64;
    let r = q.round();
    let r = if (q - q.trunc()).abs() == 0.5 && r % 2.0 != 0.0 { r - q.signum() } else { r };
    r as usize * factor
}

/// `h * w` as f64, computed in u128: sides near `u32::MAX` overflow a u64 product (and any
/// usize product on 32-bit targets), and a wrapped area made huge images look tiny.
fn area(h: usize, w: usize) -> f64 {
    (h as u128 * w as u128) as f64
}

/// transformers' `smart_resize`: both sides multiples of 32, area within the token budget,
/// aspect ratio kept as closely as possible. Returns (height, width).
pub fn smart_resize(height: usize, width: usize, min_tokens: usize, max_tokens: usize) -> (usize, usize) {
    let f = Geometry::LFM2_VL.unit();
    let min_px = (min_tokens * f * f) as f64;
    let max_px = (max_tokens * f * f) as f64;
    let (h, w) = (height as f64, width as f64);
    let mut hb = f.max(round_by_factor(height, f));
    let mut wb = f.max(round_by_factor(width, f));
    if area(hb, wb) > max_px {
        let beta = (h * w / max_px).sqrt();
        hb = f.max(((h / beta / f as f64).floor() as usize) * f);
        wb = f.max(((w / beta / f as f64).floor() as usize) * f);
    } else if area(hb, wb) < min_px {
        let beta = (min_px / (h * w)).sqrt();
        hb = ((h * beta / f as f64).ceil() as usize) * f;
        wb = ((w * beta / f as f64).ceil() as usize) * f;
    }
    (hb, wb)
}

/// transformers' `_is_image_too_large` (note the clamp to one patch, not one token).
fn is_too_large(height: usize, width: usize, budget: &ImageBudget) -> bool {
    let g = Geometry::LFM2_VL;
    let hb = g.patch_size.max(round_by_factor(height, g.unit()));
    let wb = g.patch_size.max(round_by_factor(width, g.unit()));
    area(hb, wb) > (budget.max_image_tokens * g.unit() * g.unit()) as f64 * budget.max_pixels_tolerance
}

/// transformers' `find_closest_aspect_ratio` over the CPython-ordered candidates.
/// Returns (cols, rows).
fn closest_grid(width: usize, height: usize, budget: &ImageBudget) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let image_area = area(width, height);
    let tile = Geometry::LFM2_VL.tile_size as f64;
    let mut best_diff = f64::INFINITY;
    let mut best = (1, 1);
    for &(c, r) in TABLE[budget.min_tiles - 1][budget.max_tiles - 1] {
        let (c, r) = (c as usize, r as usize);
        let diff = (aspect - c as f64 / r as f64).abs();
        if diff < best_diff {
            best_diff = diff;
            best = (c, r);
        } else if diff == best_diff && image_area > 0.5 * tile * tile * (c * r) as f64 {
            best = (c, r);
        }
    }
    best
}

/// Plans one image of `width x height` pixels under `budget`.
pub fn plan(width: u32, height: u32, budget: &ImageBudget) -> Result<TileGrid> {
    if width == 0 || height == 0 {
        return Err(Error::ImageTooSmall { width, height });
    }
    budget.validate()?;
    let (w, h) = (width as usize, height as usize);
    let g = Geometry::LFM2_VL;
    let resized = smart_resize(h, w, budget.min_image_tokens, budget.max_image_tokens);
    // transformers lets `smart_resize` overshoot `max_image_tokens` (its upscaling rounds
    // each side up: a 100x75 image under a 64-token budget gets 70 tokens), and so does lfm.
    // Its processor pads entries to the patches of a main tile (or of `max_image_tokens`,
    // if more) and gives a larger one a mask that does not match its pixels (1x2000 under
    // the default budget: 358 tokens), so past that the plan is refused.
    let check = |size: (usize, usize)| {
        let tokens = g.tokens(size);
        let limit = g.tokens((g.tile_size, g.tile_size)).max(budget.max_image_tokens);
        if tokens > limit { Err(Error::TileGridImpossible { width, height, tokens, limit }) } else { Ok(size) }
    };
    let splitting = !(budget.min_tiles == 1 && budget.max_tiles == 1);
    if splitting && is_too_large(h, w, budget) {
        let (cols, rows) = closest_grid(w, h, budget);
        let thumbnail = if budget.use_thumbnail && rows * cols != 1 { Some(check(resized)?) } else { None };
        Ok(TileGrid { rows, cols, tile: (g.tile_size, g.tile_size), thumbnail })
    } else {
        Ok(TileGrid { rows: 1, cols: 1, tile: check(resized)?, thumbnail: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_half_even() {
        assert_eq!(round_by_factor(16, 32), 0); // 0.5 -> 0
        assert_eq!(round_by_factor(48, 32), 64); // 1.5 -> 2
        assert_eq!(round_by_factor(80, 32), 64); // 2.5 -> 2
        assert_eq!(round_by_factor(81, 32), 96);
    }

    /// (rows, cols, tile, thumbnail)
    type Expected = (usize, usize, (usize, usize), Option<(usize, usize)>);

    /// (w, h, budget) -> expected plan, from the seed crate's parity table.
    #[test]
    fn parity_table() {
        let q = ImageBudget::quality();
        let cases: &[(u32, u32, ImageBudget, Expected)] = &[
            (256, 256, q, (1, 1, (256, 256), None)),
            (1024, 1024, q, (2, 2, (512, 512), Some((512, 512)))),
            (723, 724, q, (2, 2, (512, 512), Some((512, 480)))),
            (1920, 1080, q, (2, 4, (512, 512), Some((384, 672)))),
            (1080, 1920, q, (4, 2, (512, 512), Some((672, 384)))),
            (1280, 720, q, (1, 2, (512, 512), Some((384, 672)))),
            (320, 240, q, (1, 1, (256, 320), None)),
            (640, 480, q, (1, 1, (416, 576), None)),
            (32, 1024, q, (1, 1, (1472, 64), None)),
            (1, 8000, q, (1, 1, (8000, 32), None)),
            (720, 730, q, (1, 1, (512, 480), None)),
            (1024, 768, q, (2, 3, (512, 512), Some((416, 576)))),
            (1024, 1024, ImageBudget::fast(), (2, 2, (512, 512), None)),
        ];
        for &(w, h, b, (rows, cols, tile, thumb)) in cases {
            let g = plan(w, h, &b).unwrap();
            assert_eq!((g.rows, g.cols, g.tile, g.thumbnail), (rows, cols, tile, thumb), "{w}x{h}");
        }
    }

    #[test]
    fn ties_follow_cpython_order() {
        let b = ImageBudget { min_tiles: 4, max_tiles: 4, ..ImageBudget::quality() };
        let g = plan(1280, 512, &b).unwrap();
        assert_eq!((g.rows, g.cols), (2, 2));
    }

    #[test]
    fn small_images_overshoot_max_image_tokens_up_to_a_main_tile() {
        // transformers' numbers (Lfm2VlImageProcessor, spatial shapes x 16).
        let single = ImageBudget::single_tile(64);
        assert_eq!(plan(100, 75, &single).unwrap().tile, (224, 320)); // 70 tokens
        assert_eq!(plan(10, 400, &single).unwrap().tile, (1632, 64)); // 102 tokens
        assert_eq!(plan(3, 700, &ImageBudget::quality()).unwrap().tile, (3936, 32)); // 123 tokens
        let e = plan(1, 2000, &ImageBudget::quality()).unwrap_err();
        assert!(matches!(e, Error::TileGridImpossible { tokens: 358, limit: 256, .. }), "{e:?}");
    }

    #[test]
    fn extreme_aspect_fails_closed() {
        for (w, h) in [(1, 100_000), (100_000, 1), (1, 50_000)] {
            assert!(matches!(plan(w, h, &ImageBudget::quality()), Err(Error::TileGridImpossible { .. })));
        }
        assert!(matches!(plan(0, 5, &ImageBudget::quality()), Err(Error::ImageTooSmall { .. })));
    }

    #[test]
    fn hand_made_grid_entries_are_bounded() {
        // The largest entries allowed: 1024 tokens each, on the largest grid.
        let g = TileGrid::new(10, 10, (1024, 1024), Some((32, 32 * 1024))).unwrap();
        assert_eq!(g.num_image_tokens(), 100 * 1024 + 1024);
        for tile in [(1056, 1024), (32, 32 * 1025), (1 << 25, 1 << 25), (1 << 62, 1 << 62)] {
            assert!(matches!(TileGrid::new(1, 1, tile, None), Err(Error::InvalidOption { .. })), "{tile:?}");
            assert!(
                matches!(TileGrid::new(2, 2, (512, 512), Some(tile)), Err(Error::InvalidOption { .. })),
                "{tile:?}"
            );
        }
        // Even a grid built field by field never wraps to a small count.
        let g = TileGrid { rows: 10, cols: 10, tile: (1 << 62, 1 << 62), thumbnail: None };
        assert_eq!(g.num_image_tokens(), usize::MAX);
    }

    #[test]
    fn huge_images_do_not_wrap() {
        // (2^32 - 1)^2 wrapped the u64 area to a small number: a 1x1 grid came back.
        let m = u32::MAX;
        let g = plan(m, m, &ImageBudget::quality()).unwrap();
        assert_eq!(g, plan(100_000, 100_000, &ImageBudget::quality()).unwrap());
        assert!(g.rows * g.cols > 1 && g.thumbnail.is_some());
        let (h, w) = smart_resize(m as usize, m as usize, 64, 256);
        assert!(Geometry::LFM2_VL.tokens((h, w)) <= 256, "{h}x{w}");
        assert!(matches!(plan(m, 1, &ImageBudget::quality()), Err(Error::TileGridImpossible { .. })));
    }

    #[test]
    fn token_counts() {
        let g = plan(1920, 1080, &ImageBudget::quality()).unwrap();
        assert_eq!(g.num_image_tokens(), 8 * 256 + 12 * 21);
        assert_eq!(g.num_structural_tokens(), 11);
        assert_eq!(g.num_entries(), 9);
    }
}

//! What one `<image>` in a rendered prompt expands to, as the Lfm2VlProcessor writes it.

use super::plan::TileGrid;

pub const IMAGE_TOKEN: &str = "<image>";
pub const IMAGE_START: &str = "<|image_start|>";
pub const IMAGE_END: &str = "<|image_end|>";
pub const IMAGE_THUMBNAIL: &str = "<|img_thumbnail|>";

/// Row/column marker of the tile at 1-based `(row, col)`.
pub fn tile_marker(row: usize, col: usize) -> String {
    format!("<|img_row_{row}_col_{col}|>")
}

/// The text that replaces one `<image>`: start, per tile (row-major) its marker and
/// tokens, the thumbnail marker and tokens, end. A 1x1 grid has no markers.
pub fn placeholder_text(grid: &TileGrid) -> String {
    // `TileGrid::new` bounds the count; checked anyway, since a grid built field by field
    // is not validated and a wrapped capacity would be silently wrong.
    let capacity = grid.num_image_tokens().checked_add(16).and_then(|n| n.checked_mul(IMAGE_TOKEN.len()));
    let mut s = String::with_capacity(capacity.unwrap_or(0));
    s.push_str(IMAGE_START);
    if grid.is_multi_tile() {
        for r in 1..=grid.rows {
            for c in 1..=grid.cols {
                s.push_str(&tile_marker(r, c));
                s.push_str(&IMAGE_TOKEN.repeat(grid.tokens_per_tile()));
            }
        }
        if grid.thumbnail.is_some() {
            s.push_str(IMAGE_THUMBNAIL);
            s.push_str(&IMAGE_TOKEN.repeat(grid.thumbnail_tokens()));
        }
    } else {
        s.push_str(&IMAGE_TOKEN.repeat(grid.num_image_tokens()));
    }
    s.push_str(IMAGE_END);
    s
}

/// Splits a rendered prompt on `<image>` and splices each image's placeholder in, in order.
/// Returns `None` when the number of `<image>` differs from `grids.len()`.
pub fn expand_placeholders(prompt: &str, grids: &[TileGrid]) -> Option<String> {
    let pieces: Vec<&str> = prompt.split(IMAGE_TOKEN).collect();
    if pieces.len() != grids.len() + 1 {
        return None;
    }
    let mut out = String::with_capacity(prompt.len());
    for (i, piece) in pieces.iter().enumerate() {
        out.push_str(piece);
        if let Some(g) = grids.get(i) {
            out.push_str(&placeholder_text(g));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_tile_has_no_markers() {
        let g = TileGrid::new(1, 1, (64, 64), None).unwrap();
        assert_eq!(placeholder_text(&g), format!("{IMAGE_START}{}{IMAGE_END}", IMAGE_TOKEN.repeat(4)));
    }

    #[test]
    fn markers_are_row_major() {
        let g = TileGrid::new(2, 3, (32, 32), Some((64, 32))).unwrap();
        let t = placeholder_text(&g);
        let markers: Vec<&str> = t.split(IMAGE_TOKEN).filter(|p| !p.is_empty()).collect();
        assert_eq!(
            markers,
            [
                "<|image_start|><|img_row_1_col_1|>",
                "<|img_row_1_col_2|>",
                "<|img_row_1_col_3|>",
                "<|img_row_2_col_1|>",
                "<|img_row_2_col_2|>",
                "<|img_row_2_col_3|>",
                "<|img_thumbnail|>",
                "<|image_end|>"
            ]
        );
        assert_eq!(t.matches(IMAGE_TOKEN).count(), g.num_image_tokens());
    }

    #[test]
    fn expansion_counts_placeholders() {
        let g = TileGrid::new(1, 1, (32, 32), None).unwrap();
        assert!(expand_placeholders("a<image>b", &[g]).is_some());
        assert!(expand_placeholders("a<image>b<image>", &[g]).is_none());
    }
}

//! x86-64 kernels for the two resize passes. They do the scalar passes' integer arithmetic
//! (`resize.rs`): int16 weights times uint8 pixels summed in int32, here by `pmaddwd` two
//! taps at a time, then the same rounding offset and shift, and a clamp to 0..=255 by
//! saturating packs. Integer sums do not depend on their order, so the output is
//! bit-identical to the scalar passes; only 4-16 values go through each instruction. The
//! resize tests compare the two on every shape class.

use std::arch::x86_64::{
    __m128i, _mm_add_epi32, _mm_cvtsi32_si128, _mm_cvtsi128_si32, _mm_loadu_si128, _mm_madd_epi16, _mm_packs_epi32,
    _mm_packus_epi16, _mm_set1_epi32, _mm_setr_epi8, _mm_setzero_si128, _mm_shuffle_epi8, _mm_sra_epi32,
    _mm_storeu_si128, _mm_unpackhi_epi8, _mm_unpacklo_epi8,
};

/// Whether this CPU runs the horizontal kernel (SSSE3's byte shuffle; the vertical one needs
/// only SSE2, which every x86-64 CPU has).
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("ssse3")
}

/// One axis' taps laid out for [`horizontal_row`]: for each output pixel, groups of four taps
/// as two int16 vectors `[w0, w1, w0, w1, w0, w1, 0, 0]` (R, G and B of two neighbouring
/// source pixels per `pmaddwd` lane pair); taps past a pixel's own count weigh zero.
pub(super) struct HorizontalTaps {
    /// Byte offset of each output pixel's first source pixel within the row.
    start: Vec<usize>,
    /// `2 * groups` vectors per output pixel.
    weights: Vec<[i16; 8]>,
    groups: usize,
}

impl HorizontalTaps {
    /// `start[i]` and the `max_len` weights `w[i * max_len..]` of each output pixel.
    pub(super) fn new(start: &[usize], w: &[i32], max_len: usize) -> HorizontalTaps {
        let groups = max_len.div_ceil(4);
        let mut weights = Vec::with_capacity(start.len() * groups * 2);
        for i in 0..start.len() {
            let tap = |k: usize| if k < max_len { w[i * max_len + k] as i16 } else { 0 };
            for pair in 0..groups * 2 {
                let (a, b) = (tap(2 * pair), tap(2 * pair + 1));
                weights.push([a, b, a, b, a, b, 0, 0]);
            }
        }
        HorizontalTaps { start: start.iter().map(|s| s * 3).collect(), weights, groups }
    }

    /// Bytes a pixel's loads read from its first source byte on.
    fn reach(&self) -> usize {
        12 * (self.groups - 1) + 16
    }
}

/// Shifts `acc + bias` right by `shift` lanes-wise, the scalar pass's rounding.
#[inline]
#[target_feature(enable = "sse2")]
fn round(acc: __m128i, bias: __m128i, shift: __m128i) -> __m128i {
    _mm_sra_epi32(_mm_add_epi32(acc, bias), shift)
}

/// Resizes one RGB row horizontally: `src[row..]` holds the source row (and, for loads that
/// reach past its end, whatever follows it in `src`), `dst` the `start.len()` output pixels.
/// Pixels whose loads would leave `src` are left to `scalar(i, dst_pixel)`.
///
/// # Safety
/// The CPU must support SSSE3 ([`available`]).
#[target_feature(enable = "ssse3")]
pub(super) unsafe fn horizontal_row(
    src: &[u8],
    row: usize,
    dst: &mut [u8],
    taps: &HorizontalTaps,
    bias: i32,
    precision: u32,
    scalar: impl Fn(usize, &mut [u8]),
) {
    let (bias, shift) = (_mm_set1_epi32(bias), _mm_cvtsi32_si128(precision as i32));
    let out_w = taps.start.len();
    let safe = |i: usize| row + taps.start[i] + taps.reach() <= src.len();
    let mut i = 0;
    // Four pixels per 16-byte store while the store stays inside `dst`.
    let z = -128i8; // pshufb writes zero for a set high bit
    let rgb = _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, z, z, z, z);
    while i + 4 <= out_w && 3 * i + 16 <= dst.len() && (i..i + 4).all(safe) {
        // SAFETY: the four pixels' loads stay inside `src` (checked).
        let [a, b, c, d] = std::array::from_fn(|k| round(unsafe { accumulate(src, row, taps, i + k) }, bias, shift));
        let out = _mm_shuffle_epi8(_mm_packus_epi16(_mm_packs_epi32(a, b), _mm_packs_epi32(c, d)), rgb);
        let d = &mut dst[3 * i..3 * i + 16];
        // SAFETY: `d` is 16 bytes long; its last 4 bytes are rewritten by the next pixels.
        unsafe { _mm_storeu_si128(d.as_mut_ptr().cast(), out) };
        i += 4;
    }
    for i in i..out_w {
        if !safe(i) {
            scalar(i, &mut dst[i * 3..i * 3 + 3]);
            continue;
        }
        // SAFETY: checked by `safe`.
        let v = round(unsafe { accumulate(src, row, taps, i) }, bias, shift);
        let v16 = _mm_packs_epi32(v, v);
        let bytes = _mm_cvtsi128_si32(_mm_packus_epi16(v16, v16)).to_le_bytes();
        dst[i * 3..i * 3 + 3].copy_from_slice(&bytes[..3]);
    }
}

/// Output pixel `i`'s R, G, B sums (and a zero lane) before rounding.
///
/// # Safety
/// The CPU must support SSSE3, and `row + start[i] + reach()` must not pass `src.len()`.
#[inline]
#[target_feature(enable = "ssse3")]
unsafe fn accumulate(src: &[u8], row: usize, taps: &HorizontalTaps, i: usize) -> __m128i {
    // Bytes (k, k+1) of each channel side by side as int16: taps 0-1 from bytes 0..6 of a
    // 12-byte group, taps 2-3 from bytes 6..12.
    let z = -128i8;
    let first = _mm_setr_epi8(0, z, 3, z, 1, z, 4, z, 2, z, 5, z, z, z, z, z);
    let second = _mm_setr_epi8(6, z, 9, z, 7, z, 10, z, 8, z, 11, z, z, z, z, z);
    let base = row + taps.start[i];
    let w = &taps.weights[i * taps.groups * 2..(i + 1) * taps.groups * 2];
    let mut acc = _mm_setzero_si128();
    for g in 0..taps.groups {
        // SAFETY: base + 12 g + 16 <= base + reach <= src.len() (the caller's promise); the
        // weights are 16-byte arrays.
        let (px, w0, w1) = unsafe {
            (
                _mm_loadu_si128(src.as_ptr().add(base + 12 * g).cast()),
                _mm_loadu_si128(w[2 * g].as_ptr().cast()),
                _mm_loadu_si128(w[2 * g + 1].as_ptr().cast()),
            )
        };
        acc = _mm_add_epi32(acc, _mm_madd_epi16(_mm_shuffle_epi8(px, first), w0));
        acc = _mm_add_epi32(acc, _mm_madd_epi16(_mm_shuffle_epi8(px, second), w1));
    }
    acc
}

/// One output row of the vertical pass: `dst[j] = round(sum_k w[k] * src[(start + k) *
/// dst.len() + j])`. Columns past the last full 16 are left to `scalar(first_column)`.
#[target_feature(enable = "sse2")]
pub(super) fn vertical_row(
    src: &[u8],
    start: usize,
    w: &[i32],
    dst: &mut [u8],
    bias: i32,
    precision: u32,
    scalar: impl FnOnce(usize, &mut [u8]),
) {
    let row_len = dst.len();
    let (bias, shift, zero) = (_mm_set1_epi32(bias), _mm_cvtsi32_si128(precision as i32), _mm_setzero_si128());
    let full = row_len / 16 * 16;
    for j in (0..full).step_by(16) {
        let mut acc = [zero; 4];
        for (p, pair) in w.chunks(2).enumerate() {
            let ka = start + 2 * p;
            // An odd last tap pairs with itself at weight zero.
            let (kb, wb) = if pair.len() == 2 { (ka + 1, pair[1]) } else { (ka, 0) };
            let wv = _mm_set1_epi32((wb << 16) | (pair[0] & 0xffff));
            let (ra, rb) =
                (&src[ka * row_len + j..ka * row_len + j + 16], &src[kb * row_len + j..kb * row_len + j + 16]);
            // SAFETY: both slices are 16 bytes long.
            let (a, b) = unsafe { (_mm_loadu_si128(ra.as_ptr().cast()), _mm_loadu_si128(rb.as_ptr().cast())) };
            // Row a's and row b's byte of each column side by side as int16, four columns
            // per vector.
            let (lo, hi) = (_mm_unpacklo_epi8(a, b), _mm_unpackhi_epi8(a, b));
            let lanes = [
                _mm_unpacklo_epi8(lo, zero),
                _mm_unpackhi_epi8(lo, zero),
                _mm_unpacklo_epi8(hi, zero),
                _mm_unpackhi_epi8(hi, zero),
            ];
            for (a, l) in acc.iter_mut().zip(lanes) {
                *a = _mm_add_epi32(*a, _mm_madd_epi16(l, wv));
            }
        }
        let [a0, a1, a2, a3] = acc.map(|a| round(a, bias, shift));
        let out = _mm_packus_epi16(_mm_packs_epi32(a0, a1), _mm_packs_epi32(a2, a3));
        let d = &mut dst[j..j + 16];
        // SAFETY: `d` is 16 bytes long.
        unsafe { _mm_storeu_si128(d.as_mut_ptr().cast(), out) };
    }
    if full < row_len {
        scalar(full, &mut dst[full..]);
    }
}

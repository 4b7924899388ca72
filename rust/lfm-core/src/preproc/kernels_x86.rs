//! x86-64 kernels for the two resize passes and for normalising. The resize kernels do the
//! scalar passes' integer arithmetic (`resize.rs`): int16 weights times uint8 pixels summed
//! in int32, here by `pmaddwd` two taps at a time, then the same rounding offset and shift,
//! and a clamp to 0..=255 by saturating packs. Integer sums do not depend on their order, so
//! the output is bit-identical to the scalar passes; only 4-32 values go through each
//! instruction (SSE2/SSSE3, or AVX2 where the CPU has it). The resize tests compare every
//! level with the scalar code on every shape class.

use std::arch::x86_64::{
    __m128i, _mm_add_epi32, _mm_cvtsi32_si128, _mm_cvtsi128_si32, _mm_loadl_epi64, _mm_loadu_si128, _mm_madd_epi16,
    _mm_packs_epi32, _mm_packus_epi16, _mm_set1_epi32, _mm_setr_epi8, _mm_setzero_si128, _mm_shuffle_epi8,
    _mm_sra_epi32, _mm_storeu_si128, _mm_unpackhi_epi8, _mm_unpacklo_epi8, _mm256_add_epi32,
    _mm256_broadcastsi128_si256, _mm256_castsi128_si256, _mm256_castsi256_si128, _mm256_cvtepi32_ps,
    _mm256_cvtepu8_epi32, _mm256_div_ps, _mm256_extracti128_si256, _mm256_inserti128_si256, _mm256_loadu_si256,
    _mm256_madd_epi16, _mm256_packs_epi32, _mm256_packus_epi16, _mm256_set1_epi32, _mm256_set1_ps, _mm256_setr_epi8,
    _mm256_setzero_si256, _mm256_shuffle_epi8, _mm256_sra_epi32, _mm256_storeu_ps, _mm256_storeu_si256, _mm256_sub_ps,
    _mm256_unpackhi_epi8, _mm256_unpacklo_epi8,
};

use super::resize::Kernels;

/// The best kernels this CPU runs: SSSE3's byte shuffle for the horizontal pass (the
/// vertical one needs only SSE2, which every x86-64 CPU has), AVX2 for eight horizontal
/// pixels at a time and for normalising.
pub(super) fn best() -> Kernels {
    // The AVX2 level also runs the SSSE3 kernels (the horizontal pass' tail), so it needs
    // both; every AVX2 CPU has SSSE3, but a VM may mask features one by one.
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("ssse3") {
        Kernels::Avx2
    } else if std::arch::is_x86_feature_detected!("ssse3") {
        Kernels::Ssse3
    } else {
        Kernels::Scalar
    }
}

/// One axis' taps laid out for [`horizontal_row`]: for each output pixel, groups of four taps
/// as two int16 vectors `[w0, w1, w0, w1, w0, w1, 0, 0]` (R, G and B of two neighbouring
/// source pixels per `pmaddwd` lane pair); taps past a pixel's own count weigh zero.
pub(super) struct HorizontalTaps {
    /// Byte offset of each output pixel's first source pixel within the row (never
    /// decreasing).
    start: Vec<usize>,
    /// `2 * groups` vectors per output pixel.
    weights: Vec<[i16; 8]>,
    /// With AVX2: the same vectors two pixels to a 256-bit vector. For each block of eight
    /// output pixels counted from pixel 0, pixel pairs (k, k + 4) for k in 0..4, each
    /// `2 * groups` vectors, pixel k's in the low half.
    wide: Option<Vec<[i16; 16]>>,
    groups: usize,
}

impl HorizontalTaps {
    /// `start[i]` and the `max_len` weights `w[i * max_len..]` of each output pixel, for
    /// `kernels` (SSSE3 or AVX2).
    pub(super) fn new(start: &[usize], w: &[i32], max_len: usize, kernels: Kernels) -> HorizontalTaps {
        let groups = max_len.div_ceil(4);
        let mut weights = Vec::with_capacity(start.len() * groups * 2);
        for i in 0..start.len() {
            let tap = |k: usize| if k < max_len { w[i * max_len + k] as i16 } else { 0 };
            for pair in 0..groups * 2 {
                let (a, b) = (tap(2 * pair), tap(2 * pair + 1));
                weights.push([a, b, a, b, a, b, 0, 0]);
            }
        }
        debug_assert!(start.windows(2).all(|s| s[0] <= s[1]));
        let wide = (kernels == Kernels::Avx2).then(|| {
            let vector = |i: usize, v: usize| weights.get(i * groups * 2 + v).copied().unwrap_or([0; 8]);
            let mut wide = Vec::with_capacity(start.len().div_ceil(8) * 8 * groups);
            for block in 0..start.len().div_ceil(8) {
                for k in 0..4 {
                    for v in 0..groups * 2 {
                        let (lo, hi) = (vector(8 * block + k, v), vector(8 * block + k + 4, v));
                        wide.push(std::array::from_fn(|j| if j < 8 { lo[j] } else { hi[j - 8] }));
                    }
                }
            }
            wide
        });
        HorizontalTaps { start: start.iter().map(|s| s * 3).collect(), weights, wide, groups }
    }

    /// Bytes a pixel's loads read from its first source byte on.
    fn reach(&self) -> usize {
        12 * (self.groups - 1) + 16
    }
}

/// The scalar passes' rounding of a sum: add `bias`, shift right by `precision`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rounding {
    pub(super) bias: i32,
    pub(super) precision: u32,
}

/// Shifts `acc + bias` right by `shift` lanes-wise, the scalar pass's rounding.
#[inline]
#[target_feature(enable = "sse2")]
fn round(acc: __m128i, bias: __m128i, shift: __m128i) -> __m128i {
    _mm_sra_epi32(_mm_add_epi32(acc, bias), shift)
}

/// Resizes one RGB row horizontally: `src[row..]` holds the source row (and, for loads that
/// reach past its end, whatever follows it in `src`), `dst` output pixels `first..first +
/// dst.len() / 3`. Pixels whose loads would leave `src` are left to `scalar(i, dst_pixel)`.
///
/// # Safety
/// The CPU must support SSSE3 ([`best`]).
#[target_feature(enable = "ssse3")]
pub(super) unsafe fn horizontal_row(
    src: &[u8],
    row: usize,
    first: usize,
    dst: &mut [u8],
    taps: &HorizontalTaps,
    rounding: Rounding,
    scalar: impl Fn(usize, &mut [u8]),
) {
    let (bias, shift) = (_mm_set1_epi32(rounding.bias), _mm_cvtsi32_si128(rounding.precision as i32));
    let out_w = dst.len() / 3;
    let safe = |i: usize| row + taps.start[first + i] + taps.reach() <= src.len();
    let mut i = 0;
    if taps.wide.is_some() && first.is_multiple_of(8) {
        // SAFETY: `wide` exists only where the CPU has AVX2.
        i = unsafe { eight_at_a_time(src, row, first, dst, taps, bias, shift) };
    }
    // Four pixels per 16-byte store while the store stays inside `dst`.
    let z = -128i8; // pshufb writes zero for a set high bit
    let rgb = _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, z, z, z, z);
    while i + 4 <= out_w && 3 * i + 16 <= dst.len() && (i..i + 4).all(safe) {
        // (A loop, not a closure: closures do not inherit `target_feature`.)
        let mut sums = [_mm_setzero_si128(); 4];
        for (k, v) in sums.iter_mut().enumerate() {
            // SAFETY: the four pixels' loads stay inside `src` (checked).
            *v = round(unsafe { accumulate(src, row, taps, first + i + k) }, bias, shift);
        }
        let [a, b, c, d] = sums;
        let out = _mm_shuffle_epi8(_mm_packus_epi16(_mm_packs_epi32(a, b), _mm_packs_epi32(c, d)), rgb);
        let d = &mut dst[3 * i..3 * i + 16];
        // SAFETY: `d` is 16 bytes long; its last 4 bytes are rewritten by the next pixels.
        unsafe { _mm_storeu_si128(d.as_mut_ptr().cast(), out) };
        i += 4;
    }
    for i in i..out_w {
        if !safe(i) {
            scalar(first + i, &mut dst[i * 3..i * 3 + 3]);
            continue;
        }
        // SAFETY: checked by `safe`.
        let v = round(unsafe { accumulate(src, row, taps, first + i) }, bias, shift);
        let v16 = _mm_packs_epi32(v, v);
        let bytes = _mm_cvtsi128_si32(_mm_packus_epi16(v16, v16)).to_le_bytes();
        dst[i * 3..i * 3 + 3].copy_from_slice(&bytes[..3]);
    }
}

/// [`horizontal_row`] eight pixels at a time, pixels (k, k + 4) side by side in 256-bit
/// vectors, from pixel 0 while the stores stay inside `dst` and the loads inside `src`:
/// how many pixels it wrote. The tap-group count is a constant for the common counts, so
/// the loops unroll and the index checks fold away.
///
/// # Safety
/// The CPU must support AVX2; `first` must be a multiple of 8.
#[target_feature(enable = "avx2")]
unsafe fn eight_at_a_time(
    src: &[u8],
    row: usize,
    first: usize,
    dst: &mut [u8],
    taps: &HorizontalTaps,
    bias: __m128i,
    shift: __m128i,
) -> usize {
    // SAFETY: the caller's promises, passed on.
    unsafe {
        match taps.groups {
            1 => blocks::<1>(src, row, first, dst, taps, bias, shift),
            2 => blocks::<2>(src, row, first, dst, taps, bias, shift),
            3 => blocks::<3>(src, row, first, dst, taps, bias, shift),
            _ => 0,
        }
    }
}

/// [`eight_at_a_time`] for `G` groups of four taps.
///
/// # Safety
/// As for [`eight_at_a_time`], and `taps.groups == G`.
#[target_feature(enable = "avx2")]
unsafe fn blocks<const G: usize>(
    src: &[u8],
    row: usize,
    first: usize,
    dst: &mut [u8],
    taps: &HorizontalTaps,
    bias: __m128i,
    shift: __m128i,
) -> usize {
    let Some(wide) = taps.wide.as_deref() else { return 0 };
    let bias = _mm256_broadcastsi128_si256(bias);
    let z = -128i8;
    #[rustfmt::skip]
    let (first_taps, second_taps, rgb) = (
        _mm256_setr_epi8(0, z, 3, z, 1, z, 4, z, 2, z, 5, z, z, z, z, z, 0, z, 3, z, 1, z, 4, z, 2, z, 5, z, z, z, z, z),
        _mm256_setr_epi8(6, z, 9, z, 7, z, 10, z, 8, z, 11, z, z, z, z, z, 6, z, 9, z, 7, z, 10, z, 8, z, 11, z, z, z, z, z),
        _mm256_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, z, z, z, z, 0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, z, z, z, z),
    );
    let out_w = dst.len() / 3;
    let reach = taps.reach();
    let mut i = 0;
    // Starts never decrease, so the block's last pixel reads furthest; the second store
    // ends 4 bytes past the block, bytes the next pixels rewrite.
    while i + 8 <= out_w && 3 * i + 28 <= dst.len() && row + taps.start[first + i + 7] + reach <= src.len() {
        let starts: &[usize; 8] = taps.start[first + i..first + i + 8].try_into().unwrap_or(&[0; 8]);
        let block = (first + i) / 8;
        let w = &wide[block * 8 * G..(block + 1) * 8 * G];
        // (A loop, not a closure: closures do not inherit `target_feature`.)
        let mut sums = [_mm256_setzero_si256(); 4];
        for (k, acc) in sums.iter_mut().enumerate() {
            let (lo, hi) = (row + starts[k], row + starts[k + 4]);
            for g in 0..G {
                let (w0, w1) = (&w[(k * G + g) * 2], &w[(k * G + g) * 2 + 1]);
                // SAFETY: both pixels start at or before the block's last pixel, whose loads
                // stay inside `src` (checked); the weights are 32-byte arrays.
                let (px, w0, w1) = unsafe {
                    (
                        _mm256_inserti128_si256::<1>(
                            _mm256_castsi128_si256(_mm_loadu_si128(src.as_ptr().add(lo + 12 * g).cast())),
                            _mm_loadu_si128(src.as_ptr().add(hi + 12 * g).cast()),
                        ),
                        _mm256_loadu_si256(w0.as_ptr().cast()),
                        _mm256_loadu_si256(w1.as_ptr().cast()),
                    )
                };
                *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(_mm256_shuffle_epi8(px, first_taps), w0));
                *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(_mm256_shuffle_epi8(px, second_taps), w1));
            }
            *acc = _mm256_sra_epi32(_mm256_add_epi32(*acc, bias), shift);
        }
        let [a, b, c, d] = sums;
        // Lanes: (0, 1 | 4, 5) and (2, 3 | 6, 7), then bytes of pixels 0-3 | 4-7.
        let out = _mm256_shuffle_epi8(_mm256_packus_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d)), rgb);
        let d = &mut dst[3 * i..3 * i + 28];
        // SAFETY: `d` is 28 bytes long.
        unsafe {
            _mm_storeu_si128(d.as_mut_ptr().cast(), _mm256_castsi256_si128(out));
            _mm_storeu_si128(d.as_mut_ptr().add(12).cast(), _mm256_extracti128_si256::<1>(out));
        }
        i += 8;
    }
    i
}

/// `out[i] = (src[i] - 127.5) / 127.5`, eight values per AVX2 division (IEEE division
/// rounds the same in every width, so these are the scalar values).
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn normalise(out: &mut [f32], src: &[u8]) {
    let half = _mm256_set1_ps(127.5);
    let mut chunks = out.chunks_exact_mut(8).zip(src.chunks_exact(8));
    for (o, s) in &mut chunks {
        // SAFETY: `s` is 8 bytes long, `o` 8 floats.
        unsafe {
            let v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(s.as_ptr().cast())));
            _mm256_storeu_ps(o.as_mut_ptr(), _mm256_div_ps(_mm256_sub_ps(v, half), half));
        }
    }
    let done = out.len() / 8 * 8;
    for (o, &b) in out[done..].iter_mut().zip(&src[done..]) {
        *o = (b as f32 - 127.5) / 127.5;
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

/// A vertical pass' taps two by two, as both its kernels take them: the two source rows and
/// their int16 weights packed for `pmaddwd` (an odd last tap pairs with itself at weight
/// zero).
fn tap_pairs(w: &[i32]) -> impl Iterator<Item = (usize, usize, i32)> + '_ {
    w.chunks(2).enumerate().map(|(p, pair)| {
        let ka = 2 * p;
        let (kb, wb) = if pair.len() == 2 { (ka + 1, pair[1]) } else { (ka, 0) };
        (ka, kb, (wb << 16) | (pair[0] & 0xffff))
    })
}

/// One output row of the vertical pass: `dst[j] = round(sum_k w[k] * src[k * dst.len() +
/// j])`, 32 columns at a time with AVX2 (where `wide`), then 16; columns past
/// the last full 16 are left to `scalar(first_column)`.
///
/// # Safety
///
/// With `wide`, the CPU must have AVX2: this runs AVX2 instructions then, which a safe
/// signature could not guard (its `sse2` feature says nothing about AVX2).
#[target_feature(enable = "sse2")]
pub(super) unsafe fn vertical_row(
    src: &[u8],
    w: &[i32],
    dst: &mut [u8],
    rounding: Rounding,
    wide: bool,
    scalar: impl FnOnce(usize, &mut [u8]),
) {
    // SAFETY: `wide` only where the CPU has AVX2 (this function's contract).
    let done = if wide { unsafe { vertical_32(src, w, dst, rounding) } } else { 0 };
    let row_len = dst.len();
    let (bias, shift) = (_mm_set1_epi32(rounding.bias), _mm_cvtsi32_si128(rounding.precision as i32));
    let zero = _mm_setzero_si128();
    let full = row_len / 16 * 16;
    for j in (done..full).step_by(16) {
        let mut acc = [zero; 4];
        for (ka, kb, packed) in tap_pairs(w) {
            let wv = _mm_set1_epi32(packed);
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
        for a in &mut acc {
            *a = round(*a, bias, shift);
        }
        let [a0, a1, a2, a3] = acc;
        let out = _mm_packus_epi16(_mm_packs_epi32(a0, a1), _mm_packs_epi32(a2, a3));
        let d = &mut dst[j..j + 16];
        // SAFETY: `d` is 16 bytes long.
        unsafe { _mm_storeu_si128(d.as_mut_ptr().cast(), out) };
    }
    if full < row_len {
        scalar(full, &mut dst[full..]);
    }
}

/// [`vertical_row`]'s full blocks of 32 columns: how many columns it wrote. 256-bit unpacks
/// and packs work within 128-bit halves, so the packs put the columns back in order.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn vertical_32(src: &[u8], w: &[i32], dst: &mut [u8], rounding: Rounding) -> usize {
    let row_len = dst.len();
    let (bias, shift) = (_mm256_set1_epi32(rounding.bias), _mm_cvtsi32_si128(rounding.precision as i32));
    let zero = _mm256_setzero_si256();
    let full = row_len / 32 * 32;
    for j in (0..full).step_by(32) {
        let mut acc = [zero; 4];
        for (ka, kb, packed) in tap_pairs(w) {
            let wv = _mm256_set1_epi32(packed);
            let (ra, rb) =
                (&src[ka * row_len + j..ka * row_len + j + 32], &src[kb * row_len + j..kb * row_len + j + 32]);
            // SAFETY: both slices are 32 bytes long.
            let (a, b) = unsafe { (_mm256_loadu_si256(ra.as_ptr().cast()), _mm256_loadu_si256(rb.as_ptr().cast())) };
            let (lo, hi) = (_mm256_unpacklo_epi8(a, b), _mm256_unpackhi_epi8(a, b));
            let lanes = [
                _mm256_unpacklo_epi8(lo, zero),
                _mm256_unpackhi_epi8(lo, zero),
                _mm256_unpacklo_epi8(hi, zero),
                _mm256_unpackhi_epi8(hi, zero),
            ];
            for (a, l) in acc.iter_mut().zip(lanes) {
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(l, wv));
            }
        }
        for a in &mut acc {
            *a = _mm256_sra_epi32(_mm256_add_epi32(*a, bias), shift);
        }
        let [a0, a1, a2, a3] = acc;
        let out = _mm256_packus_epi16(_mm256_packs_epi32(a0, a1), _mm256_packs_epi32(a2, a3));
        let d = &mut dst[j..j + 32];
        // SAFETY: `d` is 32 bytes long.
        unsafe { _mm256_storeu_si256(d.as_mut_ptr().cast(), out) };
    }
    full
}

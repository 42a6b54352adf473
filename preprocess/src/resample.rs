//! Pillow's bicubic resize (`Resample.c`) for 8-bit RGB, bit for bit:
//! separable passes (horizontal, then vertical over the rows it needs), a
//! bicubic kernel with a = −0.5 widened by the scale when shrinking
//! (antialiasing), coefficients normalised per output pixel and converted
//! to 22-bit fixed point, and results rounded and clamped to 0..=255 after
//! each pass.
//!
//! Only a window of the output is computed (each output pixel depends only
//! on its own coefficients), and the input may be a window of the image too,
//! as long as it holds every pixel the output reads ([`span`]). On x86-64
//! with AVX2 (checked at run time) both passes run as explicit vector code:
//! the horizontal one four rows at a time with 16-bit multiply-adds on split
//! weights, the vertical one 32 bytes at a time with their sums kept in
//! registers. Other CPUs run the plain loops. The integer arithmetic, and so
//! every pixel, is the same on every path.

use std::ops::Range;

use crate::buffers;
use crate::image::RgbImage;

pub(crate) const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's rounding offset, added before the fixed-point shift.
const ROUNDING: i32 = 1 << (PRECISION_BITS - 1);

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Output `out` of resizing `in_size` to `out_size`: the first input index
/// and the fixed-point weights.
fn coefficient(in_size: usize, out_size: usize, out: usize) -> (usize, Vec<i32>) {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    let center = (out as f64 + 0.5) * scale;
    // C's (int) truncates toward zero.
    let first = ((center - support + 0.5) as i64).max(0) as usize;
    let last = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
    // Pillow multiplies by the reciprocal; dividing differs in the last bit
    // now and then, which can move a fixed-point weight.
    let reciprocal = 1.0 / filter_scale;
    let weights: Vec<f64> = (first..last)
        .map(|index| bicubic((index as f64 - center + 0.5) * reciprocal))
        .collect();
    let total: f64 = weights.iter().sum();
    let fixed = weights
        .iter()
        .map(|weight| {
            let normalised = if total != 0.0 {
                weight / total
            } else {
                *weight
            };
            let scaled = normalised * f64::from(1u32 << PRECISION_BITS);
            if scaled < 0.0 {
                (scaled - 0.5) as i32
            } else {
                (scaled + 0.5) as i32
            }
        })
        .collect();
    (first, fixed)
}

/// Per output pixel in `outputs`: the first input index and the weights.
pub(crate) fn coefficients(
    in_size: usize,
    out_size: usize,
    outputs: Range<usize>,
) -> Vec<(usize, Vec<i32>)> {
    outputs
        .map(|out| coefficient(in_size, out_size, out))
        .collect()
}

/// The input indices that outputs `outputs` of resizing `in_size` to
/// `out_size` read (the outputs themselves when the size is unchanged, as
/// Pillow then skips the pass).
pub fn span(in_size: usize, out_size: usize, outputs: Range<usize>) -> Range<usize> {
    if in_size == out_size || outputs.is_empty() {
        return outputs;
    }
    let (first, _) = coefficient(in_size, out_size, outputs.start);
    let (last_first, weights) = coefficient(in_size, out_size, outputs.end - 1);
    first..last_first + weights.len()
}

/// Pillow's `clip8`: Pillow accumulates in 32-bit ints, as here.
#[inline(always)]
fn clip8(value: i32) -> u8 {
    if value >= (1i32 << PRECISION_BITS << 8) {
        255
    } else if value <= 0 {
        0
    } else {
        (value >> PRECISION_BITS) as u8
    }
}

/// The part `[left, left + out_width) × [top, top + out_height)` of Pillow's
/// `resize((width, height), BICUBIC)` of a `full_width × full_height` image
/// of which `source` holds the columns from `origin.0` and the rows from
/// `origin.1`, mirrored left to right when `flip` is set (torchvision's
/// `hflip` of the result; the horizontal pass then just takes its output
/// columns in reverse order).
pub(crate) struct Window {
    pub full: (usize, usize),
    pub origin: (usize, usize),
    pub size: (usize, usize),
    pub left: usize,
    pub top: usize,
    pub out: (usize, usize),
    pub flip: bool,
}

pub(crate) fn resize(source: &RgbImage, window: &Window) -> RgbImage {
    let (full_width, full_height) = window.full;
    let (origin_x, origin_y) = window.origin;
    let (width, height) = window.size;
    let (out_width, out_height) = window.out;
    let columns = window.left..window.left + out_width;
    let rows = window.top..window.top + out_height;
    // Input rows that the output rows read, in the image's coordinates.
    let needed_rows = span(full_height, height, rows.clone());
    let needed_columns = span(full_width, width, columns.clone());
    assert!(
        needed_rows.start >= origin_y
            && needed_rows.end <= origin_y + source.height
            && needed_columns.start >= origin_x
            && needed_columns.end <= origin_x + source.width,
        "the source window misses pixels the resize reads"
    );
    // Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass first
    // when the height shrinks by more than twice as many pixels as the
    // width does; the rounding between the passes makes the order visible.
    let vertical_first = width != full_width
        && height < full_height
        && (full_height - height) as i64 > 2 * (full_width as i64 - width as i64);
    if vertical_first {
        let mut vertical = coefficients(full_height, height, rows);
        for (first, _) in &mut vertical {
            *first -= origin_y;
        }
        let source_columns = needed_columns.start - origin_x..needed_columns.end - origin_x;
        let mut pixels = scratch(source_columns.len() * out_height * 3);
        vertical_pass(source, source_columns.clone(), &vertical, &mut pixels);
        let temporary = RgbImage {
            width: source_columns.len(),
            height: out_height,
            pixels,
        };
        let mut horizontal = coefficients(full_width, width, columns);
        for (first, _) in &mut horizontal {
            *first -= needed_columns.start;
        }
        if window.flip {
            horizontal.reverse();
        }
        let mut pixels = vec![0u8; out_width * out_height * 3];
        horizontal_pass(&temporary, 0..out_height, &horizontal, &mut pixels);
        keep_scratch(temporary.pixels);
        return RgbImage {
            width: out_width,
            height: out_height,
            pixels,
        };
    }
    let temporary = if width != full_width {
        let mut horizontal = coefficients(full_width, width, columns);
        for (first, _) in &mut horizontal {
            *first -= origin_x;
        }
        if window.flip {
            horizontal.reverse();
        }
        let source_rows = needed_rows.start - origin_y..needed_rows.end - origin_y;
        let len = out_width * source_rows.len() * 3;
        // The result itself when the height stays, else a temporary.
        let mut pixels = if height == full_height {
            vec![0u8; len]
        } else {
            scratch(len)
        };
        horizontal_pass(source, source_rows.clone(), &horizontal, &mut pixels);
        RgbImage {
            width: out_width,
            height: source_rows.len(),
            pixels,
        }
    } else {
        let mut cropped = crop(
            source,
            window.left - origin_x,
            needed_rows.start - origin_y,
            out_width,
            needed_rows.len(),
        );
        if window.flip {
            cropped.flip_horizontal();
        }
        cropped
    };
    if height == full_height {
        return temporary;
    }
    let mut vertical = coefficients(full_height, height, rows);
    for (first, _) in &mut vertical {
        *first -= needed_rows.start;
    }
    let mut pixels = vec![0u8; out_width * out_height * 3];
    vertical_pass(&temporary, 0..out_width, &vertical, &mut pixels);
    keep_scratch(temporary.pixels);
    RgbImage {
        width: out_width,
        height: out_height,
        pixels,
    }
}

thread_local! {
    /// The intermediate image between the passes, kept per thread for the
    /// next resize (saving its allocation, page faults and zeroing).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Larger intermediate images are freed rather than kept per thread.
const KEPT_SCRATCH_BYTES: usize = 4 << 20;

/// A `len`-byte buffer for a pass to overwrite whole.
fn scratch(len: usize) -> Vec<u8> {
    let mut buffer = buffers::take(&SCRATCH);
    buffers::resize_for_overwrite(&mut buffer, len);
    buffer
}

fn keep_scratch(buffer: Vec<u8>) {
    buffers::keep(&SCRATCH, buffer, KEPT_SCRATCH_BYTES);
}

pub(crate) fn crop(
    image: &RgbImage,
    left: usize,
    top: usize,
    width: usize,
    height: usize,
) -> RgbImage {
    let mut pixels = Vec::with_capacity(width * height * 3);
    for row in top..top + height {
        let start = (row * image.width + left) * 3;
        pixels.extend_from_slice(&image.pixels[start..start + width * 3]);
    }
    RgbImage {
        width,
        height,
        pixels,
    }
}

fn horizontal_pass(
    source: &RgbImage,
    rows: Range<usize>,
    taps: &[(usize, Vec<i32>)],
    out: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { avx2::horizontal(source, rows, taps, out) };
    }
    horizontal_generic(source, rows, taps, out);
}

/// Each output pixel accumulates four lanes per tap — red, green, blue and
/// the next pixel's red, which is thrown away — so that a tap is one vector
/// multiply-add. The fourth byte exists except after the very last pixel of
/// the buffer, where [`horizontal_pixel`] runs instead.
#[inline(always)]
fn horizontal_generic(
    source: &RgbImage,
    rows: Range<usize>,
    taps: &[(usize, Vec<i32>)],
    out: &mut [u8],
) {
    let stride = source.width * 3;
    let out_stride = taps.len() * 3;
    for (row, out_row) in rows.zip(out.chunks_exact_mut(out_stride)) {
        let line = &source.pixels[row * stride..];
        for ((first, weights), pixel) in taps.iter().zip(out_row.chunks_exact_mut(3)) {
            let start = first * 3;
            let end = start + weights.len() * 3;
            if end >= line.len() {
                horizontal_pixel(line, *first, weights, pixel);
                continue;
            }
            let mut sums = [ROUNDING; 4];
            for (values, weight) in line[start..=end].windows(4).step_by(3).zip(weights) {
                for (sum, value) in sums.iter_mut().zip(values) {
                    *sum += i32::from(*value) * weight;
                }
            }
            pixel[0] = clip8(sums[0]);
            pixel[1] = clip8(sums[1]);
            pixel[2] = clip8(sums[2]);
        }
    }
}

/// One output pixel of the horizontal pass, as Pillow's loop computes it.
#[inline(always)]
fn horizontal_pixel(line: &[u8], first: usize, weights: &[i32], pixel: &mut [u8]) {
    let mut sums = [ROUNDING; 3];
    for (values, weight) in line[first * 3..].chunks_exact(3).zip(weights) {
        for (sum, value) in sums.iter_mut().zip(values) {
            *sum += i32::from(*value) * weight;
        }
    }
    pixel[0] = clip8(sums[0]);
    pixel[1] = clip8(sums[1]);
    pixel[2] = clip8(sums[2]);
}

/// The horizontal pass four taps at a time with 16-bit multiply-adds.
///
/// Each 22-bit weight is split as `w = hi · 2¹¹ + lo` with `0 ≤ lo < 2¹¹`;
/// both halves fit 16 bits, so `vpmaddwd` multiplies two taps' pixels by
/// them and adds the pairs. `(Σ p·hi) · 2¹¹ + Σ p·lo` is Pillow's `Σ p·w`
/// exactly, and no partial sum leaves 32 bits (|Σ p·w| < 2³¹ as in Pillow).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{RgbImage, PRECISION_BITS, ROUNDING};

    /// Taps per group: one 256-bit multiply-add.
    const GROUP: usize = 4;

    /// Within each 128-bit lane, pixels (0, 1) or (2, 3) of the twelve bytes
    /// loaded, as 16-bit lanes `[r₀ r₁ g₀ g₁ b₀ b₁ 0 0]`.
    const SHUFFLE: [i8; 32] = [
        0, -128, 3, -128, 1, -128, 4, -128, 2, -128, 5, -128, -128, -128, -128, -128, //
        6, -128, 9, -128, 7, -128, 10, -128, 8, -128, 11, -128, -128, -128, -128, -128,
    ];

    /// Where one output pixel's input starts and which weight groups it
    /// uses.
    struct Output {
        /// Byte offset of the first input pixel in a row.
        start: usize,
        /// Index of the first group in the shared weight table.
        group: usize,
        groups: usize,
    }

    /// Each output pixel's weights, grouped four taps at a time and split
    /// into halves (`lo`, then `hi`), in one table.
    fn pack(taps: &[(usize, Vec<i32>)]) -> (Vec<Output>, Vec<[i16; 16]>) {
        let mut table = Vec::new();
        let outputs = taps
            .iter()
            .map(|(first, weights)| {
                let output = Output {
                    start: first * 3,
                    group: table.len() / 2,
                    groups: weights.len().div_ceil(GROUP),
                };
                for group in weights.chunks(GROUP) {
                    let (mut lo, mut hi) = ([0i16; 16], [0i16; 16]);
                    for (tap, weight) in group.iter().enumerate() {
                        let (lane, pair) = (tap / 2, tap % 2);
                        for channel in 0..3 {
                            lo[lane * 8 + channel * 2 + pair] = (weight & 0x7ff) as i16;
                            hi[lane * 8 + channel * 2 + pair] = (weight >> 11) as i16;
                        }
                    }
                    table.push(lo);
                    table.push(hi);
                }
                output
            })
            .collect();
        (outputs, table)
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn horizontal(
        source: &RgbImage,
        rows: Range<usize>,
        taps: &[(usize, Vec<i32>)],
        out: &mut [u8],
    ) {
        let (outputs, table) = pack(taps);
        let stride = source.width * 3;
        let out_stride = taps.len() * 3;
        let mut rows = rows.zip(out.chunks_exact_mut(out_stride));
        // Several rows at a time share the weights' loads.
        loop {
            let batch: Vec<(usize, &mut [u8])> = rows.by_ref().take(ROWS).collect();
            match <[_; ROWS]>::try_from(batch) {
                Ok(full) => {
                    let lines = full.map(|(row, out)| (&source.pixels[row * stride..], out));
                    lines_at_once(lines, &outputs, &table, taps);
                }
                Err(rest) => {
                    for (row, out) in rest {
                        let line = [(&source.pixels[row * stride..], out)];
                        lines_at_once(line, &outputs, &table, taps);
                    }
                    break;
                }
            }
        }
    }

    /// Rows at a time in the horizontal pass.
    const ROWS: usize = 4;

    /// The horizontal pass over `N` lines (each from its first input pixel
    /// to the end of the image), writing their output rows.
    #[target_feature(enable = "avx2")]
    fn lines_at_once<const N: usize>(
        lines: [(&[u8], &mut [u8]); N],
        outputs: &[Output],
        table: &[[i16; 16]],
        taps: &[(usize, Vec<i32>)],
    ) {
        // SAFETY: loadu of a 32-byte array.
        let shuffle = unsafe { _mm256_loadu_si256(SHUFFLE.as_ptr().cast()) };
        let (lines, mut outs): (Vec<&[u8]>, Vec<&mut [u8]>) = lines.into_iter().unzip();
        // The last line is the shortest (it ends where the image does).
        let shortest = lines[N - 1].len();
        for (index, (output, (first, weights))) in outputs.iter().zip(taps).enumerate() {
            let pixels = index * 3..index * 3 + 3;
            // The last group loads 16 bytes from its first pixel.
            if output.start + output.groups * GROUP * 3 + 4 > shortest {
                for (line, out) in lines.iter().zip(&mut outs) {
                    super::horizontal_pixel(line, *first, weights, &mut out[pixels.clone()]);
                }
                continue;
            }
            let groups = &table[output.group * 2..][..output.groups * 2];
            let mut lo_sums = [_mm256_setzero_si256(); N];
            let mut hi_sums = [_mm256_setzero_si256(); N];
            for (group, halves) in groups.chunks_exact(2).enumerate() {
                let offset = output.start + group * GROUP * 3;
                // SAFETY: 16 bytes from `offset` lie inside every line
                // (checked above against the shortest); the weights are
                // 32-byte arrays.
                unsafe {
                    let lo = _mm256_loadu_si256(halves[0].as_ptr().cast());
                    let hi = _mm256_loadu_si256(halves[1].as_ptr().cast());
                    for line in 0..N {
                        let bytes = _mm_loadu_si128(lines[line].as_ptr().add(offset).cast());
                        let pixels =
                            _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(bytes), shuffle);
                        lo_sums[line] =
                            _mm256_add_epi32(lo_sums[line], _mm256_madd_epi16(pixels, lo));
                        hi_sums[line] =
                            _mm256_add_epi32(hi_sums[line], _mm256_madd_epi16(pixels, hi));
                    }
                }
            }
            for line in 0..N {
                store(
                    lo_sums[line],
                    hi_sums[line],
                    &mut outs[line][pixels.clone()],
                );
            }
        }
    }

    /// The vertical pass 32 bytes at a time, their sums kept in registers
    /// across the taps (32-bit products, as Pillow's); the last few bytes of
    /// each row run through the plain loop.
    #[target_feature(enable = "avx2")]
    pub(super) fn vertical(
        source: &RgbImage,
        columns: Range<usize>,
        taps: &[(usize, Vec<i32>)],
        out: &mut [u8],
    ) {
        const BLOCK: usize = 32;
        let stride = source.width * 3;
        let (offset, width) = (columns.start * 3, columns.len() * 3);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for ((first, weights), out_row) in taps.iter().zip(out.chunks_exact_mut(width)) {
            let base = first * stride + offset;
            let last_row = base + (weights.len().max(1) - 1) * stride;
            let rows = &source.pixels[base..last_row + width];
            let blocks = width / BLOCK;
            for block in 0..blocks {
                let mut sums = [_mm256_set1_epi32(ROUNDING); 4];
                for (row, weight) in weights.iter().enumerate() {
                    let weight = _mm256_set1_epi32(*weight);
                    let start = row * stride + block * BLOCK;
                    let values = &rows[start..start + BLOCK];
                    for (part, sum) in sums.iter_mut().enumerate() {
                        // SAFETY: 8 bytes of the 32-byte `values`.
                        let bytes =
                            unsafe { _mm_loadl_epi64(values.as_ptr().add(part * 8).cast()) };
                        let product = _mm256_mullo_epi32(_mm256_cvtepu8_epi32(bytes), weight);
                        *sum = _mm256_add_epi32(*sum, product);
                    }
                }
                // Pillow's clip8: the arithmetic shift, then saturation.
                let [a, b, c, d] =
                    sums.map(|sum| _mm256_srai_epi32::<{ PRECISION_BITS as i32 }>(sum));
                let packed =
                    _mm256_packus_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
                // The packs work within 128-bit lanes: put the 4-byte
                // groups back in order.
                let bytes = _mm256_permutevar8x32_epi32(packed, order);
                let target = &mut out_row[block * BLOCK..(block + 1) * BLOCK];
                // SAFETY: storeu of 32 bytes into a 32-byte slice.
                unsafe { _mm256_storeu_si256(target.as_mut_ptr().cast(), bytes) };
            }
            for column in blocks * BLOCK..width {
                let mut sum = ROUNDING;
                for (row, weight) in weights.iter().enumerate() {
                    sum += i32::from(rows[row * stride + column]) * weight;
                }
                out_row[column] = super::clip8(sum);
            }
        }
    }

    /// Recombines the halves' sums, adds the lanes of the two taps pairs,
    /// and writes Pillow's clip8 of red, green and blue to `pixel`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn store(sum_lo: __m256i, sum_hi: __m256i, pixel: &mut [u8]) {
        let total = _mm256_add_epi32(_mm256_slli_epi32::<11>(sum_hi), sum_lo);
        let sums = _mm_add_epi32(
            _mm_add_epi32(
                _mm256_castsi256_si128(total),
                _mm256_extracti128_si256::<1>(total),
            ),
            _mm_setr_epi32(ROUNDING, ROUNDING, ROUNDING, 0),
        );
        // The arithmetic shift, then saturation to 0..=255 (through 16
        // bits, which cannot change the result).
        let shifted = _mm_srai_epi32::<{ PRECISION_BITS as i32 }>(sums);
        let zero = _mm_setzero_si128();
        let bytes = _mm_packus_epi16(_mm_packs_epi32(shifted, zero), zero);
        let rgb = (_mm_cvtsi128_si32(bytes) as u32).to_le_bytes();
        pixel.copy_from_slice(&rgb[..3]);
    }
}

/// The vertical pass over the source's `columns`.
fn vertical_pass(
    source: &RgbImage,
    columns: Range<usize>,
    taps: &[(usize, Vec<i32>)],
    out: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { avx2::vertical(source, columns, taps, out) };
    }
    vertical_generic(source, columns, taps, out);
}

#[inline(always)]
fn vertical_generic(
    source: &RgbImage,
    columns: Range<usize>,
    taps: &[(usize, Vec<i32>)],
    out: &mut [u8],
) {
    let stride = source.width * 3;
    let (offset, width) = (columns.start * 3, columns.len() * 3);
    let mut sums = vec![0i32; width];
    for ((first, weights), out_row) in taps.iter().zip(out.chunks_exact_mut(width)) {
        sums.fill(ROUNDING);
        for (row, weight) in weights.iter().enumerate() {
            let row = &source.pixels[(first + row) * stride + offset..][..width];
            for (sum, value) in sums.iter_mut().zip(row) {
                *sum += i32::from(*value) * weight;
            }
        }
        for (out, sum) in out_row.iter_mut().zip(&sums) {
            *out = clip8(*sum);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_weights_sum_to_one_in_fixed_point() {
        for (input, output) in [(100, 28), (28, 100), (33, 33), (7, 224)] {
            for (_, weights) in coefficients(input, output, 0..output) {
                let total: i64 = weights.iter().map(|weight| i64::from(*weight)).sum();
                assert!((total - (1 << PRECISION_BITS)).abs() <= weights.len() as i64);
            }
        }
    }

    /// Pillow's loops written out plainly, one pixel and one channel at a
    /// time, over the whole image, horizontal pass first (transposing swaps
    /// the order).
    fn plain(image: &RgbImage, width: usize, height: usize) -> RgbImage {
        let vertical_first = width != image.width
            && height < image.height
            && (image.height - height) as i64 > 2 * (image.width as i64 - width as i64);
        if vertical_first {
            return transpose(&plain_horizontal_first(&transpose(image), height, width));
        }
        plain_horizontal_first(image, width, height)
    }

    fn transpose(image: &RgbImage) -> RgbImage {
        let mut pixels = vec![0u8; image.pixels.len()];
        for y in 0..image.height {
            for x in 0..image.width {
                let from = (y * image.width + x) * 3;
                let to = (x * image.height + y) * 3;
                pixels[to..to + 3].copy_from_slice(&image.pixels[from..from + 3]);
            }
        }
        RgbImage {
            width: image.height,
            height: image.width,
            pixels,
        }
    }

    fn plain_horizontal_first(image: &RgbImage, width: usize, height: usize) -> RgbImage {
        let sum = |taps: &[(usize, Vec<i32>)], out: usize, read: &dyn Fn(usize) -> u8| {
            let (first, weights) = &taps[out];
            let mut total = ROUNDING;
            for (offset, weight) in weights.iter().enumerate() {
                total += i32::from(read(first + offset)) * weight;
            }
            clip8(total)
        };
        let horizontal = coefficients(image.width, width, 0..width);
        let mut temporary = vec![0u8; width * image.height * 3];
        for y in 0..image.height {
            for x in 0..width {
                for c in 0..3 {
                    temporary[(y * width + x) * 3 + c] = sum(&horizontal, x, &|i| {
                        image.pixels[(y * image.width + i) * 3 + c]
                    });
                }
            }
        }
        let vertical = coefficients(image.height, height, 0..height);
        let mut pixels = vec![0u8; width * height * 3];
        for y in 0..height {
            for x in 0..width {
                for c in 0..3 {
                    pixels[(y * width + x) * 3 + c] =
                        sum(&vertical, y, &|i| temporary[(i * width + x) * 3 + c]);
                }
            }
        }
        RgbImage {
            width,
            height,
            pixels,
        }
    }

    fn noise(width: usize, height: usize, seed: u64) -> RgbImage {
        let mut state = seed;
        let pixels = (0..width * height * 3)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 56) as u8
            })
            .collect();
        RgbImage {
            width,
            height,
            pixels,
        }
    }

    #[test]
    fn vectorised_windows_equal_the_plain_loops() {
        for (index, (w, h, out_w, out_h)) in [
            (40, 30, 17, 13),
            (13, 29, 31, 8),
            (64, 64, 64, 20),
            (9, 50, 9, 50),
            (57, 41, 20, 41),
            (257, 1001, 28, 109),
            (1001, 257, 109, 28),
        ]
        .into_iter()
        .enumerate()
        {
            let image = noise(w, h, index as u64);
            let whole = plain(&image, out_w, out_h);
            let windows = [(0, 0, out_w, out_h), (1, 2, out_w - 3, out_h - 4)];
            for ((left, top, width, height), flip) in windows
                .into_iter()
                .flat_map(|window| [(window, false), (window, true)])
            {
                let window = |origin, out| Window {
                    full: (w, h),
                    origin,
                    size: (out_w, out_h),
                    left,
                    top,
                    out,
                    flip,
                };
                let mut expected = crop(&whole, left, top, width, height);
                if flip {
                    expected.flip_horizontal();
                }
                // The whole image as the source, then only the pixels read.
                let full = resize(&image, &window((0, 0), (width, height)));
                assert_eq!(
                    full, expected,
                    "{w}×{h} → {out_w}×{out_h} at {left},{top}, flip {flip}"
                );
                let columns = span(w, out_w, left..left + width);
                let rows = span(h, out_h, top..top + height);
                let part = crop(&image, columns.start, rows.start, columns.len(), rows.len());
                let windowed = resize(&part, &window((columns.start, rows.start), (width, height)));
                assert_eq!(
                    windowed, expected,
                    "windowed {w}×{h} → {out_w}×{out_h}, flip {flip}"
                );
            }
        }
    }

    /// The plain loops (what CPUs without AVX2 run) against the dispatched
    /// passes, over widths that leave every kind of remainder.
    #[test]
    fn plain_passes_equal_the_dispatched_ones() {
        for (index, (w, h, out_w, out_h)) in [(40, 30, 17, 13), (257, 101, 28, 45), (33, 7, 64, 3)]
            .into_iter()
            .enumerate()
        {
            let image = noise(w, h, 100 + index as u64);
            let taps = coefficients(w, out_w, 0..out_w);
            let (mut fast, mut slow) = (vec![0u8; out_w * h * 3], vec![0u8; out_w * h * 3]);
            horizontal_pass(&image, 0..h, &taps, &mut fast);
            horizontal_generic(&image, 0..h, &taps, &mut slow);
            assert_eq!(fast, slow, "horizontal {w}×{h} → {out_w}");
            let taps = coefficients(h, out_h, 0..out_h);
            let columns = 1..w - 1;
            let len = columns.len() * out_h * 3;
            let (mut fast, mut slow) = (vec![0u8; len], vec![0u8; len]);
            vertical_pass(&image, columns.clone(), &taps, &mut fast);
            vertical_generic(&image, columns, &taps, &mut slow);
            assert_eq!(fast, slow, "vertical {w}×{h} → {out_h}");
        }
    }
}

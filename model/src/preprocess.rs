//! CLIP image preprocessing as open_clip's eval transform does it (reference
//! §1.1): resize the shortest side to the model's size with Pillow's bicubic
//! filter, center-crop, scale to [0, 1], normalise with OpenAI's mean/std.
//!
//! The resize reproduces Pillow's `Resample.c` for 8-bit RGB, so pixels
//! match Python exactly: separable passes (horizontal, then vertical over
//! the rows it needs), a bicubic kernel with a = −0.5 widened by the scale
//! when shrinking (antialiasing), coefficients normalised per output pixel
//! and converted to 22-bit fixed point, and results rounded and clamped to
//! 0..=255 after each pass.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::{ModelError, Result};

// OpenAI's published constants, written as open_clip writes them (f32 rounds
// them exactly as torch does when it builds the float tensors).
#[allow(clippy::excessive_precision)]
pub const OPENAI_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const OPENAI_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

const PRECISION_BITS: u32 = 32 - 8 - 2;

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

/// Per output pixel: the first input index and the fixed-point weights.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    (0..out_size)
        .map(|out| {
            let center = (out as f64 + 0.5) * scale;
            // C's (int) truncates toward zero.
            let first = ((center - support + 0.5) as i64).max(0) as usize;
            let last = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let weights: Vec<f64> = (first..last)
                .map(|index| bicubic((index as f64 - center + 0.5) / filter_scale))
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
        })
        .collect()
}

/// Pillow's rounding offset, added before the fixed-point shift.
const ROUNDING: i32 = 1 << (PRECISION_BITS - 1);

/// Pillow's `clip8`: Pillow accumulates in 32-bit ints, as here.
fn clip8(value: i32) -> u8 {
    if value >= (1i32 << PRECISION_BITS << 8) {
        255
    } else if value <= 0 {
        0
    } else {
        (value >> PRECISION_BITS) as u8
    }
}

/// An 8-bit RGB image, row-major `[height][width][3]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// Decodes a PNG or JPEG file to RGB.
    pub fn open(path: &Path) -> Result<Self> {
        let failed = |message: String| ModelError::Io {
            path: path.display().to_string(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|error| failed(error.to_string()))?;
        Self::decode(&bytes).map_err(|error| {
            failed(format!(
                "cannot decode the image ({error}); JPEG and PNG are supported"
            ))
        })
    }

    /// Decodes PNG or JPEG bytes to RGB (Pillow's `convert("RGB")`). JPEG
    /// goes through libjpeg, as in Pillow, so the pixels are Pillow's.
    pub fn decode(bytes: &[u8]) -> std::result::Result<Self, String> {
        if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
            if let Some(decoded) = jpeg::decode(bytes)? {
                return Ok(decoded);
            }
        }
        let decoded = image::load_from_memory(bytes).map_err(|error| error.to_string())?;
        let rgb = decoded.to_rgb8();
        Ok(Self {
            width: rgb.width() as usize,
            height: rgb.height() as usize,
            pixels: rgb.into_raw(),
        })
    }

    /// Mirrors the image left to right (torchvision's `hflip`).
    pub fn flip_horizontal(&mut self) {
        for row in self.pixels.chunks_exact_mut(self.width * 3) {
            let mut left = 0;
            let mut right = self.width.saturating_sub(1);
            while left < right {
                for channel in 0..3 {
                    row.swap(left * 3 + channel, right * 3 + channel);
                }
                left += 1;
                right -= 1;
            }
        }
    }

    /// Pillow's `Image.resize((width, height), Image.BICUBIC)`.
    pub fn resize_bicubic(&self, width: usize, height: usize) -> Self {
        self.resize_bicubic_region(width, height, 0, 0, width, height)
    }

    /// The `[left, left + out_width) × [top, top + out_height)` part of
    /// [`Self::resize_bicubic`]`(width, height)`, computing only that part
    /// (each output pixel depends only on its own coefficients, so the
    /// pixels are the same as resizing whole and cropping).
    pub fn resize_bicubic_region(
        &self,
        width: usize,
        height: usize,
        left: usize,
        top: usize,
        out_width: usize,
        out_height: usize,
    ) -> Self {
        if width == self.width && height == self.height {
            return self.crop(left, top, out_width, out_height);
        }
        let vertical = (height != self.height)
            .then(|| coefficients(self.height, height)[top..top + out_height].to_vec());
        // Input rows the output rows read.
        let (row_first, row_end) = match &vertical {
            Some(vertical) => (
                vertical.first().map_or(0, |(first, _)| *first),
                vertical
                    .last()
                    .map_or(0, |(first, weights)| first + weights.len()),
            ),
            None => (top, top + out_height),
        };
        let rows = row_end - row_first;
        let temporary = if width != self.width {
            let horizontal = &coefficients(self.width, width)[left..left + out_width];
            let mut pixels = vec![0u8; out_width * rows * 3];
            for (row, out_row) in pixels.chunks_exact_mut(out_width * 3).enumerate() {
                let input = &self.pixels[(row + row_first) * self.width * 3..][..self.width * 3];
                for ((first, weights), out) in horizontal.iter().zip(out_row.chunks_exact_mut(3)) {
                    let taps = &input[first * 3..(first + weights.len()) * 3];
                    let (mut red, mut green, mut blue) = (ROUNDING, ROUNDING, ROUNDING);
                    for (pixel, weight) in taps.chunks_exact(3).zip(weights) {
                        red += i32::from(pixel[0]) * weight;
                        green += i32::from(pixel[1]) * weight;
                        blue += i32::from(pixel[2]) * weight;
                    }
                    out[0] = clip8(red);
                    out[1] = clip8(green);
                    out[2] = clip8(blue);
                }
            }
            Self {
                width: out_width,
                height: rows,
                pixels,
            }
        } else {
            let mut pixels = Vec::with_capacity(out_width * rows * 3);
            for row in row_first..row_end {
                let start = (row * self.width + left) * 3;
                pixels.extend_from_slice(&self.pixels[start..start + out_width * 3]);
            }
            Self {
                width: out_width,
                height: rows,
                pixels,
            }
        };
        let Some(vertical) = vertical else {
            return temporary;
        };
        let stride = out_width * 3;
        let mut pixels = vec![0u8; stride * out_height];
        let mut sums = vec![0i32; stride];
        for ((first, weights), out_row) in vertical.iter().zip(pixels.chunks_exact_mut(stride)) {
            sums.fill(ROUNDING);
            for (offset, weight) in weights.iter().enumerate() {
                let row = &temporary.pixels[(first - row_first + offset) * stride..][..stride];
                for (sum, value) in sums.iter_mut().zip(row) {
                    *sum += i32::from(*value) * weight;
                }
            }
            for (out, sum) in out_row.iter_mut().zip(&sums) {
                *out = clip8(*sum);
            }
        }
        Self {
            width: out_width,
            height: out_height,
            pixels,
        }
    }

    fn crop(&self, left: usize, top: usize, width: usize, height: usize) -> Self {
        let mut pixels = Vec::with_capacity(width * height * 3);
        for row in top..top + height {
            let start = (row * self.width + left) * 3;
            pixels.extend_from_slice(&self.pixels[start..start + width * 3]);
        }
        Self {
            width,
            height,
            pixels,
        }
    }
}

mod jpeg {
    use super::RgbImage;

    extern "C" {
        fn flamingo_jpeg_decode(
            data: *const u8,
            size: std::ffi::c_ulong,
            pixels: *mut *mut u8,
            width: *mut std::ffi::c_int,
            height: *mut std::ffi::c_int,
            message: *mut std::ffi::c_char,
            message_len: usize,
        ) -> std::ffi::c_int;
        fn flamingo_jpeg_free(pixels: *mut u8);
    }

    /// `None` for CMYK/YCCK JPEGs, which libjpeg cannot turn into RGB.
    pub(super) fn decode(bytes: &[u8]) -> Result<Option<RgbImage>, String> {
        let mut pixels: *mut u8 = std::ptr::null_mut();
        let (mut width, mut height) = (0, 0);
        let mut message = [0 as std::ffi::c_char; 256];
        // SAFETY: the shim reads `bytes` only, writes the out-parameters and
        // at most `message.len()` bytes of `message`, and on success hands
        // over a malloc'ed width×height×3 buffer freed below.
        let status = unsafe {
            flamingo_jpeg_decode(
                bytes.as_ptr(),
                bytes.len() as std::ffi::c_ulong,
                &mut pixels,
                &mut width,
                &mut height,
                message.as_mut_ptr(),
                message.len(),
            )
        };
        match status {
            0 => {
                let (width, height) = (width as usize, height as usize);
                // SAFETY: status 0 means `pixels` holds width×height×3 bytes.
                let copied =
                    unsafe { std::slice::from_raw_parts(pixels, width * height * 3) }.to_vec();
                // SAFETY: allocated by the shim, freed once.
                unsafe { flamingo_jpeg_free(pixels) };
                Ok(Some(RgbImage {
                    width,
                    height,
                    pixels: copied,
                }))
            }
            2 => Ok(None),
            _ => {
                // SAFETY: the shim wrote a NUL-terminated message.
                let text = unsafe { std::ffi::CStr::from_ptr(message.as_ptr()) };
                Err(format!("JPEG: {}", text.to_string_lossy()))
            }
        }
    }
}

/// Python's `round` on halves: to the even neighbour.
fn round_half_even(value: f64) -> i64 {
    let floor = value.floor();
    let difference = value - floor;
    if difference > 0.5 || (difference == 0.5 && (floor as i64) % 2 != 0) {
        floor as i64 + 1
    } else {
        floor as i64
    }
}

/// open_clip's eval transform for `size`: `[3, size, size]` float32.
pub fn clip_preprocess(image: &RgbImage, size: usize) -> Result<Tensor> {
    let cropped = clip_resize_crop(image, size)?;
    let pixels = Tensor::from_slice(&cropped.pixels)
        .view([size as i64, size as i64, 3])
        .permute([2, 0, 1])
        .to_kind(Kind::Float)
        / 255.0;
    let mean = Tensor::from_slice(&OPENAI_MEAN).view([3, 1, 1]);
    let std = Tensor::from_slice(&OPENAI_STD).view([3, 1, 1]);
    Ok((pixels - mean) / std)
}

/// The 8-bit half of open_clip's eval transform: torchvision's `Resize(size)`
/// (shortest side, bicubic) and `CenterCrop(size)`; what remains is
/// `ToTensor` and `Normalize`, which are exact functions of these bytes.
pub fn clip_resize_crop(image: &RgbImage, size: usize) -> Result<RgbImage> {
    if image.width == 0 || image.height == 0 {
        return Err(ModelError::Input("the image is empty".into()));
    }
    // torchvision Resize(size): shortest side to `size`, the other truncated.
    let (width, height) = if image.width <= image.height {
        (
            size,
            (size as f64 * image.height as f64 / image.width as f64) as usize,
        )
    } else {
        (
            (size as f64 * image.width as f64 / image.height as f64) as usize,
            size,
        )
    };
    let top = round_half_even((height as f64 - size as f64) / 2.0).max(0) as usize;
    let left = round_half_even((width as f64 - size as f64) / 2.0).max(0) as usize;
    Ok(image.resize_bicubic_region(width, height, left, top, size, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_follows_python() {
        assert_eq!(round_half_even(0.5), 0);
        assert_eq!(round_half_even(1.5), 2);
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(2.51), 3);
    }

    #[test]
    fn kernel_weights_sum_to_one_in_fixed_point() {
        for (input, output) in [(100, 28), (28, 100), (33, 33), (7, 224)] {
            for (_, weights) in coefficients(input, output) {
                let total: i64 = weights.iter().map(|weight| i64::from(*weight)).sum();
                assert!((total - (1 << PRECISION_BITS)).abs() <= weights.len() as i64);
            }
        }
    }
}

//! The 8-bit half of CLIP image preprocessing as open_clip's eval transform
//! does it: resize the shortest side to the model's size with Pillow's
//! bicubic filter and center-crop. What remains (scale to [0, 1], normalise
//! with [`OPENAI_MEAN`] and [`OPENAI_STD`]) is an exact function of these
//! bytes, done where the pixels become a tensor (the model's
//! `clip_preprocess`, the data service's batches).
//!
//! The resize reproduces Pillow's `Resample.c` for 8-bit RGB
//! ([`crate::resample`]) and JPEGs are decoded by libjpeg as in Pillow
//! ([`crate::jpeg`]), so pixels match Python exactly.

use std::path::Path;

use crate::buffers;
use crate::jpeg::Jpeg;
use crate::resample::{self, Window};
use crate::{PreprocessError, Result};

// OpenAI's published constants, written as open_clip writes them (f32 rounds
// them exactly as torch does when it builds the float tensors).
#[allow(clippy::excessive_precision)]
pub const OPENAI_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const OPENAI_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

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
        let failed = |message: String| PreprocessError::File {
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
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
            if let Some(jpeg) = Jpeg::open(bytes)? {
                return jpeg.decode();
            }
        }
        let decoded = image::load_from_memory(bytes).map_err(|error| PreprocessError::Image {
            message: error.to_string(),
        })?;
        let rgb = decoded.to_rgb8();
        Ok(Self {
            width: rgb.width() as usize,
            height: rgb.height() as usize,
            pixels: rgb.into_raw(),
        })
    }

    /// Mirrors the image left to right (torchvision's `hflip`).
    pub fn flip_horizontal(&mut self) {
        if self.width == 0 {
            return;
        }
        for row in self.pixels.chunks_exact_mut(self.width * 3) {
            row.as_chunks_mut::<3>().0.reverse();
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
        resample::resize(
            self,
            &Window {
                full: (self.width, self.height),
                origin: (0, 0),
                size: (width, height),
                left,
                top,
                out: (out_width, out_height),
                flip: false,
            },
        )
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

/// torchvision's `Resize(size)` (shortest side to `size`, the other
/// truncated) and `CenterCrop(size)` of a `width × height` image: the
/// resized size and the crop's left and top.
fn clip_geometry(width: usize, height: usize, size: usize) -> ((usize, usize), (usize, usize)) {
    let resized = if width <= height {
        (size, (size as f64 * height as f64 / width as f64) as usize)
    } else {
        ((size as f64 * width as f64 / height as f64) as usize, size)
    };
    let top = round_half_even((resized.1 as f64 - size as f64) / 2.0).max(0) as usize;
    let left = round_half_even((resized.0 as f64 - size as f64) / 2.0).max(0) as usize;
    (resized, (left, top))
}

/// The 8-bit half of open_clip's eval transform: torchvision's `Resize(size)`
/// (shortest side, bicubic) and `CenterCrop(size)`; what remains is
/// `ToTensor` and `Normalize`, which are exact functions of these bytes.
pub fn clip_resize_crop(image: &RgbImage, size: usize) -> Result<RgbImage> {
    if image.width == 0 || image.height == 0 {
        return Err(PreprocessError::EmptyImage);
    }
    let ((width, height), (left, top)) = clip_geometry(image.width, image.height, size);
    Ok(image.resize_bicubic_region(width, height, left, top, size, size))
}

/// Pixels kept around the part of a JPEG that the resize reads: libjpeg's
/// region edges (where fancy upsampling lacks a neighbour) stay this far
/// from every pixel used.
const JPEG_MARGIN: usize = 16;

thread_local! {
    /// The last decoded JPEG region's memory, reused by the next image on
    /// this thread.
    static DECODED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Larger decode buffers are freed rather than kept per thread.
const KEPT_DECODE_BYTES: usize = 8 << 20;

/// [`clip_resize_crop`] of encoded image bytes (Pillow's
/// `Image.open(…).convert("RGB")` first), mirrored left to right if `flip`
/// (the training augmentation; free here, as the resize writes the columns
/// in reverse). A JPEG is decoded only where the crop reads it; those pixels
/// are the whole decode's, so the result is the same, and a truncated or
/// corrupt file fails the same way.
pub fn clip_image(bytes: &[u8], size: usize, flip: bool) -> Result<RgbImage> {
    if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        if let Some(jpeg) = Jpeg::open(bytes)? {
            let (full_width, full_height) = (jpeg.width, jpeg.height);
            let ((width, height), (left, top)) = clip_geometry(full_width, full_height, size);
            let widen = |span: std::ops::Range<usize>, limit: usize| {
                span.start.saturating_sub(JPEG_MARGIN)..(span.end + JPEG_MARGIN).min(limit)
            };
            let columns = widen(
                resample::span(full_width, width, left..left + size),
                full_width,
            );
            let rows = widen(
                resample::span(full_height, height, top..top + size),
                full_height,
            );
            let buffer = buffers::take(&DECODED);
            let region = jpeg.decode_region_into(columns, rows, buffer)?;
            let cropped = resample::resize(
                &region.image,
                &Window {
                    full: (full_width, full_height),
                    origin: (region.left, region.top),
                    size: (width, height),
                    left,
                    top,
                    out: (size, size),
                    flip,
                },
            );
            buffers::keep(&DECODED, region.image.pixels, KEPT_DECODE_BYTES);
            return Ok(cropped);
        }
    }
    let image = RgbImage::decode(bytes)?;
    let mut cropped = clip_resize_crop(&image, size)?;
    if flip {
        cropped.flip_horizontal();
    }
    Ok(cropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flipping_mirrors_whole_pixels() {
        let mut image = RgbImage {
            width: 3,
            height: 2,
            pixels: (0..18).collect(),
        };
        image.flip_horizontal();
        assert_eq!(
            image.pixels,
            [6, 7, 8, 3, 4, 5, 0, 1, 2, 15, 16, 17, 12, 13, 14, 9, 10, 11]
        );
    }

    #[test]
    fn rounding_follows_python() {
        assert_eq!(round_half_even(0.5), 0);
        assert_eq!(round_half_even(1.5), 2);
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(2.51), 3);
    }
}

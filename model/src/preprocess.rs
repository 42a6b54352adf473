//! CLIP image preprocessing as open_clip's eval transform does it (reference
//! §1.1) as a tensor: the 8-bit resize and crop of
//! [`flamingo_preprocess::clip_resize_crop`], then `ToTensor` (scale to
//! [0, 1]) and `Normalize` with OpenAI's mean and std, as torch computes
//! them.

use flamingo_preprocess::{RgbImage, OPENAI_MEAN, OPENAI_STD};
use tch::{Kind, Tensor};

use crate::Result;

/// open_clip's eval transform for `size`: `[3, size, size]` float32.
pub fn clip_preprocess(image: &RgbImage, size: usize) -> Result<Tensor> {
    let cropped = flamingo_preprocess::clip_resize_crop(image, size)?;
    let pixels = Tensor::from_slice(&cropped.pixels)
        .view([size as i64, size as i64, 3])
        .permute([2, 0, 1])
        .to_kind(Kind::Float)
        / 255.0;
    let mean = Tensor::from_slice(&OPENAI_MEAN).view([3, 1, 1]);
    let std = Tensor::from_slice(&OPENAI_STD).view([3, 1, 1]);
    Ok((pixels - mean) / std)
}

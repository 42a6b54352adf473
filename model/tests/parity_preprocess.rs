//! Parity with open_clip's eval transform on PNG images of several sizes and
//! aspect ratios (shrinking and enlarging, odd crops): the preprocessed
//! tensors must match Pillow + torchvision exactly (up to float rounding).

mod common;

use flamingo_model::preprocess::{clip_image, clip_preprocess, clip_resize_crop, RgbImage};
use flamingo_model::Weights;
use tch::Tensor;

fn max_difference(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.size(), expected.size());
    (actual - expected).abs().max().double_value(&[])
}

#[test]
fn preprocessing_matches_open_clip() {
    let dir = common::reference_dir("preprocess_reference.py");
    let mut reference = Weights::read(&dir.path().join("reference.safetensors")).unwrap();
    for index in 0..7 {
        let image = RgbImage::open(&dir.path().join(format!("image{index}.png"))).unwrap();
        for size in [28usize, 224] {
            let expected = reference.remove(&format!("image{index}.{size}")).unwrap();
            let actual = clip_preprocess(&image, size).unwrap();
            assert_eq!(actual.size(), expected.size());
            let difference = (&actual - &expected).abs().max().double_value(&[]);
            // One 8-bit step is 1/255/0.26 ≈ 0.015; exact pixels leave only float noise.
            assert!(
                difference <= 1e-5,
                "image{index} ({}×{}) at {size}: max difference {difference}",
                image.width,
                image.height
            );
        }
    }
}

/// JPEGs: the whole decode matches Pillow, and the decode of only the part
/// the crop reads (`clip_image`, the data service's path) gives the same
/// bytes — for 4:2:0, 4:2:2 and 4:4:4, progressive, greyscale, odd sizes,
/// landscape and portrait.
#[test]
fn jpeg_regions_match_pillow() {
    let dir = common::reference_dir("preprocess_reference.py");
    let mut reference = Weights::read(&dir.path().join("reference.safetensors")).unwrap();
    for index in 0..9 {
        let path = dir.path().join(format!("photo{index}.jpg"));
        let bytes = std::fs::read(&path).unwrap();
        let image = RgbImage::decode(&bytes).unwrap();
        for size in [28usize, 224] {
            let expected = reference.remove(&format!("photo{index}.{size}")).unwrap();
            let difference = max_difference(&clip_preprocess(&image, size).unwrap(), &expected);
            assert!(
                difference <= 1e-5,
                "photo{index} ({}×{}) at {size}: max difference {difference}",
                image.width,
                image.height
            );
            let region = clip_image(&bytes, size, false).unwrap();
            let mut whole = clip_resize_crop(&image, size).unwrap();
            assert!(
                region == whole,
                "photo{index} ({}×{}) at {size}: the region decode differs from the whole",
                image.width,
                image.height
            );
            // The training flip, done inside the resize, is torchvision's
            // hflip of the crop.
            whole.flip_horizontal();
            assert!(
                clip_image(&bytes, size, true).unwrap() == whole,
                "photo{index} at {size}: the flipped region differs"
            );
        }
    }
}

/// A truncated JPEG fails through a region as it does whole (Pillow's
/// "image file is truncated"), even when the missing data lies outside the
/// part the crop reads.
#[test]
fn truncated_jpegs_fail_through_regions_too() {
    let dir = common::reference_dir("preprocess_reference.py");
    for index in [0, 3, 6] {
        let bytes = std::fs::read(dir.path().join(format!("photo{index}.jpg"))).unwrap();
        let cut = &bytes[..bytes.len() * 9 / 10];
        let whole = RgbImage::decode(cut).unwrap_err();
        let region = clip_image(cut, 224, false).unwrap_err();
        assert!(whole.contains("JPEG"), "{whole}");
        assert_eq!(region, whole, "photo{index}");
    }
}

#[test]
fn unreadable_images_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.jpg");
    std::fs::write(&path, b"not an image").unwrap();
    let message = RgbImage::open(&path).unwrap_err().to_string();
    assert!(
        message.contains("broken.jpg") && message.contains("cannot decode the image"),
        "{message}"
    );
}

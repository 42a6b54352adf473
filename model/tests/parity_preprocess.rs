//! Parity with open_clip's eval transform on PNG images of several sizes and
//! aspect ratios (shrinking and enlarging, odd crops): the preprocessed
//! tensors must match Pillow + torchvision exactly (up to float rounding).

mod common;

use flamingo_model::preprocess::{clip_preprocess, RgbImage};
use flamingo_model::Weights;

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

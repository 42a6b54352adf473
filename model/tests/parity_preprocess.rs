//! Parity with open_clip's eval transform on PNG images of several sizes and
//! aspect ratios (shrinking and enlarging, odd crops): the preprocessed
//! tensors must match Pillow + torchvision exactly (up to float rounding).

mod common;

use flamingo_model::preprocess::clip_preprocess;
use flamingo_model::Weights;
use flamingo_preprocess::jpeg::Jpeg;
use flamingo_preprocess::{clip_image, clip_resize_crop, RgbImage};
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
/// landscape and portrait, restart markers, optimised Huffman tables,
/// quality 40 and 100, and corrupt data (photos 13 to 15: a wrong restart
/// marker, random bytes in the entropy-coded data), which the fast Huffman
/// decoder hands back to libjpeg.
#[test]
fn jpeg_regions_match_pillow() {
    let dir = common::reference_dir("preprocess_reference.py");
    let mut reference = Weights::read(&dir.path().join("reference.safetensors")).unwrap();
    let before = flamingo_preprocess::jpeg::fast_decodes();
    for index in 0..16 {
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
    // Counters are per process and other tests decode too: only growth
    // says something. The 12 baseline photos (five decodes each above) went
    // through the fast decoder, and it gave up on the wrong restart marker
    // and on photo 14's bytes (photo 15's still decode as codes, and match
    // Pillow's output all the same).
    let after = flamingo_preprocess::jpeg::fast_decodes();
    assert!(
        after.started - before.started >= 60,
        "{before:?} → {after:?}"
    );
    assert!(
        after.given_up - before.given_up >= 10,
        "{before:?} → {after:?}"
    );
}

/// The fast Huffman decoder against libjpeg's own on damaged files: bytes
/// overwritten (0xFF included, so false markers and broken stuffing), a
/// marker inserted, a piece cut out, the end cut off — over the baseline
/// photos, whole and through a region. Both must give the same pixels, or
/// the same error.
#[test]
fn damaged_jpegs_decode_as_libjpeg_decodes_them() {
    let dir = common::reference_dir("preprocess_reference.py");
    // SplitMix64: a fixed, dependency-free sequence.
    let mut state = 0x5eed_u64;
    let mut next = move |below: usize| {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % below.max(1) as u64) as usize
    };
    let decode = |bytes: &[u8], fast: bool, region: bool| {
        let jpeg = match Jpeg::open(bytes) {
            Ok(Some(jpeg)) => jpeg,
            Ok(None) => return Err("not RGB".to_string()),
            Err(error) => return Err(error.to_string()),
        };
        let jpeg = if fast { jpeg } else { jpeg.libjpeg_only() };
        let (width, height) = (jpeg.width, jpeg.height);
        let (columns, rows) = if region {
            (width / 3..width * 3 / 4, height / 4..height * 2 / 3)
        } else {
            (0..width, 0..height)
        };
        jpeg.decode_region(columns, rows)
            .map(|region| (region.left, region.top, region.image))
            .map_err(|error| error.to_string())
    };
    let mut compared = 0;
    for index in [0, 1, 2, 4, 6, 8, 9, 10, 11, 12] {
        let original = std::fs::read(dir.path().join(format!("photo{index}.jpg"))).unwrap();
        let scan = original.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap() + 20;
        for round in 0..24 {
            let mut bytes = original.clone();
            let at = scan + next(bytes.len() - scan - 2);
            match round % 4 {
                0 => {
                    for offset in 0..1 + next(8) {
                        if at + offset < bytes.len() - 2 {
                            bytes[at + offset] = next(256) as u8;
                        }
                    }
                }
                1 => {
                    let marker = [0xD0 + next(8) as u8, 0xC4, 0xD9, 0xFE, 0x00][next(5)];
                    bytes.splice(at..at, [0xFF, marker]);
                }
                2 => {
                    let end = (at + 1 + next(64)).min(bytes.len() - 2);
                    bytes.drain(at..end);
                }
                _ => bytes.truncate(at),
            }
            for region in [false, true] {
                let fast = decode(&bytes, true, region);
                let plain = decode(&bytes, false, region);
                match (&fast, &plain) {
                    (Ok(fast), Ok(plain)) => assert!(
                        fast == plain,
                        "photo{index} round {round} region {region}: pixels differ"
                    ),
                    (Err(fast), Err(plain)) => {
                        assert_eq!(fast, plain, "photo{index} round {round}")
                    }
                    _ => panic!(
                        "photo{index} round {round} region {region}: fast {:?} but libjpeg {:?}",
                        fast.as_ref().map(|_| "pixels"),
                        plain.as_ref().map(|_| "pixels")
                    ),
                }
                compared += 1;
            }
        }
    }
    assert_eq!(compared, 10 * 24 * 2);
}

/// A truncated JPEG fails through a region as it does whole (Pillow's
/// "image file is truncated"), even when the missing data lies outside the
/// part the crop reads.
#[test]
fn truncated_jpegs_fail_through_regions_too() {
    let dir = common::reference_dir("preprocess_reference.py");
    for index in [0, 3, 6, 9, 11] {
        let bytes = std::fs::read(dir.path().join(format!("photo{index}.jpg"))).unwrap();
        let cut = &bytes[..bytes.len() * 9 / 10];
        let whole = RgbImage::decode(cut).unwrap_err().to_string();
        let region = clip_image(cut, 224, false).unwrap_err().to_string();
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

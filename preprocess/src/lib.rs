//! OpenFlamingo's input preprocessing, without libtorch, so that the data
//! service and the tools that only prepare data link no torch:
//!
//! - [`image`]: open_clip's eval transform on 8-bit RGB (resize the
//!   shortest side with Pillow's bicubic filter, center-crop), and the
//!   training path that decodes only the part of a JPEG the crop reads;
//! - [`jpeg`]: JPEG through libjpeg-turbo as Pillow decodes, with a faster
//!   baseline Huffman decoder plugged in (`csrc/`);
//! - [`resample`]: Pillow's `Resample.c` for 8-bit RGB, bit for bit;
//! - [`tokenizer`]: the language model's Hugging Face tokenizer with
//!   OpenFlamingo's `<|endofchunk|>`, `<image>` and `<PAD>` tokens.
//!
//! Everything is checked against Pillow, torchvision and Hugging Face on
//! the same inputs (`model/tests/parity_preprocess.rs`,
//! `model/tests/parity_tokenizer.rs`, `data/tests/parity.rs`).

mod buffers;
pub mod error;
pub mod image;
pub mod jpeg;
pub mod resample;
pub mod tokenizer;

pub use error::{PreprocessError, Result};
pub use image::{clip_image, clip_resize_crop, RgbImage, OPENAI_MEAN, OPENAI_STD};
pub use tokenizer::FlamingoTokenizer;

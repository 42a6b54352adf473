//! Errors of image decoding and tokenization. A caller that skips bad
//! samples (the data service) keeps the message as the sample's reason.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum PreprocessError {
    /// libjpeg refused the data (its own message).
    #[error("JPEG: {message}")]
    Jpeg { message: String },
    /// A PNG (or other non-JPEG) image the `image` crate cannot decode.
    #[error("{message}")]
    Image { message: String },
    #[error("the image is empty")]
    EmptyImage,
    /// A file that cannot be read or decoded; `message` says what to do.
    #[error("{path}: {message}")]
    File { path: String, message: String },
    /// A tokenizer that cannot be used as OpenFlamingo's.
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: String, message: String },
    #[error("tokenizer: truncation to {max_length} tokens: {message}")]
    Truncation { max_length: usize, message: String },
    #[error("tokenizing {text:?}: {message}")]
    Encode { text: String, message: String },
    #[error("decoding {ids:?}: {message}")]
    Decode { ids: Vec<u32>, message: String },
}

pub type Result<T, E = PreprocessError> = std::result::Result<T, E>;

//! Samples on their way through the service: raw members as read from a
//! shard, prepared training samples, and the reasons a sample is skipped.

use std::collections::HashMap;
use std::fmt;

use bytes::Bytes;
use flamingo_preprocess::RgbImage;

/// One webdataset sample: members by suffix (`jpg`, `txt`, `json`, …).
#[derive(Debug, Clone)]
pub struct RawSample {
    pub shard: String,
    pub key: String,
    pub members: HashMap<String, Bytes>,
}

/// A sample ready for training: images resized and cropped (not yet
/// normalised), tokens with labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub shard: String,
    pub key: String,
    /// `image_size`² RGB, in the order their `<image>` tokens appear.
    pub images: Vec<RgbImage>,
    /// For each image above, its index in the sample (MMC4's `image_info`).
    pub image_order: Vec<usize>,
    /// LAION: unpadded (the batch pads to its longest); MMC4: padded to
    /// `max_tokens`.
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub labels: Vec<i64>,
}

/// Why a sample was skipped. The names are stable: they are counted in
/// metrics and printed by `flamingoctl data inspect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// LAION: no `jpg`/`png`/`jpeg` member.
    MissingImage,
    /// LAION: no `txt` member.
    MissingText,
    /// MMC4: no `json` member.
    MissingJson,
    /// Text that is not UTF-8.
    BadText,
    /// JSON that does not parse or lacks the fields MMC4 has.
    BadJson,
    BadBase64,
    /// An image that does not decode.
    BadImage,
    /// MMC4: no image left after the size and similarity filters.
    NoImages,
    /// MMC4: fewer `<image>` tokens than `min_images` after truncation.
    TooFewImages,
    /// MMC4: the seeded random drop of half of the single-image documents.
    SingleImageDropped,
    /// MMC4: the only `<image>` is the last token, so nothing is supervised.
    ImageAtEnd,
    /// The sample's bytes in the shard are not a readable tar.
    BadTar,
}

impl RejectReason {
    pub const ALL: [Self; 12] = [
        Self::MissingImage,
        Self::MissingText,
        Self::MissingJson,
        Self::BadText,
        Self::BadJson,
        Self::BadBase64,
        Self::BadImage,
        Self::NoImages,
        Self::TooFewImages,
        Self::SingleImageDropped,
        Self::ImageAtEnd,
        Self::BadTar,
    ];

    /// The reason named `name` (as [`Self::as_str`] writes it).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|reason| reason.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingImage => "missing_image",
            Self::MissingText => "missing_text",
            Self::MissingJson => "missing_json",
            Self::BadText => "bad_text",
            Self::BadJson => "bad_json",
            Self::BadBase64 => "bad_base64",
            Self::BadImage => "bad_image",
            Self::NoImages => "no_images",
            Self::TooFewImages => "too_few_images",
            Self::SingleImageDropped => "single_image_dropped",
            Self::ImageAtEnd => "image_at_end",
            Self::BadTar => "bad_tar",
        }
    }

    /// Filters that upstream applies by design, as opposed to broken data.
    pub fn is_filter(self) -> bool {
        matches!(
            self,
            Self::NoImages | Self::TooFewImages | Self::SingleImageDropped | Self::ImageAtEnd
        )
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub reason: RejectReason,
    pub detail: String,
}

impl Reject {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// A sample that was skipped, with where it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub shard: String,
    pub key: String,
    pub reject: Reject,
}

//! Domain types of the batch stream and their conversions to and from
//! `flamingo.v1` messages (the only place that touches `pb::` types).

use bytes::Bytes;
use flamingo_preprocess::{OPENAI_MEAN, OPENAI_STD};
use flamingo_proto::v1 as pb;

use crate::batch::{rank_slice, Cursor, GlobalBatch};
use crate::error::DataError;
use crate::labels::IGNORE;
use crate::sample::{Prepared, Reject, RejectReason, Skipped};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageFormat {
    /// Resized, cropped RGB bytes: normalise on the rank.
    #[default]
    Uint8,
    Float16,
    Float32,
}

/// One rank's batch, ready for a training step.
#[derive(Debug, Clone, PartialEq)]
pub struct RankBatch {
    pub start: Cursor,
    pub next: Cursor,
    pub last_in_epoch: bool,
    pub keys: Vec<String>,
    pub num_images: Vec<u32>,
    pub image_order: Vec<Vec<u32>>,
    pub image_format: ImageFormat,
    /// `[b, t, 3, h, w]`
    pub image_shape: [usize; 5],
    /// The pixels, shared with the received message (not copied out of it).
    pub images: Bytes,
    /// `[b, length]`
    pub token_shape: [usize; 2],
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub labels: Vec<i64>,
    /// Every sample skipped in the global batch (the same list reaches every
    /// rank; count it once).
    pub skipped: Vec<Skipped>,
    /// The token that pads `input_ids`.
    pub pad_token_id: i64,
}

impl RankBatch {
    /// Rank `rank` of `world`'s slice of `batch`: tokens right-padded to the
    /// slice's longest (MMC4's are already full length), images `[b, t]`
    /// with `t = images_per_sample`, missing images zero.
    pub fn from_global(
        batch: &GlobalBatch,
        rank: usize,
        world: usize,
        images_per_sample: usize,
        pad_token_id: i64,
        format: ImageFormat,
    ) -> Self {
        Self::from_samples(
            BatchFrame {
                start: batch.start,
                next: batch.next,
                last_in_epoch: batch.last_in_epoch,
                skipped: batch.skipped.clone(),
            },
            &batch.samples[rank_slice(batch.samples.len(), world, rank)],
            images_per_sample,
            pad_token_id,
            format,
        )
    }

    /// A batch of `samples` (a rank's slice, or one piece of it) in
    /// `frame`'s place in the stream.
    pub fn from_samples(
        frame: BatchFrame,
        samples: &[Prepared],
        images_per_sample: usize,
        pad_token_id: i64,
        format: ImageFormat,
    ) -> Self {
        let length = samples
            .iter()
            .map(|sample| sample.input_ids.len())
            .max()
            .unwrap_or(0);
        let mut input_ids = Vec::with_capacity(samples.len() * length);
        let mut attention_mask = Vec::with_capacity(samples.len() * length);
        let mut labels = Vec::with_capacity(samples.len() * length);
        for sample in samples {
            let missing = length - sample.input_ids.len();
            input_ids.extend_from_slice(&sample.input_ids);
            input_ids.extend(std::iter::repeat_n(pad_token_id, missing));
            attention_mask.extend_from_slice(&sample.attention_mask);
            attention_mask.extend(std::iter::repeat_n(0, missing));
            labels.extend_from_slice(&sample.labels);
            labels.extend(std::iter::repeat_n(IGNORE, missing));
        }
        let side = samples
            .iter()
            .flat_map(|sample| sample.images.first())
            .map(|image| image.width)
            .next()
            .unwrap_or(0);
        let plane = side * side;
        let per_image = 3 * plane * format.element_bytes();
        let mut images = vec![0u8; samples.len() * images_per_sample * per_image];
        for (index, sample) in samples.iter().enumerate() {
            for (slot, image) in sample.images.iter().take(images_per_sample).enumerate() {
                let out =
                    &mut images[(index * images_per_sample + slot) * per_image..][..per_image];
                write_chw(&image.pixels, plane, format, out);
            }
        }
        Self {
            start: frame.start,
            next: frame.next,
            last_in_epoch: frame.last_in_epoch,
            keys: samples.iter().map(|sample| sample.key.clone()).collect(),
            num_images: samples
                .iter()
                .map(|sample| sample.images.len().min(images_per_sample) as u32)
                .collect(),
            image_order: samples
                .iter()
                .map(|sample| {
                    sample
                        .image_order
                        .iter()
                        .map(|index| *index as u32)
                        .collect()
                })
                .collect(),
            image_format: format,
            image_shape: [samples.len(), images_per_sample, 3, side, side],
            images: Bytes::from(images),
            token_shape: [samples.len(), length],
            input_ids,
            attention_mask,
            labels,
            skipped: frame.skipped,
            pad_token_id,
        }
    }

    /// Consecutive pieces of one rank's slice (one per share, in share
    /// order) as the one batch [`RankBatch::from_global`] makes of the
    /// whole slice: samples concatenated, tokens re-padded to the longest,
    /// images laid out at the common side. Every piece carries the global
    /// batch's skipped list; it is kept once.
    pub fn join(pieces: Vec<RankBatch>) -> Result<Self, DataError> {
        let mut pieces = pieces.into_iter();
        let Some(first) = pieces.next() else {
            return Err(DataError::Storage {
                url: "data service".into(),
                message: "no pieces to join".into(),
            });
        };
        let rest: Vec<RankBatch> = pieces.collect();
        if rest.is_empty() {
            return Ok(first);
        }
        let all = || std::iter::once(&first).chain(&rest);
        if let Some(other) = rest.iter().find(|piece| {
            (
                piece.start,
                piece.next,
                piece.last_in_epoch,
                piece.image_format,
            ) != (
                first.start,
                first.next,
                first.last_in_epoch,
                first.image_format,
            ) || piece.image_shape[1] != first.image_shape[1]
        }) {
            return Err(DataError::Storage {
                url: "data service".into(),
                message: format!(
                    "the pieces of one batch disagree: one starts at {:?} and another at {:?} \
                     (replicas serving different datasets or versions?)",
                    first.start, other.start
                ),
            });
        }
        let samples: usize = all().map(|piece| piece.token_shape[0]).sum();
        let length = all().map(|piece| piece.token_shape[1]).max().unwrap_or(0);
        let side = all()
            .map(|piece| piece.image_shape[3])
            .find(|side| *side > 0)
            .unwrap_or(0);
        let images_per_sample = first.image_shape[1];
        let per_sample = images_per_sample * 3 * side * side * first.image_format.element_bytes();
        let pad = first.pad_token_id;
        let mut joined = Self {
            start: first.start,
            next: first.next,
            last_in_epoch: first.last_in_epoch,
            keys: Vec::with_capacity(samples),
            num_images: Vec::with_capacity(samples),
            image_order: Vec::with_capacity(samples),
            image_format: first.image_format,
            image_shape: [samples, images_per_sample, 3, side, side],
            images: Bytes::new(),
            token_shape: [samples, length],
            input_ids: Vec::with_capacity(samples * length),
            attention_mask: Vec::with_capacity(samples * length),
            labels: Vec::with_capacity(samples * length),
            skipped: first.skipped.clone(),
            pad_token_id: pad,
        };
        let mut images = Vec::with_capacity(samples * per_sample);
        for piece in all() {
            joined.keys.extend_from_slice(&piece.keys);
            joined.num_images.extend_from_slice(&piece.num_images);
            joined.image_order.extend_from_slice(&piece.image_order);
            let [count, width] = piece.token_shape;
            for row in 0..count {
                let at = row * width..(row + 1) * width;
                let missing = length - width;
                joined
                    .input_ids
                    .extend_from_slice(&piece.input_ids[at.clone()]);
                joined.input_ids.extend(std::iter::repeat_n(pad, missing));
                joined
                    .attention_mask
                    .extend_from_slice(&piece.attention_mask[at.clone()]);
                joined
                    .attention_mask
                    .extend(std::iter::repeat_n(0, missing));
                joined.labels.extend_from_slice(&piece.labels[at]);
                joined.labels.extend(std::iter::repeat_n(IGNORE, missing));
            }
            if piece.image_shape[3] == side {
                images.extend_from_slice(&piece.images);
            } else {
                // A piece whose samples hold no image at all.
                images.extend(std::iter::repeat_n(0u8, count * per_sample));
            }
        }
        joined.images = Bytes::from(images);
        Ok(joined)
    }
}

/// Where a batch stands in its stream, and what its global batch skipped.
#[derive(Debug, Clone)]
pub struct BatchFrame {
    pub start: Cursor,
    pub next: Cursor,
    pub last_in_epoch: bool,
    pub skipped: Vec<Skipped>,
}

impl ImageFormat {
    fn element_bytes(self) -> usize {
        match self {
            ImageFormat::Uint8 => 1,
            ImageFormat::Float16 => 2,
            ImageFormat::Float32 => 4,
        }
    }
}

/// HWC bytes → CHW in `format`; float formats are normalised exactly as
/// torchvision's `ToTensor` + `Normalize` compute it in float32.
fn write_chw(pixels: &[u8], plane: usize, format: ImageFormat, out: &mut [u8]) {
    for channel in 0..3 {
        for position in 0..plane {
            let value = pixels[position * 3 + channel];
            let at = channel * plane + position;
            match format {
                ImageFormat::Uint8 => out[at] = value,
                ImageFormat::Float16 | ImageFormat::Float32 => {
                    let normalised =
                        (f32::from(value) / 255.0 - OPENAI_MEAN[channel]) / OPENAI_STD[channel];
                    if format == ImageFormat::Float16 {
                        out[at * 2..at * 2 + 2]
                            .copy_from_slice(&half::f16::from_f32(normalised).to_le_bytes());
                    } else {
                        out[at * 4..at * 4 + 4].copy_from_slice(&normalised.to_le_bytes());
                    }
                }
            }
        }
    }
}

impl From<Cursor> for pb::DataCursor {
    fn from(cursor: Cursor) -> Self {
        Self {
            epoch: cursor.epoch,
            consumed: cursor.consumed,
        }
    }
}

impl From<pb::DataCursor> for Cursor {
    fn from(cursor: pb::DataCursor) -> Self {
        Self {
            epoch: cursor.epoch,
            consumed: cursor.consumed,
        }
    }
}

impl From<ImageFormat> for pb::ImageFormat {
    fn from(format: ImageFormat) -> Self {
        match format {
            ImageFormat::Uint8 => Self::Uint8,
            ImageFormat::Float16 => Self::Float16,
            ImageFormat::Float32 => Self::Float32,
        }
    }
}

impl From<pb::ImageFormat> for ImageFormat {
    fn from(format: pb::ImageFormat) -> Self {
        match format {
            pb::ImageFormat::Uint8 => Self::Uint8,
            pb::ImageFormat::Float16 => Self::Float16,
            pb::ImageFormat::Float32 => Self::Float32,
        }
    }
}

impl From<RankBatch> for pb::Batch {
    fn from(batch: RankBatch) -> Self {
        Self {
            start: Some(batch.start.into()),
            next: Some(batch.next.into()),
            last_in_epoch: batch.last_in_epoch,
            keys: batch.keys,
            num_images: batch.num_images,
            image_format: pb::ImageFormat::from(batch.image_format) as i32,
            image_shape: batch.image_shape.iter().map(|d| *d as u32).collect(),
            images: batch.images,
            token_shape: batch.token_shape.iter().map(|d| *d as u32).collect(),
            input_ids: batch.input_ids,
            attention_mask: batch.attention_mask,
            labels: batch.labels,
            skipped: batch
                .skipped
                .into_iter()
                .map(|skip| pb::SkippedSample {
                    shard: skip.shard,
                    key: skip.key,
                    reason: skip.reject.reason.as_str().to_string(),
                    detail: skip.reject.detail,
                })
                .collect(),
            image_order: batch
                .image_order
                .into_iter()
                .map(|index| pb::ImageOrder { index })
                .collect(),
            pad_token_id: batch.pad_token_id,
        }
    }
}

impl TryFrom<pb::Batch> for RankBatch {
    type Error = DataError;

    fn try_from(batch: pb::Batch) -> Result<Self, Self::Error> {
        let malformed = |what: &str| DataError::Storage {
            url: "data service".into(),
            message: format!("malformed batch: {what}"),
        };
        let shape5: [usize; 5] = batch
            .image_shape
            .iter()
            .map(|d| *d as usize)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| malformed("image_shape"))?;
        let shape2: [usize; 2] = batch
            .token_shape
            .iter()
            .map(|d| *d as usize)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| malformed("token_shape"))?;
        let tokens = shape2[0] * shape2[1];
        if batch.input_ids.len() != tokens
            || batch.attention_mask.len() != tokens
            || batch.labels.len() != tokens
        {
            return Err(malformed("token arrays do not match token_shape"));
        }
        let format = pb::ImageFormat::try_from(batch.image_format)
            .map(ImageFormat::from)
            .map_err(|_| malformed("image_format"))?;
        Ok(Self {
            start: batch.start.map(Cursor::from).unwrap_or_default(),
            next: batch.next.map(Cursor::from).unwrap_or_default(),
            last_in_epoch: batch.last_in_epoch,
            keys: batch.keys,
            num_images: batch.num_images,
            image_order: batch
                .image_order
                .into_iter()
                .map(|order| order.index)
                .collect(),
            image_format: format,
            image_shape: shape5,
            images: batch.images,
            token_shape: shape2,
            input_ids: batch.input_ids,
            attention_mask: batch.attention_mask,
            labels: batch.labels,
            skipped: batch
                .skipped
                .into_iter()
                .map(|skip| Skipped {
                    shard: skip.shard,
                    key: skip.key,
                    reject: Reject::new(
                        RejectReason::from_name(&skip.reason).unwrap_or(RejectReason::BadTar),
                        skip.detail,
                    ),
                })
                .collect(),
            pad_token_id: batch.pad_token_id,
        })
    }
}

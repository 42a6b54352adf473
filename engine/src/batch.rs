//! A rank's batch from the data service as the model's tensors: images
//! normalised with OpenAI's mean/std into `[b, t, 1, 3, h, w]` (padding
//! slots zero, as upstream pads), tokens, attention mask and labels.

use flamingo_data::convert::{ImageFormat, RankBatch};
use flamingo_preprocess::{OPENAI_MEAN, OPENAI_STD};
use tch::{Kind, Tensor};

#[derive(Debug)]
pub struct TrainBatch {
    pub vision_x: Tensor,
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub labels: Tensor,
    pub samples: usize,
}

impl TrainBatch {
    pub fn from_rank_batch(batch: &RankBatch) -> Self {
        let [b, t, c, h, w] = batch.image_shape.map(|d| d as i64);
        let images = match batch.image_format {
            ImageFormat::Uint8 => {
                let raw = Tensor::from_slice(&batch.images)
                    .view([b, t, c, h, w])
                    .to_kind(Kind::Float)
                    / 255.0;
                let mean = Tensor::from_slice(&OPENAI_MEAN).view([1, 1, 3, 1, 1]);
                let std = Tensor::from_slice(&OPENAI_STD).view([1, 1, 3, 1, 1]);
                let normalised = (raw - mean) / std;
                // Slots past a sample's images are padding: zero, as upstream.
                let counts: Vec<i64> = batch.num_images.iter().map(|n| i64::from(*n)).collect();
                let present = Tensor::arange(t, (Kind::Int64, tch::Device::Cpu))
                    .view([1, t])
                    .lt_tensor(&Tensor::from_slice(&counts).view([b, 1]))
                    .to_kind(Kind::Float)
                    .view([b, t, 1, 1, 1]);
                normalised * present
            }
            ImageFormat::Float32 => {
                let floats: Vec<f32> = batch
                    .images
                    .chunks_exact(4)
                    .map(|bytes| f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
                    .collect();
                Tensor::from_slice(&floats).view([b, t, c, h, w])
            }
            ImageFormat::Float16 => {
                let floats: Vec<f32> = batch
                    .images
                    .chunks_exact(2)
                    .map(|bytes| half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32())
                    .collect();
                Tensor::from_slice(&floats).view([b, t, c, h, w])
            }
        };
        let [rows, length] = batch.token_shape.map(|d| d as i64);
        Self {
            vision_x: images.unsqueeze(2),
            input_ids: Tensor::from_slice(&batch.input_ids).view([rows, length]),
            attention_mask: Tensor::from_slice(&batch.attention_mask).view([rows, length]),
            labels: Tensor::from_slice(&batch.labels).view([rows, length]),
            samples: batch.keys.len(),
        }
    }

    /// The batch on `device`, images in `kind` (the model's frozen kind).
    pub fn to_device(&self, device: tch::Device, kind: Kind) -> Self {
        Self {
            vision_x: self.vision_x.to_device(device).to_kind(kind),
            input_ids: self.input_ids.to_device(device),
            attention_mask: self.attention_mask.to_device(device),
            labels: self.labels.to_device(device),
            samples: self.samples,
        }
    }
}

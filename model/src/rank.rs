//! What OpenFlamingo's evaluation needs from the model besides generation:
//! CLIP's image embedding (for RICES demo retrieval) and class-name
//! log-likelihoods after a shared context (`get_rank_classifications`).

use tch::{Kind, Tensor};

use crate::flamingo::{Decoding, Flamingo};
use crate::{ModelError, Result};

impl Flamingo {
    /// CLIP's image embedding, `ln_post(CLS) · proj`, L2-normalised:
    /// `images` `[n, 3, h, w]` (CLIP-preprocessed) → `[n, output_dim]` fp32.
    /// This is open_clip's `encode_image` of the same tower, which RICES ranks
    /// demonstrations by.
    pub fn image_embeddings(&self, images: &Tensor) -> Result<Tensor> {
        let pooled = tch::no_grad(|| self.vision.forward(images))?.pooled;
        let pooled = pooled.to_kind(Kind::Float);
        let norm = pooled.norm_scalaropt_dim(2, [-1], true);
        Ok(pooled / norm)
    }

    /// For each row of a left-padded context `lang_x` `[b, t]` (with its
    /// images `vision_x` and `attention_mask`) and each class name's tokens,
    /// the log-probability of the class name following the context: the mean
    /// over its tokens when `normalize_length`, else the sum. Returns
    /// `[b, classes]` fp64.
    ///
    /// The context runs once; every class continues from a copy of its
    /// key/value cache, one token at a time (OpenFlamingo's cached path, so
    /// class tokens attend to the context's last image).
    pub fn class_logprobs(
        &self,
        vision_x: &Tensor,
        lang_x: &Tensor,
        attention_mask: Option<&Tensor>,
        classes: &[Vec<i64>],
        normalize_length: bool,
    ) -> Result<Tensor> {
        if let Some(empty) = classes.iter().position(|tokens| tokens.is_empty()) {
            return Err(ModelError::Input {
                input: "class_names",
                message: format!(
                "class {empty} has no tokens; every class name must tokenize to at least one token"
            ),
            });
        }
        let device = lang_x.device();
        let batch = lang_x.size()[0];
        let media = self.encode_vision(vision_x)?;
        self.check_image_count(&media, lang_x)?;
        let (context_logits, context) = self.start_decoding(lang_x, &media, attention_mask)?;
        let first = context_logits
            .select(1, -1)
            .to_kind(Kind::Double)
            .log_softmax(-1, Kind::Double);
        let mut columns = Vec::with_capacity(classes.len());
        for tokens in classes {
            let mut state = context.fork();
            let ids = Tensor::from_slice(tokens).to_device(device);
            let mut total = first.gather(1, &ids.get(0).expand([batch, 1], false), false);
            for (index, token) in tokens.iter().enumerate().take(tokens.len() - 1) {
                let input = Tensor::full([batch, 1], *token, (Kind::Int64, device));
                let logits = self.continue_decoding(&mut state, &input, &media, None)?;
                let logprobs = logits
                    .select(1, -1)
                    .to_kind(Kind::Double)
                    .log_softmax(-1, Kind::Double);
                total += logprobs.gather(
                    1,
                    &ids.get(index as i64 + 1).expand([batch, 1], false),
                    false,
                );
            }
            let score = if normalize_length {
                total / tokens.len() as f64
            } else {
                total
            };
            columns.push(score);
        }
        Ok(Tensor::cat(&columns, 1))
    }
}

impl Decoding {
    /// A copy that can continue independently: cached tensors are never
    /// written in place (each step concatenates new ones).
    pub(crate) fn fork(&self) -> Self {
        Self {
            cache: crate::decoder::KvCache {
                layers: self
                    .cache
                    .layers
                    .iter()
                    .map(|layer| {
                        layer
                            .as_ref()
                            .map(|(keys, values)| (keys.shallow_clone(), values.shallow_clone()))
                    })
                    .collect(),
            },
            cached_locations: self.cached_locations.shallow_clone(),
            padding: self
                .padding
                .as_ref()
                .map(|padding| crate::flamingo::Padding {
                    key_mask: padding.key_mask.shallow_clone(),
                    positions: padding.positions.as_ref().map(Tensor::shallow_clone),
                }),
        }
    }
}
